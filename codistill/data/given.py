"""Your own data from Python, without a registry entry: `train(cfg, data=…)`.

`data` is an `ArrayDataset` (which carries its task: `Classes`, or `NextToken` for token
windows, `data/task.py`), or `(train, test)` where each is `(x, y)` tensors or a map-style
`torch.utils.data.Dataset` of `(x, y)` pairs (materialised into memory once), or a Hugging
Face `datasets.Dataset` of documents (a language-model corpus, built as `hf_text` builds one). It is registered
under a name made of its content's hash, `given-<sha256[:12]>`, which the run's config records:
the run names exactly the data it saw, resumes only with the same data, and Ray workers get the
tensors with the run (shipped like any registration of the user's). Batches then come from the
same (seed, step) → indices schedule as every registered data set.
"""

from __future__ import annotations

import hashlib

import torch

from codistill.data.datasets import DATASETS, ArrayDataset, DatasetEntry
from codistill.data.task import NextToken
from codistill.errors import ConfigError


def _tensors(split, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(split, (tuple, list)) and len(split) == 2 and all(isinstance(t, torch.Tensor) for t in split):
        x, y = split
    elif hasattr(split, "__getitem__") and hasattr(split, "__len__"):
        pairs = [split[i] for i in range(len(split))]
        if not pairs:
            raise ConfigError("data", f"the {what} data set is empty")
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs])
    else:
        raise ConfigError("data", f"the {what} data must be (x, y) tensors or a map-style Dataset of (x, y) pairs, "
                                  f"got {type(split).__name__}")
    if len(x) != len(y):
        raise ConfigError("data", f"the {what} data has {len(x)} inputs and {len(y)} labels")
    return x, y.long()


def as_array_dataset(data) -> ArrayDataset:
    if isinstance(data, ArrayDataset):
        return data
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ConfigError("data", "give (train, test), each (x, y) tensors or a Dataset, or an ArrayDataset")
    (x, y), (x_test, y_test) = _tensors(data[0], "training"), _tensors(data[1], "test")
    if x.dim() not in (3, 4):
        raise ConfigError("data", f"inputs must be (N, channels, length) sequences or (N, 3, H, W) images, got "
                                  f"{list(x.shape)}")
    kind = "sequence" if x.dim() == 3 else "image"
    classes = int(max(y.max(), y_test.max())) + 1
    x, x_test = (x.float(), x_test.float()) if kind == "sequence" or x.is_floating_point() else (x, x_test)
    mean = std = None
    if kind == "image" and x.dtype == torch.uint8:  # raw pixels: normalised per channel, as CIFAR is
        pixels = x.float().div(255)
        mean, std = tuple(pixels.mean((0, 2, 3)).tolist()), tuple(pixels.std((0, 2, 3)).tolist())
    return ArrayDataset(x, y, x_test, y_test, num_classes=classes, input_kind=kind, mean=mean, std=std)


def _is_hf_dataset(data) -> bool:
    return type(data).__module__.startswith("datasets.") and hasattr(data, "column_names")


def _register_documents(ds, settings) -> str:
    """A `datasets.Dataset` of documents, registered as an `hf_text` corpus is built (`hf_text.py`:
    split by document, tokenized with `data.tokenizer`, packed into `data.context` windows), under
    the name of its texts' hash."""
    from codistill.data.hf_text import document_digests, from_dataset

    digests = document_digests(ds, settings.text_field)
    name = f"given-{hashlib.sha256((settings.text_field + ''.join(digests)).encode()).hexdigest()[:12]}"
    if name not in DATASETS:
        DATASETS.add(name, DatasetEntry(lambda root, augment, download, settings, ds=ds: from_dataset(ds, root, settings),
                                        NextToken.input_kind, None, takes_settings=True, task=NextToken),
                    origin="given data")
    return name


def register_given(data, settings=None) -> str:
    """Register the given data under its content's name; returns the name. A `datasets.Dataset`
    is a corpus of documents, built with the run's `data:` settings (`settings`)."""
    if _is_hf_dataset(data):
        return _register_documents(data, settings)
    dataset = as_array_dataset(data)
    digest = hashlib.sha256()
    for t in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    name = f"given-{digest.hexdigest()[:12]}"
    if name not in DATASETS:

        def load(root, augment, download, dataset=dataset):
            dataset.augment = augment and dataset.input_kind == "image"
            return dataset

        DATASETS.add(name, DatasetEntry(load, dataset.input_kind, dataset.num_classes, len(dataset.y_train),
                                        task=type(dataset.task)), origin="given data")
    return name
