"""The data sets codistill brings (registered on import): MNIST-1D (generated locally, the
default), CIFAR-10/100 through torchvision (checksummed before unpickling), synthetic
sequences and images for tests, and an image folder of your own."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from codistill.data.checksums import verify_checksums
from codistill.data.datasets import ArrayDataset, _save_atomically, register_dataset
from codistill.errors import ConfigError

logger = logging.getLogger(__name__)

MNIST1D_TEST_SEED = 1_000_042
"""The noise seed of a larger MNIST-1D test set (`data.test_examples`); the default set's is 42."""
MNIST1D_TRAIN_SEED = 2_000_042
"""The noise seed of a larger (or smaller) MNIST-1D training set (`data.train_examples`)."""


GENERATION_CHUNK = 1_000_000
"""A training set of more examples than this is generated in chunks of this many, chunk i with
the noise seed `MNIST1D_TRAIN_SEED + i` (chunk 0 is the set of this size itself): the package
holds every example of a call in Python lists (~1,500 bytes each), so one call of 6 million
would peak at ~9 GB, chunks at ~1.5 GB beside the float32 examples kept (160 bytes each). Sets up
to this size are one call, as they always were (the figures made with them stand)."""


def _make_dataset(**changes) -> dict:
    """`mnist1d.make_dataset` with the package's default arguments but `changes`."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for key, value in changes.items():
        setattr(args, key, value)
    state = np.random.get_state()  # make_dataset reseeds NumPy's global RNG
    try:
        return make_dataset(args)
    finally:
        np.random.set_state(state)


def _mnist1d_generated(cache: Path, **changes) -> dict:
    """`_make_dataset(**changes)`, cached."""
    if not cache.exists():
        d = _make_dataset(**changes)
        _save_atomically(cache, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"])
    return dict(np.load(cache))


def _mnist1d_train(root: Path, examples: int) -> tuple[np.ndarray, np.ndarray]:
    """A generated MNIST-1D training set of `examples` (see `GENERATION_CHUNK`), cached."""
    if examples <= GENERATION_CHUNK:
        d = _mnist1d_generated(root / f"mnist1d_train{examples}_seed{MNIST1D_TRAIN_SEED}.npz",
                               seed=MNIST1D_TRAIN_SEED, num_samples=10 * -(-examples // 10), train_split=1.0)
        return d["x"][:examples], d["y"][:examples]
    cache = root / f"mnist1d_train{examples}_seed{MNIST1D_TRAIN_SEED}_chunks{GENERATION_CHUNK}.npz"
    if not cache.exists():
        chunks = -(-examples // GENERATION_CHUNK)
        x = np.empty((examples, 40), dtype=np.float32)
        y = np.empty(examples, dtype=np.int64)
        for i in range(chunks):
            start = i * GENERATION_CHUNK
            size = min(GENERATION_CHUNK, examples - start)
            logger.info("generating MNIST-1D training examples %d–%d of %d (chunk %d of %d)",
                        start, start + size, examples, i + 1, chunks)
            d = _make_dataset(seed=MNIST1D_TRAIN_SEED + i, num_samples=10 * -(-size // 10), train_split=1.0)
            x[start:start + size], y[start:start + size] = d["x"][:size], d["y"][:size]
        _save_atomically(cache, x=x, y=y)
    d = np.load(cache)
    return d["x"], d["y"]


@register_dataset("mnist1d", input_kind="sequence", num_classes=10, train_examples=4000, generates=True)
def mnist1d(root: Path, augment: bool, download: bool, test_examples: int = 0, train_examples: int = 0) -> ArrayDataset:
    """MNIST-1D (Greydanus 2020) with the package's default arguments: 4000 train / 1000 test,
    length 40. Generated locally from the package's templates, then cached.

    `test_examples` > 0: the test set is instead that many examples generated from the same
    templates and arguments with another noise seed (`MNIST1D_TEST_SEED`), standardised as the
    package standardises every set it makes. At 94% accuracy, 1000 test examples give one figure
    a standard error of 0.75 points, 10,000 give 0.24.

    `train_examples` > 0: the training set is instead that many examples generated the same way
    with a third noise seed (`MNIST1D_TRAIN_SEED`): with enough of them (e.g. 500,000) a run sees
    each example about once, as Anil et al.'s data sets are never repeated. Generating is slow
    in pure Python (~4,600 examples/s: minutes for 500,000), in chunks above `GENERATION_CHUNK`:
    done once, then cached."""
    d = _mnist1d_generated(root / "mnist1d_default_seed42.npz")
    if test_examples:
        # The package makes num_samples // 10 per class and keeps (1 − train_split) of them.
        extra = _mnist1d_generated(root / f"mnist1d_test{test_examples}_seed{MNIST1D_TEST_SEED}.npz",
                                   seed=MNIST1D_TEST_SEED, num_samples=10 * -(-test_examples // 10), train_split=0.0)
        d["x_test"], d["y_test"] = extra["x_test"][:test_examples], extra["y_test"][:test_examples]
    if train_examples:
        d["x"], d["y"] = _mnist1d_train(root, train_examples)

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
