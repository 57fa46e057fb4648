"""Text for language-model peers, real and offline.

A corpus is a sorted list of files, hashed (names and contents) so a run knows exactly which
corpus it saw, and split into train and test *by document content*: exact duplicates are
dropped first (and counted), and a document's test membership is a hash of its text — so a
text and its copies (40 symlinks to one README) never sit on both sides, and adding a file
moves no other. The tokenizer — a byte-level BPE trained on a bounded sample of the training
split with the `tokenizers` library (its `<|endoftext|>` a special token), plain bytes (ids
0..255, and 256 for end-of-text), or a tokenizer folder (its eos token) — is saved beside the
cached tokens. Every text corpus (`hf_text` too) is packed by one rule, `task.pack`: each
document followed by end-of-text, the stream cut into windows of `context` inputs whose labels
are the next tokens, the last window padded, its padded positions labelled −100; `next_token_data`
builds the data set from the two streams as every text corpus does. So a batch is B windows,
chosen by the same (seed, step) schedule as every other data set's examples.

- `stdlib`: the Python standard library's own source files of the running interpreter
  (`sysconfig`'s stdlib folder, *.py, without site-packages and the test suites).
- `site_packages`: the Python source of the running interpreter's environment (`sysconfig`'s
  purelib and platlib: every installed package's *.py, without the test suites) — a corpus
  ~20× the stdlib's, for runs that must see no window twice. It is what is installed: another
  version of any package is another corpus (its hash says which one a run saw).
- `text`: any local text file or folder (`data.path`); files that do not decode as UTF-8
  are skipped.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from codistill.data.datasets import ArrayDataset, _save_atomically, register_dataset
from codistill.data.task import PACKING, Fingerprint, NextToken, token_stream, windows
from codistill.errors import ConfigError

TEST_EVERY = 10  # one document in ten (by its content's hash) is test
# How documents are split, recorded in the fingerprint and the cache key: tokens cached, or a
# checkpoint trained, under the earlier split by path are another corpus's.
SPLIT_RULE = "content"
# The BPE learns its merges from at most this many characters of training text: its memory grows
# with the text it counts (0.84 GB for 20 MB of Python source, and on), and a few MB give a
# vocabulary of 1024 (docs/language-models.md has the measurements).
TOKENIZER_SAMPLE_CHARS = 8_000_000
END_OF_TEXT = "<|endoftext|>"  # the special token a BPE trained here ends each document with
BYTES_END_OF_TEXT = 256  # `tokenizer: bytes`: ids 0..255 are the bytes, 256 ends a document
ENCODE_CHARS = 4_000_000  # text encoded at a time: only that much of the tokenizer's Encodings is held
logger = logging.getLogger(__name__)


TEST_SUITES = {"test", "tests"}  # folders of test suites, left out of the Python-source corpora


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not {"site-packages", *TEST_SUITES} & set(f.relative_to(root).parts)]
    return root, sorted(files)


def site_packages_files() -> tuple[Path, list[Path]]:
    """The installed packages' *.py files (purelib and platlib, usually one folder), without test
    suites and without editable installs' generated finders (`__editable__*`: a path on this
    machine, not a package's source)."""
    folders = {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    root = Path(os.path.commonpath(folders))
    files = {f for folder in folders if folder.is_dir() for f in folder.rglob("*.py")
             if f.is_file() and not f.name.startswith("__editable__") and not TEST_SUITES & set(f.relative_to(root).parts)}
    return root, sorted(files)


SNIFF_BYTES = 4096


def _is_text(path: Path) -> bool:
    """Whether the file is UTF-8 text, judged by its first SNIFF_BYTES. An incremental decoder
    keeps a multi-byte character cut at that boundary for the bytes that would follow, so a cut
    character (Chinese, emoji: 3 and 4 bytes) never rejects a file; only bytes that are not
    UTF-8 do."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
            whole = not f.read(1)
        codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except (OSError, UnicodeDecodeError):
        return False
    return bool(head.strip()) and b"\0" not in head


def text_files(path: str, key: str = "data.path") -> tuple[Path, list[Path]]:
    """The text files at `path` (one file, or every file under a folder), sorted; a ConfigError
    naming `key` when there is nothing to read."""
    where = Path(os.path.expanduser(path))
    if not where.exists():
        raise ConfigError(key, f"{path!r} does not exist; name a text file or a folder of text files")
    if where.is_file():
        root, files = where.parent, [where]
    else:
        root, files = where, sorted(f for f in where.rglob("*") if f.is_file())
    files = [f for f in files if _is_text(f)]
    if not files:
        raise ConfigError(key, f"{path!r} holds no text (no non-empty UTF-8 file); name a text file or a "
                                       "folder of text files")
    return root, files


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_by_digest(digests: list[str]) -> tuple[list[int], list[int], int]:
    """(train places, test places, duplicates dropped) of documents with these content hashes:
    each distinct document once, at its first place, on the side its hash picks (one in
    TEST_EVERY is test). The rule of every text corpus (`text`, `stdlib`, `hf_text`)."""
    first: dict[str, int] = {}
    for place, digest in enumerate(digests):
        first.setdefault(digest, place)
    kept = sorted(first.values())
    test = [p for p in kept if int(digests[p], 16) % TEST_EVERY == 0]
    train = [p for p in kept if int(digests[p], 16) % TEST_EVERY != 0]
    return train, test, len(digests) - len(kept)


def split_documents(texts: list[str]) -> tuple[list[str], list[str], int]:
    """(train, test, duplicates dropped): each distinct document once, in its first place, on
    the side its content's hash picks. Split by path, identical files with other names fell on
    both sides, and the test figures measured memory."""
    train, test, dropped = split_by_digest([_digest(t) for t in texts])
    return [texts[p] for p in train], [texts[p] for p in test], dropped


def corpus_hash(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _read(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def tokenizer_sample(texts: list[str], limit: int) -> list[str]:
    """At most `limit` characters of `texts`, the same on every machine: whole documents in the
    order of their content's hash (spread over the corpus, not its first folder), the one that
    would pass the limit cut to fit."""
    return first_chars(sorted(texts, key=_digest), limit)


def first_chars(texts, limit: int) -> list[str]:
    """The documents of the iterable `texts`, in its order, up to `limit` characters in all: the
    one that would pass the limit cut to fit, none read after it."""
    sample, size = [], 0
    for text in texts:
        if size >= limit:
            break
        sample.append(text[:limit - size])
        size += len(sample[-1])
    return sample


def train_tokenizer(texts: list[str], vocab_size: int, special_tokens: list[str] = ()):
    """A byte-level BPE (GPT-2's scheme: any byte sequence encodes, nothing is unknown), its
    merges learned from at most TOKENIZER_SAMPLE_CHARS characters of them; `special_tokens`
    (an end-of-text separator) are added whole, never split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=list(special_tokens))
    tokenizer.train_from_iterator(tokenizer_sample(texts, TOKENIZER_SAMPLE_CHARS), trainer)
    return tokenizer


def _chunks(texts: list[str], chars: int = ENCODE_CHARS):
    """`texts` in runs of about `chars` characters."""
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def folder_tokenizer(tokenizer: dict):
    """(the tokenizer of a folder `{path: DIR}`, the hash of its files): `AutoTokenizer`, local."""
    from transformers import AutoTokenizer

    folder = Path(os.path.expanduser(tokenizer["path"]))
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True), folder_hash(folder)


def folder_hash(folder: Path) -> str:
    """A tokenizer folder's identity: the sha256 of its files' names and contents (what names
    the tokens a corpus was cached under, so another tokenizer at the same path is not reused)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def tokenizer_hash(place: str | None) -> str | None:
    """The identity of the tokenizer at `place` (a folder, or a `tokenizers` JSON file; None: bytes)."""
    if place is None:
        return None
    where = Path(place)
    return folder_hash(where) if where.is_dir() else hashlib.sha256(where.read_bytes()).hexdigest()


def end_of_text_id(tokenizer, where) -> int:
    """The id a transformers tokenizer ends each document with (its eos token): refused without one."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("data.tokenizer", f"the tokenizer at {where} has no end-of-text (eos) token; every text "
                                            "corpus ends each document with it")
    return int(tokenizer.eos_token_id)


def next_token_data(train: np.ndarray, test: np.ndarray | None, *, context: int, test_windows: int,
                    end_of_text: int, vocab: int, corpus: str, files: int, duplicates: int, tokenizer: str,
                    tokenizer_place: str | None, cache: str, where) -> ArrayDataset:
    """A language-model data set from the token streams of its training and test documents
    (`task.token_stream`: end-of-text after each), as every text corpus builds it: `test` None
    (one or a few documents, all on one side) takes the last tenth of the stream; both packed
    into windows (`task.windows`, the rule of `task.pack`); the test windows thinned evenly to
    `test_windows`; the duplicates left out said; the fingerprint."""
    if test is None:  # one or a few documents: the last tenth of the stream is the test part
        cut = len(train) * 9 // 10
        train, test = train[:cut], train[cut:]
    if len(train) < context + 1 or len(test) < 2:
        raise ConfigError("data.context", f"the corpus holds {len(train)} training and {len(test)} test tokens: too "
                                          f"few for a training window of {context} tokens and a test window; lower "
                                          "data.context or give more text")
    x, y = windows(train, context, end_of_text)
    x_test, y_test = windows(test, context, end_of_text)
    if len(x_test) > test_windows:  # evenly over the test stream, so every part of it counts
        keep = torch.linspace(0, len(x_test) - 1, test_windows).round().long()
        x_test, y_test = x_test[keep], y_test[keep]
    if duplicates:  # said at every load, not only the first: a cached corpus is the same corpus
        logger.warning("%s: %d of %d documents are exact copies of another and were left out before the train/test "
                       "split", where, duplicates, files)
    fingerprint = Fingerprint(corpus_sha256=corpus, split=SPLIT_RULE, packing=PACKING,
                              tokenizer_sha256=tokenizer_hash(tokenizer_place), vocab_size=vocab,
                              train_tokens=int(len(train)), test_tokens=int(len(test)), files=files,
                              duplicates=duplicates, tokenizer=tokenizer, tokenizer_place=tokenizer_place, cache=cache)
    return ArrayDataset(x, y, x_test, y_test, num_classes=vocab, augment=False,
                        task=NextToken(vocab, fingerprint, end_of_text))


def build_corpus(root: Path, files: list[Path], cache_root: Path, tokenizer: str | dict, vocab_size: int,
                 context: int, test_windows: int) -> ArrayDataset:
    digest = corpus_hash(root, files)
    given = folder_tokenizer(tokenizer) if isinstance(tokenizer, dict) else None
    # Tokens cached by another split, packing or BPE sample are other tokens.
    rule = [SPLIT_RULE, PACKING, TOKENIZER_SAMPLE_CHARS if tokenizer == "bpe" else None]
    named = given[1] if given else tokenizer  # a folder's tokenizer is named by its files' hash
    key = hashlib.sha256(json.dumps([digest, named, vocab_size, *rule], sort_keys=True).encode()).hexdigest()[:16]
    cache = cache_root / f"text_{key}.npz"
    place = (str(Path(os.path.expanduser(tokenizer["path"]))) if given else
             str(cache_root / f"text_{key}.tokenizer.json") if tokenizer == "bpe" else None)
    if not cache.exists():
        train_text, test_text, duplicates = split_documents(_read(files))
        unsplit = not train_text or not test_text  # one or a few documents: the stream is split instead
        if unsplit:
            train_text, test_text = train_text + test_text, []
        if given:
            vocab, end = len(given[0]), end_of_text_id(given[0], place)
            encode = lambda texts: [np.array(ids, dtype=np.int32)  # noqa: E731
                                    for ids in given[0](texts, add_special_tokens=False)["input_ids"]]
        elif tokenizer == "bytes":
            vocab, end = 257, BYTES_END_OF_TEXT
            encode = lambda texts: [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]  # noqa: E731
        else:
            bpe = train_tokenizer(train_text, vocab_size, special_tokens=[END_OF_TEXT])
            vocab, end = bpe.get_vocab_size(), bpe.token_to_id(END_OF_TEXT)
            cache_root.mkdir(parents=True, exist_ok=True)
            bpe.save(place)
            encode = lambda texts: [np.array(e.ids, dtype=np.int32) for e in bpe.encode_batch(texts)]  # noqa: E731

        def stream(texts: list[str]) -> np.ndarray:  # a chunk at a time: its Encodings are freed as it goes
            return token_stream([ids.astype(np.int32, copy=False) for chunk in _chunks(texts) for ids in encode(chunk)],
                                end)

        _save_atomically(cache, train=stream(train_text), test=stream(test_text), unsplit=np.array(unsplit),
                         vocab=np.array(vocab), end_of_text=np.array(end), corpus=np.array(digest),
                         files=np.array(len(files)), duplicates=np.array(duplicates))
        del train_text, test_text  # the text (~300 MB for site_packages) is not held while the windows are made
    d = np.load(cache)
    return next_token_data(d["train"], None if bool(d["unsplit"]) else d["test"], context=context,
                           test_windows=test_windows, end_of_text=int(d["end_of_text"]), vocab=int(d["vocab"]),
                           corpus=str(d["corpus"]), files=int(d["files"]), duplicates=int(d["duplicates"]),
                           tokenizer=str(tokenizer), tokenizer_place=place, cache=cache.name, where=root)


@register_dataset("stdlib", task=NextToken, takes_settings=True)
def stdlib(root: Path, augment: bool, download: bool, settings) -> ArrayDataset:
    """The Python standard library's source as a language-model corpus: next-token windows."""
    corpus_root, files = stdlib_files()
    return build_corpus(corpus_root, files, root, settings.tokenizer, settings.vocab_size, settings.context,
                        settings.test_windows)


@register_dataset("site_packages", task=NextToken, takes_settings=True)
def site_packages(root: Path, augment: bool, download: bool, settings) -> ArrayDataset:
    """The installed packages' Python source as a language-model corpus: next-token windows."""
    corpus_root, files = site_packages_files()
    return build_corpus(corpus_root, files, root, settings.tokenizer, settings.vocab_size, settings.context,
                        settings.test_windows)


@register_dataset("text", task=NextToken, takes_settings=True)
def text(root: Path, augment: bool, download: bool, settings) -> ArrayDataset:
    """Your text file or folder of text files (`data.path`) as a language-model corpus."""
    corpus_root, files = text_files(settings.path or "")
    return build_corpus(corpus_root, files, root, settings.tokenizer, settings.vocab_size, settings.context,
                        settings.test_windows)


def save_tokenizer(where: str | None, into: Path) -> bool:
    """Write the tokenizer at `where` (a folder, or the `tokenizers` JSON file of a BPE trained
    here: `ArrayDataset.tokenizer`) into the folder `into`, as `AutoTokenizer.from_pretrained`
    loads it. False when there is none (`tokenizer: bytes`)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not where:
        return False
    if os.path.isdir(where):
        AutoTokenizer.from_pretrained(where, local_files_only=True).save_pretrained(str(into))
    else:  # a BPE trained here: its end-of-text token is the eos the loaded tokenizer names
        PreTrainedTokenizerFast(tokenizer_file=where, eos_token=END_OF_TEXT).save_pretrained(str(into))
    return True
