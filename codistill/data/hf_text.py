"""Text through Hugging Face `datasets`: `data: {name: hf_text, path: FILES or DIR, text_field: text}`.

Local JSONL/JSON, Parquet, Arrow or text files (a text file is one document) are read with
`datasets.load_dataset` — no network: the builders read local files only — or a
`datasets.Dataset` is given from Python (`train(cfg, data=ds)`). Then, as for every text
corpus (`text.py`, `task.pack`):

- documents are split into train and test by the hash of their text (one in TEST_EVERY is
  test), exact copies dropped first, so no text sits on both sides;
- the tokenizer is a local folder (`data.tokenizer: {path: DIR}`, `AutoTokenizer`) or a
  byte-level BPE trained on a bounded sample of the training documents, saved as a tokenizer
  folder (`AutoTokenizer.from_pretrained` loads it; `codistill export` ships it);
- each side is tokenized with `Dataset.map` into an Arrow file under `data.root`, named by the
  corpus's and the tokenizer's hashes: a second load maps nothing and memory-maps the file;
- documents are packed by the one rule of every text corpus (`task.pack`), each followed by the
  tokenizer's end-of-text token, into windows of `data.context` tokens; the last window of a
  side is padded on the right, its padded positions labelled −100 (left out by every loss, KL
  term and metric).

The windows then come from the same (seed, step) batch schedule as every data set's examples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from codistill.data.datasets import ArrayDataset, register_dataset
from codistill.data.task import PACKING, NextToken, stream_of_flat
from codistill.data.text import (END_OF_TEXT, SPLIT_RULE, TOKENIZER_SAMPLE_CHARS, _digest, end_of_text_id, first_chars,
                                  folder_hash, next_token_data, split_by_digest, train_tokenizer)
from codistill.errors import ConfigError

logger = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text",
            ".text": "text", ".md": "text"}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.name", "hf_text needs the `datasets` package: pip install 'codistill[hf]'") from None
    return datasets


def data_files(path: str) -> tuple[str, list[str]]:
    """(the `datasets` builder, the files) of `data.path`: one file, or every file under a folder
    with a suffix a builder reads. One kind per corpus."""
    where = Path(os.path.expanduser(path))
    if not where.exists():
        raise ConfigError("data.path", f"{path!r} does not exist; name a file or folder of {', '.join(BUILDERS)} files")
    files = [where] if where.is_file() else sorted(f for f in where.rglob("*") if f.is_file()
                                                   and f.suffix.lower() in BUILDERS)
    if not files or files[0].suffix.lower() not in BUILDERS:
        raise ConfigError("data.path", f"{path!r} holds no file hf_text reads; suffixes read: {', '.join(BUILDERS)}")
    kinds = sorted({BUILDERS[f.suffix.lower()] for f in files})
    if len(kinds) > 1:
        raise ConfigError("data.path", f"{path!r} mixes {' and '.join(kinds)} files; give one kind per corpus")
    return kinds[0], [str(f) for f in files]


def load_files(path: str, root: Path):
    """The documents of `data.path` as a `datasets.Dataset` (read locally, cached by `datasets`)."""
    builder, files = data_files(path)
    extra = {"sample_by": "document"} if builder == "text" else {}  # a text file is one document, not one per line
    return _datasets().load_dataset(builder, data_files=files, split="train", cache_dir=str(root / "hf_datasets"),
                                    **extra)


def document_digests(ds, field: str) -> list[str]:
    """Every row's content hash (of its text in column `field`), read a batch at a time."""
    if field not in ds.column_names:
        raise ConfigError("data.text_field", f"{field!r} is not a column of the data; its columns: "
                                             f"{', '.join(ds.column_names)}")
    return [_digest(t or "") for batch in ds.select_columns([field]).iter(batch_size=1000) for t in batch[field]]


def _save_folder(tokenizer, folder: Path) -> None:
    # Several workers of one node may train it at once: written aside, then renamed.
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + "."))
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process's folder is already there: the same tokenizer
        shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_for(settings, ds, field: str, train_rows: list[int], digests: list[str], root: Path, corpus: str):
    """(the tokenizer, its folder): `data.tokenizer: {path: DIR}`, or a BPE trained on the
    training documents (at most TOKENIZER_SAMPLE_CHARS characters, whole documents in the order
    of their hashes) and saved as a folder under `data.root`."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if isinstance(settings.tokenizer, dict):
        folder = Path(os.path.expanduser(settings.tokenizer["path"]))
    elif settings.tokenizer == "bpe":
        key = hashlib.sha256(json.dumps([corpus, settings.vocab_size, TOKENIZER_SAMPLE_CHARS, END_OF_TEXT]).encode())
        folder = root / f"hf_tokenizer_{key.hexdigest()[:16]}"
        if not (folder / "tokenizer.json").exists():
            ordered = (ds[row][field] or "" for row in sorted(train_rows, key=digests.__getitem__))
            bpe = train_tokenizer(first_chars(ordered, TOKENIZER_SAMPLE_CHARS), settings.vocab_size,
                                  special_tokens=[END_OF_TEXT])
            root.mkdir(parents=True, exist_ok=True)
            _save_folder(PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END_OF_TEXT), folder)
    else:
        raise ConfigError("data.tokenizer", f"hf_text takes `bpe` or {{path: DIR}} (a tokenizer folder), got "
                                            f"{settings.tokenizer!r}")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True), folder


ABANDONED_S = 15 * 60
"""A temporary file of `Dataset.map` in `data.root` untouched this long was left by a killed
process (a live writer adds a record batch every 1,000 documents): it is deleted."""


def _clear_abandoned_writes(root: Path) -> None:
    """`Dataset.map` writes a cache aside (`tmpXXXXXXXX`, then a rename); a kill -9 mid-write left
    one for good. Others may be tokenizing into the same root now, so only old ones go."""
    for path in root.glob("tmp????????"):
        try:
            if path.is_file() and time.time() - path.stat().st_mtime > ABANDONED_S:
                path.unlink()
                logger.warning("deleted %s, a tokens cache a killed process left half written", path)
        except OSError:  # gone already (another process cleared it), or not ours to delete
            pass


def _tokens(ds, rows: list[int], tokenizer, field: str, cache: Path, end_of_text: int) -> np.ndarray:
    """The token stream of `rows` (`task.token_stream`: each document's ids then end-of-text); the
    ids through `Dataset.map` into `cache` (an Arrow file; reused, memory-mapped, when it is there)."""

    def encode(batch):
        return {"input_ids": tokenizer(batch[field], add_special_tokens=False)["input_ids"]}

    _clear_abandoned_writes(cache.parent)
    mapped = ds.select(rows).map(encode, batched=True, remove_columns=ds.column_names, cache_file_name=str(cache),
                                 new_fingerprint=cache.stem, load_from_cache_file=True, desc="tokenizing")
    parts = [stream_of_flat(chunk.flatten().to_numpy(zero_copy_only=False),
                            chunk.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64), end_of_text)
             for chunk in mapped.data.column("input_ids").chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def from_dataset(ds, root: Path, settings) -> ArrayDataset:
    """A language-model corpus (next-token windows) from the documents of a `datasets.Dataset`."""
    field = settings.text_field
    digests = document_digests(ds, field)
    train_rows, test_rows, duplicates = split_by_digest(digests)
    corpus = hashlib.sha256("".join(digests).encode()).hexdigest()
    tokenizer, folder = tokenizer_for(settings, ds, field, train_rows, digests, root, corpus)
    end = end_of_text_id(tokenizer, folder)
    # Tokens cached by another split or packing rule, or another tokenizer, are other tokens.
    key = hashlib.sha256(json.dumps([corpus, folder_hash(folder), SPLIT_RULE, PACKING]).encode()).hexdigest()[:16]
    root.mkdir(parents=True, exist_ok=True)
    unsplit = not train_rows or not test_rows  # one or a few documents: the last tenth of the stream is test
    train_ids = _tokens(ds, sorted(train_rows + test_rows) if unsplit else train_rows, tokenizer, field,
                        root / f"hf_text_{key}_train.arrow", end)
    test_ids = None if unsplit else _tokens(ds, test_rows, tokenizer, field, root / f"hf_text_{key}_test.arrow", end)
    return next_token_data(train_ids, test_ids, context=settings.context, test_windows=settings.test_windows,
                           end_of_text=end, vocab=len(tokenizer), corpus=corpus, files=len(digests),
                           duplicates=duplicates, tokenizer=str(settings.tokenizer), tokenizer_place=str(folder),
                           cache=f"hf_text_{key}", where=settings.path or "the given Dataset")


@register_dataset("hf_text", task=NextToken, takes_settings=True)
def hf_text(root: Path, augment: bool, download: bool, settings) -> ArrayDataset:
    """Local JSONL, Parquet, Arrow or text files read by Hugging Face `datasets` (`data.path`, `data.text_field`)."""
    return from_dataset(load_files(settings.path or "", root), root, settings)
