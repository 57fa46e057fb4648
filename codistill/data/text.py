"""Text for language-model peers, real and offline.

A corpus is a sorted list of files, split into train and test *by file* (a file's test
membership is a hash of its relative path, so adding a file moves no other), hashed (names
and contents) so a run knows exactly which corpus it saw. The tokenizer — a byte-level BPE
trained on the training split with the `tokenizers` library, or plain bytes — is saved beside
the cached tokens. The token stream is cut into windows of `context + 1` tokens: a window's
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
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from codistill.data.datasets import ArrayDataset, _save_atomically, register_dataset
from codistill.errors import ConfigError

TEST_EVERY = 10  # one file in ten (by its name's hash) is test


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


def is_test_file(relative: str) -> bool:
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % TEST_EVERY == 0


def corpus_hash(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _read(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's scheme: any byte sequence encodes, nothing is unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _windows(stream: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = (len(stream) - 1) // context
    x = stream[:n * context].reshape(n, context)
    y = stream[1:n * context + 1].reshape(n, context)
    return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))


def build_corpus(root: Path, files: list[Path], cache_root: Path, tokenizer: str, vocab_size: int,
                 context: int, test_windows: int) -> ArrayDataset:
    digest = corpus_hash(root, files)
    key = hashlib.sha256(json.dumps([digest, tokenizer, vocab_size], sort_keys=True).encode()).hexdigest()[:16]
    cache = cache_root / f"text_{key}.npz"
    if not cache.exists():
        train_files = [f for f in files if not is_test_file(str(f.relative_to(root)))]
        test_files = [f for f in files if is_test_file(str(f.relative_to(root)))]
        if not train_files or not test_files:  # a corpus of one or a few files: split the text instead
            train_files = test_files = files
        train_text, test_text = _read(train_files), _read(test_files)
        if tokenizer == "bytes":
            vocab = 256
            encode = lambda texts: [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]  # noqa: E731
        else:
            bpe = train_tokenizer(train_text, vocab_size)
            vocab = bpe.get_vocab_size()
            cache_root.mkdir(parents=True, exist_ok=True)
            bpe.save(str(cache_root / f"text_{key}.tokenizer.json"))
            encode = lambda texts: [np.array(e.ids, dtype=np.int32) for e in bpe.encode_batch(texts)]  # noqa: E731
        train_ids, test_ids = np.concatenate(encode(train_text)), np.concatenate(encode(test_text))
        if train_files is test_files:  # the last tenth of the stream is the test part
            cut = len(train_ids) * 9 // 10
            train_ids, test_ids = train_ids[:cut], train_ids[cut:]
        _save_atomically(cache, train=train_ids.astype(np.int32), test=test_ids.astype(np.int32), vocab=np.array(vocab),
                         corpus=np.array(digest), files=np.array(len(files)))
    d = np.load(cache)
    x, y = _windows(d["train"], context)
    x_test, y_test = _windows(d["test"], context)
    if len(x_test) > test_windows:  # evenly over the test stream, so every part of it counts
        keep = torch.linspace(0, len(x_test) - 1, test_windows).round().long()
        x_test, y_test = x_test[keep], y_test[keep]
    if len(x) == 0 or len(x_test) == 0:
        raise ConfigError("data.context", f"{context} tokens per window is more than the corpus holds "
                                          f"({len(d['train'])} training tokens); lower data.context")
    data = ArrayDataset(x, y, x_test, y_test, num_classes=int(d["vocab"]), input_kind="tokens", augment=False)
    data.fingerprint = {"corpus_sha256": str(d["corpus"]), "files": int(d["files"]), "tokenizer": tokenizer,
                        "vocab_size": int(d["vocab"]), "train_tokens": int(len(d["train"])),
                        "test_tokens": int(len(d["test"])), "cache": cache.name}
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
