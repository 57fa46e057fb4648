"""Data set registry and the in-memory container (the data sets codistill brings register in
`loaders.py` and `text.py`). Every data set is held in memory as tensors (MNIST-1D is 200 KB,
CIFAR-100 150 MB as uint8), so a batch is an index into a tensor: no loader processes, and the
same (seed, step) gives the same batch on every peer."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from codistill.data.task import TOKENS, Classes, Fingerprint, NextToken, Task, task_of
from codistill.errors import ConfigError
from codistill.registry import Registry


@dataclass
class ArrayDataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_kind: str | None = None
    """'sequence' (N, 1, L) float, 'image' (N, 3, H, W) uint8, or 'tokens' (N, T) int64 windows
    (labels (N, T): the next tokens). None: the task's (`NextToken`: tokens)."""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: bool = False
    """Random crop (pad 4) and horizontal flip, the standard CIFAR augmentation."""
    task: Task | None = None
    """What the data asks (`data/task.py`): `Classes(num_classes)`, or `NextToken(vocab, …)` for
    token windows. None: the one its input kind implies."""

    def __post_init__(self):
        if self.task is None:
            self.task = task_of(self.input_kind, self.num_classes)
        if self.input_kind is None:
            if self.task.input_kind is None:
                raise ValueError("name the input kind ('sequence' or 'image') of data whose task is Classes")
            self.input_kind = self.task.input_kind
        if self.task.size != self.num_classes:
            raise ValueError(f"the task has {self.task.size} outputs but num_classes is {self.num_classes}")

    @property
    def fingerprint(self) -> Fingerprint | None:
        """What exactly was loaded, where it is not fixed by the name (a text corpus: its hash, the
        split, the packing, the tokenizer). Kept in every checkpoint; a run resumes only on the same data."""
        return self.task.fingerprint

    @property
    def tokenizer(self) -> str | None:
        """Token data: where the tokenizer the ids come from is on this machine — a tokenizer folder
        or a `tokenizers` JSON file (None: bytes, or no tokens). What a pretrained peer's own
        tokenizer is checked against."""
        return self.task.tokenizer

    def padded_in(self, indices: torch.Tensor) -> bool:
        """Whether any of these training windows holds a position whose label counts for nothing
        (a padded tail). Asked of a CPU copy of which windows do, made once per training set: the
        labels may live on a GPU (`data_on_device`), where asking them every step would wait for
        the device every step."""
        if self.task.ignore_index is None:
            return False
        labels, padded = getattr(self, "_padded", (None, None))
        if labels is not self.y_train:  # first asked, or the training set was replaced since
            padded = (self.y_train == self.task.ignore_index).reshape(len(self.y_train), -1).any(1).cpu()
            self._padded = (self.y_train, padded)
        return bool(padded[indices.cpu()].any())

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
        return self.task.labels(y)

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
        return self.task.rows(batch)


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
    generates: bool = False
    """The loader generates its examples and takes `test_examples` and `train_examples`: a test
    set of that size from the same distribution (`data.test_examples`), for figures with less
    evaluation noise, and a training set of that size (`data.train_examples`), for runs that see
    each example about once."""
    task: type[Task] | None = None
    """The kind of task the data declares (`Classes`, `NextToken`); None: the one its input kind
    implies. Asked before anything is loaded (how a group is scored, whether a vocabulary may
    decide top-k)."""

    def __post_init__(self):
        if self.task is None:
            object.__setattr__(self, "task", NextToken if self.input_kind == TOKENS else Classes)


DATASETS: Registry[DatasetEntry] = Registry("data set")


def register_dataset(name: str, input_kind: str | None = None, num_classes: int | None = None,
                     train_examples: int | None = None, takes_settings: bool = False, generates: bool = False,
                     task: type[Task] | None = None):
    """Register a data set's loader. `task`: the kind of task it declares (`NextToken` for a text
    corpus: its input kind is then tokens); `input_kind="tokens"` alone says the same."""
    input_kind = input_kind or (task.input_kind if task else None)
    if input_kind is None:
        raise ValueError(f"data set {name!r}: name its input_kind ('sequence' or 'image') or a task that fixes it")

    def decorator(fn):
        DATASETS.add(name, DatasetEntry(fn, input_kind, num_classes, train_examples, takes_settings, generates, task),
                     getattr(fn, "__module__", ""))
        return fn
    return decorator


VALIDATION_SEED = 20_201_125
"""The held-out split depends on this alone (not on a run's seed): every trial of a sweep, and
every method of a comparison, is tuned on the same validation examples."""


def load_data(settings) -> ArrayDataset:
    """The data set a run's `data:` section names, as every runner loads it."""
    return load_dataset(settings.name, settings.root, settings.augment, settings.download, settings.train_subset,
                        settings.validation, settings, test_examples=settings.test_examples,
                        train_examples=settings.train_examples)


def load_dataset(name: str, root: str = "~/.cache/codistill", augment: bool = True,
                 download: bool = False, train_subset: int = 0, validation: float = 0.0, settings=None,
                 test_examples: int = 0, train_examples: int = 0) -> ArrayDataset:
    entry = DATASETS.get(name, "data.name")
    if entry.takes_settings and settings is None:
        raise ValueError(f"data set {name!r} is built from its `data:` settings: load it with load_data(cfg.data)")
    for key, value in (("test_examples", test_examples), ("train_examples", train_examples)):
        if value and not entry.generates:
            raise ConfigError(f"data.{key}", f"data set {name!r} has fixed splits; data sets that generate "
                              f"theirs: {', '.join(n for n, e in DATASETS.items() if e.generates)}")
    data = entry.load(root=Path(os.path.expanduser(root)), augment=augment, download=download,
                      **({"settings": settings} if entry.takes_settings else {}),
                      **({"test_examples": test_examples, "train_examples": train_examples} if entry.generates else {}))
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
        low, high = _label_range(data.task, labels)
        if low is not None and (low < 0 or high >= data.num_classes):
            raise ConfigError("data.name", f"data set {name!r} has {split} labels from {low} to {high}, but "
                              f"{data.num_classes} classes (labels 0..{data.num_classes - 1})")
    check_finite_inputs(name, data)
    return data


def _label_range(task, labels: torch.Tensor, rows: int = 65_536) -> tuple[int | None, int | None]:
    """The smallest and largest label that counts (padded positions of token windows count for
    nothing), a block of rows at a time: the counted labels of ~100M tokens copied at once were
    0.8 GB more at every load."""
    low = high = None
    for block in labels.split(rows):
        keep = task.counted(block)
        block = block if keep is None else block[keep]
        if len(block):
            low = int(block.min()) if low is None else min(low, int(block.min()))
            high = int(block.max()) if high is None else max(high, int(block.max()))
    return low, high


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
