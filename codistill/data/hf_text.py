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
- local files are fingerprinted by their bytes before any cache is trusted: `datasets` keys a
  local file by its path and modification time, so its cache lives in a folder named by the
  files' content hash (a file replaced with its mtime kept — `cp -p`, `rsync -a`, `tar x` — is
  read again); text and JSON files must be UTF-8 and every row's text a string (refused, naming
  the file or the row: one line);
- each side is tokenized with `Dataset.map` into an Arrow file under `data.root`, named by the
  corpus's and the tokenizer's hashes, its row and token counts recorded beside it
  (`….counts.json`): a second load maps nothing and memory-maps the file, once it has the rows
  it should and the tokens recorded — a cache cut short or damaged is rebuilt, saying why;
- documents are packed by the one rule of every text corpus (`task.pack`), each followed by the
  tokenizer's end-of-text token, into windows of `data.context` tokens; the last window of a
  side is padded on the right, its padded positions labelled −100 (left out by every loss, KL
  term and metric).

The windows then come from the same (seed, step) batch schedule as every data set's examples.
"""

from __future__ import annotations

import codecs
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
from codistill.errors import ConfigError, first_line

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


READ_BYTES = 1 << 20


def files_hash(builder: str, files: list[str]) -> str:
    """The sha256 of the files' names and bytes, read once; a text or JSON file that is not UTF-8,
    or a JSON file with nothing in it, refused naming it (`datasets` raises a traceback for each)."""
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0")
        decoder = codecs.getincrementaldecoder("utf-8")() if builder in ("json", "text") else None
        offset, blank = 0, True
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(READ_BYTES), b""):
                h.update(chunk)
                if decoder is not None:
                    held = len(decoder.getstate()[0])  # a character's first bytes from the chunk before
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as err:
                        at = offset - held + err.start
                        raise ConfigError("data.path", f"{name} is not UTF-8 text (byte {at}: {err.reason}); hf_text "
                                                       "reads UTF-8 text and JSON files") from None
                blank = blank and not chunk.strip()
                offset += len(chunk)
        if decoder is not None:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise ConfigError("data.path", f"{name} is not UTF-8 text (it ends inside a character); hf_text "
                                               "reads UTF-8 text and JSON files") from None
        if builder == "json" and blank:
            raise ConfigError("data.path", f"{name} is empty: it holds no rows; remove it or give it rows")
        h.update(b"\0")
    return h.hexdigest()


def load_files(path: str, root: Path):
    """The documents of `data.path` as a `datasets.Dataset` (read locally). `datasets` trusts its
    cache of a local file while the path and modification time are the same, so the cache is
    kept in a folder named by the files' bytes: a file replaced keeping its mtime is read again."""
    builder, files = data_files(path)
    extra = {"sample_by": "document"} if builder == "text" else {}  # a text file is one document, not one per line
    cache_dir = root / "hf_datasets" / files_hash(builder, files)[:16]
    try:
        return _datasets().load_dataset(builder, data_files=files, split="train", cache_dir=str(cache_dir), **extra)
    except StopIteration:  # what `datasets` raises for JSON with no rows
        raise ConfigError("data.path", f"{path!r} holds no rows; give it documents") from None


def _what(value) -> str:
    return "missing or null" if value is None else f"a {type(value).__name__} ({repr(value)[:40]})"


def document_digests(ds, field: str, where: str = "the given Dataset") -> list[str]:
    """Every row's content hash (of its text in column `field`), read a batch at a time. A row
    whose text is not a string (missing, null, a number, a list) is refused with its number:
    hashed as "" it would be an empty document nobody asked for."""
    if field not in ds.column_names:
        raise ConfigError("data.text_field", f"{field!r} is not a column of the data; its columns: "
                                             f"{', '.join(ds.column_names)}")
    digests: list[str] = []
    for batch in ds.select_columns([field]).iter(batch_size=1000):
        for text in batch[field]:
            if not isinstance(text, str):
                raise ConfigError("data.text_field", f"row {len(digests) + 1} of {where} (counting from 1): "
                                                     f"{field!r} is {_what(text)}; every row's text must be a string")
            digests.append(_digest(text))
    if not digests:
        raise ConfigError("data.path", f"{where} holds no rows; give it documents")
    return digests


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
            ordered = (ds[row][field] for row in sorted(train_rows, key=digests.__getitem__))
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


def _counts_of(table) -> dict[str, int]:
    import pyarrow.compute as pc

    column = table.column("input_ids")
    return {"rows": table.num_rows, "tokens": int(pc.sum(pc.list_value_length(column)).as_py() or 0)}


def _counts_file(cache: Path) -> Path:
    return cache.with_name(cache.stem + ".counts.json")


def _distrust_damaged(cache: Path, rows: int) -> None:
    """Delete the tokens cache `cache` unless it reads whole with `rows` rows and the tokens its
    counts file records, saying why in one line: an Arrow stream cut at a record batch reads as a
    shorter corpus under the same hash, and one cut inside a batch fails every later read."""
    if not cache.exists():
        return
    try:
        counts = _counts_of(_datasets().Dataset.from_file(str(cache)).data)
        why = None
    except Exception as err:  # noqa: BLE001 — whatever pyarrow or datasets says about a damaged file
        counts, why = None, f"it does not read ({first_line(err, 120)})"
    try:
        recorded = json.loads(_counts_file(cache).read_text())
    except (OSError, ValueError):
        recorded = None  # written before counts were kept: its rows are still checked
    if why is None and counts["rows"] != rows:
        why = f"it holds {counts['rows']} documents, not {rows}"
    elif why is None and recorded is not None and counts != recorded:
        why = f"it holds {counts['rows']} documents and {counts['tokens']} tokens, not the {recorded['rows']} and " \
              f"{recorded['tokens']} recorded when it was written"
    if why is None:
        return
    logger.warning("%s: rebuilding the tokens cache: %s", cache, why)
    for path in (cache, _counts_file(cache)):
        try:
            path.unlink()
        except FileNotFoundError:  # another process rebuilding it removed it first
            pass


def _record_counts(cache: Path, counts: dict[str, int]) -> None:
    where = _counts_file(cache)
    try:
        if json.loads(where.read_text()) == counts:
            return
    except (OSError, ValueError):
        pass
    fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=where.name + ".")
    with os.fdopen(fd, "w") as f:
        json.dump(counts, f)
    os.replace(tmp, where)


def _tokens(ds, rows: list[int], tokenizer, field: str, cache: Path, end_of_text: int) -> np.ndarray:
    """The token stream of `rows` (`task.token_stream`: each document's ids then end-of-text); the
    ids through `Dataset.map` into `cache` (an Arrow file; reused, memory-mapped, when it is there
    and whole: `_distrust_damaged`), its row and token counts recorded beside it."""

    def encode(batch):
        return {"input_ids": tokenizer(batch[field], add_special_tokens=False)["input_ids"]}

    _clear_abandoned_writes(cache.parent)
    _distrust_damaged(cache, len(rows))
    mapped = ds.select(rows).map(encode, batched=True, remove_columns=ds.column_names, cache_file_name=str(cache),
                                 new_fingerprint=cache.stem, load_from_cache_file=True, desc="tokenizing")
    _record_counts(cache, _counts_of(mapped.data))
    parts = [stream_of_flat(chunk.flatten().to_numpy(zero_copy_only=False),
                            chunk.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64), end_of_text)
             for chunk in mapped.data.column("input_ids").chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def from_dataset(ds, root: Path, settings) -> ArrayDataset:
    """A language-model corpus (next-token windows) from the documents of a `datasets.Dataset`."""
    field = settings.text_field
    digests = document_digests(ds, field, settings.path or "the given Dataset")
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
