"""Text for language-model peers, real and offline.

A corpus is a sorted list of files, hashed (names and contents) so a run knows exactly which
corpus it saw, and split into train and test *by document content*: exact duplicates are
dropped first (and counted), and a document's test membership is a hash of its text — so a
text and its copies (40 symlinks to one README) never sit on both sides, and adding a file
moves no other. The tokenizer — a byte-level BPE trained on a bounded sample of the training
split with the `tokenizers` library, or plain bytes — is saved beside the cached tokens. The token stream is cut into windows of `context + 1` tokens: a window's
first `context` tokens are the input, its last `context` the next-token labels. So a batch
is B windows, chosen by the same (seed, step) schedule as every other data set's examples.

- `stdlib`: the Python standard library's own source files of the running interpreter
  (`sysconfig`'s stdlib folder, *.py, without site-packages and the test suites).
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
from codistill.errors import ConfigError

TEST_EVERY = 10  # one document in ten (by its content's hash) is test
# How documents are split, recorded in the fingerprint and the cache key: tokens cached, or a
# checkpoint trained, under the earlier split by path are another corpus's.
SPLIT_RULE = "content"
# The BPE learns its merges from at most this many characters of training text: its memory grows
# with the text it counts (0.84 GB for 20 MB of Python source, and on), and a few MB give a
# vocabulary of 1024 (docs/language-models.md has the measurements).
TOKENIZER_SAMPLE_CHARS = 8_000_000
ENCODE_CHARS = 4_000_000  # text encoded at a time: only that much of the tokenizer's Encodings is held
logger = logging.getLogger(__name__)


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not {"site-packages", "test", "tests"} & set(f.relative_to(root).parts)]
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


def _windows(stream: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = (len(stream) - 1) // context
    x = stream[:n * context].reshape(n, context)
    y = stream[1:n * context + 1].reshape(n, context)
    return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))


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


def build_corpus(root: Path, files: list[Path], cache_root: Path, tokenizer: str | dict, vocab_size: int,
                 context: int, test_windows: int) -> ArrayDataset:
    digest = corpus_hash(root, files)
    given = folder_tokenizer(tokenizer) if isinstance(tokenizer, dict) else None
    rule = [SPLIT_RULE, TOKENIZER_SAMPLE_CHARS if tokenizer == "bpe" else None]  # tokens cached by another rule differ
    named = given[1] if given else tokenizer  # a folder's tokenizer is named by its files' hash
    key = hashlib.sha256(json.dumps([digest, named, vocab_size, *rule], sort_keys=True).encode()).hexdigest()[:16]
    cache = cache_root / f"text_{key}.npz"
    if not cache.exists():
        train_text, test_text, duplicates = split_documents(_read(files))
        unsplit = not train_text or not test_text  # one or a few documents: the stream is split instead
        if unsplit:
            train_text = train_text + test_text
        if given:
            vocab = len(given[0])
            encode = lambda texts: [np.array(ids, dtype=np.int32)  # noqa: E731
                                    for ids in given[0](texts, add_special_tokens=False)["input_ids"]]
        elif tokenizer == "bytes":
            vocab = 256
            encode = lambda texts: [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]  # noqa: E731
        else:
            bpe = train_tokenizer(train_text, vocab_size)
            vocab = bpe.get_vocab_size()
            cache_root.mkdir(parents=True, exist_ok=True)
            bpe.save(str(cache_root / f"text_{key}.tokenizer.json"))
            encode = lambda texts: [np.array(e.ids, dtype=np.int32) for e in bpe.encode_batch(texts)]  # noqa: E731

        def stream(texts: list[str]) -> np.ndarray:  # a chunk at a time: its Encodings are freed as it goes
            return np.concatenate([ids.astype(np.int32) for chunk in _chunks(texts) for ids in encode(chunk)])

        train_ids = stream(train_text)
        test_ids = train_ids if unsplit else stream(test_text)
        if unsplit:  # the last tenth of the stream is the test part
            cut = len(train_ids) * 9 // 10
            train_ids, test_ids = train_ids[:cut], train_ids[cut:]
        _save_atomically(cache, train=train_ids, test=test_ids, vocab=np.array(vocab), corpus=np.array(digest),
                         files=np.array(len(files)), duplicates=np.array(duplicates))
    d = np.load(cache)
    x, y = _windows(d["train"], context)
    x_test, y_test = _windows(d["test"], context)
    if len(x_test) > test_windows:  # evenly over the test stream, so every part of it counts
        keep = torch.linspace(0, len(x_test) - 1, test_windows).round().long()
        x_test, y_test = x_test[keep], y_test[keep]
    if len(x) == 0 or len(x_test) == 0:
        raise ConfigError("data.context", f"{context} tokens per window is more than the corpus holds "
                                          f"({len(d['train'])} training tokens); lower data.context")
    where = (str(Path(os.path.expanduser(tokenizer["path"]))) if given else
             str(cache_root / f"text_{key}.tokenizer.json") if tokenizer == "bpe" else None)
    data = ArrayDataset(x, y, x_test, y_test, num_classes=int(d["vocab"]), input_kind="tokens", augment=False,
                        tokenizer=where)
    duplicates = int(d["duplicates"])
    if duplicates:  # said at every load, not only the first: a cached corpus is the same corpus
        logger.warning("%s: %d of %d documents are exact copies of another and were left out before the train/test "
                       "split", root, duplicates, int(d["files"]))
    data.fingerprint = {"corpus_sha256": str(d["corpus"]), "files": int(d["files"]), "duplicates": duplicates,
                        "split": SPLIT_RULE, "tokenizer": str(tokenizer), "vocab_size": int(d["vocab"]),
                        **({"tokenizer_sha256": given[1]} if given else {}),
                        "train_tokens": int(len(d["train"])), "test_tokens": int(len(d["test"])), "cache": cache.name}
    return data


@register_dataset("stdlib", input_kind="tokens", num_classes=None, takes_settings=True)
def stdlib(root: Path, augment: bool, download: bool, settings) -> ArrayDataset:
    """The Python standard library's source as a language-model corpus: next-token windows."""
    corpus_root, files = stdlib_files()
    return build_corpus(corpus_root, files, root, settings.tokenizer, settings.vocab_size, settings.context,
                        settings.test_windows)


@register_dataset("text", input_kind="tokens", num_classes=None, takes_settings=True)
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
    else:
        PreTrainedTokenizerFast(tokenizer_file=where).save_pretrained(str(into))
    return True
