"""Data set registry. Every data set is held in memory as tensors (MNIST-1D is 200 KB,
CIFAR-100 150 MB as uint8), so a batch is an index into a tensor: no loader processes,
and the same (seed, step) gives the same batch on every peer."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from codistill.errors import ConfigError
from codistill.registry import Registry


@dataclass
class ArrayDataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_kind: str
    """'sequence' (N, 1, L) float or 'image' (N, 3, H, W) uint8."""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: bool = False
    """Random crop (pad 4) and horizontal flip, the standard CIFAR augmentation."""
    fingerprint: dict | None = None
    """What exactly was loaded, where it is not fixed by the name (a text corpus: its hash, the
    tokenizer). Kept in every checkpoint; a run resumes only on the same data."""

    def to(self, device: torch.device) -> "ArrayDataset":
        """A copy whose tensors live on `device`: batches are then gathered, normalised and
        augmented there (the same batches: the random numbers still come from the CPU generator)."""
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_kind != "image" or x.is_floating_point():  # sequences, and images given as floats
            return x
        x = x.float().div_(255)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def _labels(self, y: torch.Tensor) -> torch.Tensor:
        # Tokens: a label per position, flattened as the model flattens its logits (B·T rows),
        # so every loss and metric of a classifier applies per position unchanged.
        return y.reshape(-1) if self.input_kind == "tokens" else y

    def train_batch(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.to(self.x_train.device)
        x = self._prepare(self.x_train[indices])
        if self.augment and self.input_kind == "image":
            x = _crop_and_flip(x, generator)
        return x, self._labels(self.y_train[indices])

    def test_batches(self, batch_size: int):
        for start in range(0, len(self.y_test), batch_size):
            yield self._prepare(self.x_test[start:start + batch_size]), self._labels(self.y_test[start:start + batch_size])

    def rows(self, batch: torch.Tensor) -> int:
        """How many predictions (rows of logits) a batch of inputs makes: one per example, or
        one per position of a token window."""
        return batch.shape[0] * batch.shape[1] if self.input_kind == "tokens" else batch.shape[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _crop_and_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    n, _, h, w = x.shape
    device = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    # Drawn on the CPU generator, then moved: the same crops and flips wherever the data lives.
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    rows = (dy.view(n, 1) + torch.arange(h, device=device).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w, device=device).view(1, w))  # (n, w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel = torch.arange(x.shape[1], device=device).view(1, -1, 1, 1)
    return padded[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


@dataclass(frozen=True)
class DatasetEntry:
    load: Callable[..., ArrayDataset]
    input_kind: str
    num_classes: int | None
    """None: known only from the data (an image folder's class folders)."""
    train_examples: int | None = None
    """Size of the training split, when known without loading it (checked against the batch size)."""
    takes_settings: bool = False
    """The loader is also given the `data:` section (a text corpus: path, tokenizer, context)."""
    generates_test: bool = False
    """The loader generates its examples and takes `test_examples`: a test set of that size from
    the same distribution (`data.test_examples`), for figures with less evaluation noise."""


DATASETS: Registry[DatasetEntry] = Registry("data set")


def register_dataset(name: str, input_kind: str, num_classes: int | None, train_examples: int | None = None,
                     takes_settings: bool = False, generates_test: bool = False):
    def decorator(fn):
        DATASETS.add(name, DatasetEntry(fn, input_kind, num_classes, train_examples, takes_settings, generates_test),
                     getattr(fn, "__module__", ""))
        return fn
    return decorator


VALIDATION_SEED = 20_201_125
"""The held-out split depends on this alone (not on a run's seed): every trial of a sweep, and
every method of a comparison, is tuned on the same validation examples."""


def load_data(settings) -> ArrayDataset:
    """The data set a run's `data:` section names, as every runner loads it."""
    return load_dataset(settings.name, settings.root, settings.augment, settings.download, settings.train_subset,
                        settings.validation, settings, test_examples=settings.test_examples)


def load_dataset(name: str, root: str = "~/.cache/codistill", augment: bool = True,
                 download: bool = False, train_subset: int = 0, validation: float = 0.0, settings=None,
                 test_examples: int = 0) -> ArrayDataset:
    entry = DATASETS.get(name, "data.name")
    if entry.takes_settings and settings is None:
        raise ValueError(f"data set {name!r} is built from its `data:` settings: load it with load_data(cfg.data)")
    if test_examples and not entry.generates_test:
        raise ConfigError("data.test_examples", f"data set {name!r} has a fixed test split; data sets that generate "
                          f"theirs: {', '.join(n for n, e in DATASETS.items() if e.generates_test)}")
    data = entry.load(root=Path(os.path.expanduser(root)), augment=augment, download=download,
                      **({"settings": settings} if entry.takes_settings else {}),
                      **({"test_examples": test_examples} if entry.generates_test else {}))
    if train_subset:
        data.x_train, data.y_train = data.x_train[:train_subset], data.y_train[:train_subset]
    if validation:
        # Tuning never sees the test set: a fixed part of the training set stands in for it.
        order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(VALIDATION_SEED))
        held = order[:max(1, round(validation * len(order)))]
        kept = order[len(held):].sort().values
        data.x_test, data.y_test = data.x_train[held], data.y_train[held]
        data.x_train, data.y_train = data.x_train[kept], data.y_train[kept]
    for split, labels in (("training", data.y_train), ("test", data.y_test)):
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= data.num_classes):
            raise ConfigError("data.name", f"data set {name!r} has {split} labels from {int(labels.min())} to "
                              f"{int(labels.max())}, but {data.num_classes} classes (labels 0..{data.num_classes - 1})")
    check_finite_inputs(name, data)
    return data


def check_finite_inputs(name: str, data: ArrayDataset) -> None:
    """A NaN or infinite input trains nothing and evaluates to an accuracy that means nothing (a
    run on NaN test inputs once "finished" at 24% with churn 0): refused at load, as is a
    normalisation that would make such inputs (a channel whose std is 0 or not finite)."""
    for split, x in (("training", data.x_train), ("test", data.x_test)):
        if not x.is_floating_point():
            continue
        finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten()
            raise ConfigError("data.name", f"data set {name!r} has {split} inputs that are not finite (NaN or "
                              f"infinity) in {len(bad)} of {len(x)} examples, the first at example {int(bad[0])}; "
                              "every input must be a finite number")
    if data.std is not None and not all(np.isfinite(s) and s > 0 for s in data.std):
        raise ConfigError("data.name", f"data set {name!r} is normalised with std {tuple(data.std)} per channel; "
                          "each must be a finite number above 0")


def _save_atomically(path: Path, **arrays) -> None:
    # Several workers on one node may build the cache at once: write aside, then rename.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


MNIST1D_TEST_SEED = 1_000_042
"""The noise seed of a larger MNIST-1D test set (`data.test_examples`); the default set's is 42."""


def _mnist1d_generated(cache: Path, **changes) -> dict:
    """`mnist1d.make_dataset` with the package's default arguments but `changes`, cached."""
    if not cache.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        for key, value in changes.items():
            setattr(args, key, value)
        state = np.random.get_state()  # make_dataset reseeds NumPy's global RNG
        d = make_dataset(args)
        np.random.set_state(state)
        _save_atomically(cache, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"])
    return dict(np.load(cache))


@register_dataset("mnist1d", input_kind="sequence", num_classes=10, train_examples=4000, generates_test=True)
def mnist1d(root: Path, augment: bool, download: bool, test_examples: int = 0) -> ArrayDataset:
    """MNIST-1D (Greydanus 2020) with the package's default arguments: 4000 train / 1000 test,
    length 40. Generated locally from the package's templates, then cached.

    `test_examples` > 0: the test set is instead that many examples generated from the same
    templates and arguments with another noise seed (`MNIST1D_TEST_SEED`), standardised as the
    package standardises every set it makes; the training set is the default one. At 94%
    accuracy, 1000 test examples give one figure a standard error of 0.75 points, 10,000 give 0.24."""
    d = _mnist1d_generated(root / "mnist1d_default_seed42.npz")
    if test_examples:
        # The package makes num_samples // 10 per class and keeps (1 − train_split) of them.
        extra = _mnist1d_generated(root / f"mnist1d_test{test_examples}_seed{MNIST1D_TEST_SEED}.npz",
                                   seed=MNIST1D_TEST_SEED, num_samples=10 * -(-test_examples // 10), train_split=0.0)
        d["x_test"], d["y_test"] = extra["x_test"][:test_examples], extra["y_test"][:test_examples]

    def seq(a):
        return torch.from_numpy(a).float().unsqueeze(1)

    return ArrayDataset(seq(d["x"]), torch.from_numpy(d["y"]).long(), seq(d["x_test"]),
                        torch.from_numpy(d["y_test"]).long(), num_classes=10, input_kind="sequence")


_CIFAR_MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
_CIFAR_STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}


def _cifar(num_classes: int, root: Path, augment: bool, download: bool) -> ArrayDataset:
    import torchvision

    base = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100

    class cls(base):  # noqa: N801
        # The files are pickles: unpickling a planted one runs its code. So every file must match
        # torchvision's checksum before anything is unpickled — hashed once, then remembered by
        # size and modification time (torchvision hashes all 170 MB on every load).
        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            files = [*self.train_list, *self.test_list, (self.meta["filename"], self.meta["md5"])]
            if not all(os.path.exists(os.path.join(folder, name)) for name, _ in files):
                return False
            verify_checksums(folder, files)
            return True

        def _load_meta(self) -> None:
            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise FileNotFoundError(
            f"CIFAR-{num_classes} not found under {root} ({err}). Put torchvision's "
            f"'{cls.base_folder}' folder there, or set data.download=true where a network is."
        ) from None

    def images(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW

    return ArrayDataset(images(train), torch.tensor(train.targets), images(test), torch.tensor(test.targets),
                        num_classes=num_classes, input_kind="image", mean=_CIFAR_MEAN[num_classes],
                        std=_CIFAR_STD[num_classes], augment=augment)


def verified_cache_path() -> str:
    """Where this user remembers the files it verified: its own cache folder, never the data
    folder — whoever can plant a pickle there could plant its "verified" entry beside it."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "codistill", "verified-files.json")


def _md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(path: str, expected: str) -> list:
    """What a file must still be to skip hashing it again. The change time is in it because no
    one but root can set it: a file rewritten with its size and modification time put back
    (os.utime) has a new change time, so it is hashed again."""
    stat = os.stat(path)
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, expected]


def verify_checksums(folder: str, files: list[tuple[str, str]]) -> None:
    """Each (name, md5) in `folder` must have that checksum; a file this user verified before and
    that is unchanged since (see `_identity`) is not hashed again. A mismatch is a ConfigError
    naming `data.root`, raised before the file is read."""
    cache_path = verified_cache_path()
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    changed = False
    for name, expected in files:
        path = os.path.realpath(os.path.join(folder, name))
        key = _identity(path, expected)
        if cache.get(path) == key:
            continue
        if _md5(path) != expected:
            raise ConfigError("data.root", f"{path} does not match torchvision's checksum, so it is not read (the "
                              "files are pickles, and a planted one would run code): remove it and set "
                              "data.download: true, or put the original file there")
        cache[path] = key
        changed = True
    if changed:
        cache = {p: k for p, k in cache.items() if os.path.exists(p)}  # forget files gone since (a test's)
        try:  # best effort: without a writable cache folder the files are hashed again next time
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            _save_json_atomically(cache_path, cache)
        except OSError:
            pass


def _save_json_atomically(path: str, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


@register_dataset("cifar10", input_kind="image", num_classes=10, train_examples=50000)
def cifar10(root: Path, augment: bool, download: bool) -> ArrayDataset:
    """CIFAR-10 (Krizhevsky 2009) through torchvision's files: 50000 train / 10000 test 32×32 images."""
    return _cifar(10, root, augment, download)


@register_dataset("cifar100", input_kind="image", num_classes=100, train_examples=50000)
def cifar100(root: Path, augment: bool, download: bool) -> ArrayDataset:
    """CIFAR-100 (Krizhevsky 2009) through torchvision's files: 50000 train / 10000 test, 100 classes."""
    return _cifar(100, root, augment, download)


def _synthetic_sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Ten classes, each a fixed random template plus noise: learnable in a few hundred steps.
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, 40, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, 10, (n,), generator=g)
    return templates[y] + 1.5 * torch.randn(n, 1, 40, generator=g), y


@register_dataset("synthetic", input_kind="sequence", num_classes=10, train_examples=2000)
def synthetic(root: Path, augment: bool, download: bool) -> ArrayDataset:
    """Noisy class templates shaped like MNIST-1D (1 × 40): for tests and benchmarks."""
    x, y = _synthetic_sequences(2000, seed=1)
    xt, yt = _synthetic_sequences(500, seed=2)
    return ArrayDataset(x, y, xt, yt, num_classes=10, input_kind="sequence")


@register_dataset("synthetic_images", input_kind="image", num_classes=100, train_examples=1024)
def synthetic_images(root: Path, augment: bool, download: bool) -> ArrayDataset:
    """Random CIFAR-shaped uint8 images, 100 classes: for timing image models, not accuracy."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (1024, 3, 32, 32), generator=g, dtype=torch.uint8)
    return ArrayDataset(x, torch.randint(0, 100, (1024,), generator=g), x[:256], torch.randint(0, 100, (256,), generator=g),
                        num_classes=100, input_kind="image", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                        augment=augment)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _image_folder(folder: Path, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()) if (folder / name).is_dir() else []:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
                images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
                labels.append(label)
    if not images:
        raise ConfigError("data.root", f"{folder} holds no images in class folders ({', '.join(IMAGE_SUFFIXES)})")
    return torch.stack(images), torch.tensor(labels)


@register_dataset("imagefolder", input_kind="image", num_classes=None)
def imagefolder(root: Path, augment: bool, download: bool) -> ArrayDataset:
    """A local folder in torchvision's ImageFolder layout under `data.root`: `train/<class>/*.png`
    and `test/<class>/*.png` (or `val/`), classes in sorted order, images resized to 32×32 (what
    the CIFAR ResNets take), normalised with the training set's channel means and deviations, with
    the same crop + flip augmentation as CIFAR. Held in memory as uint8, like CIFAR."""
    test_name = "test" if (root / "test").is_dir() else "val"
    if not (root / "train").is_dir() or not (root / test_name).is_dir():
        raise ConfigError("data.root", f"{root} needs train/ and test/ (or val/) folders of class folders "
                                       "(torchvision's ImageFolder layout)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    x, y = _image_folder(root / "train", classes, 32)
    x_test, y_test = _image_folder(root / test_name, classes, 32)
    pixels = x.float().div(255)
    return ArrayDataset(x, y, x_test, y_test, num_classes=len(classes), input_kind="image",
                        mean=tuple(pixels.mean((0, 2, 3)).tolist()), std=tuple(pixels.std((0, 2, 3)).tolist()),
                        augment=augment)
