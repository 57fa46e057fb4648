"""What a data set asks its peers to learn — its task — declared by the data, and asked by
everything that would otherwise ask "is this a language model".

- `Classes(num_classes)`: a row is an example with one label; a group is scored by accuracy.
- `NextToken(vocab, fingerprint)`: a row is one position of a token window, labelled with the
  next token, or IGNORE_INDEX (−100) where there is none (a padded tail) — such rows count in no
  loss, KL term or metric; a group is scored by bits per token (fewer is better: the direction
  every curve, target and paired difference reads), beside top-1 accuracy; above
  `exchange.top_k_above` tokens peers send top-k targets unasked; its `Fingerprint` says which
  corpus, split, packing and tokenizer made the ids, and where the tokenizer is.

Every text corpus is packed by one rule, `pack`: end-of-text after every document, the stream
cut into windows, the last window padded with labels that count for nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar, Sequence

import numpy as np
import torch

from codistill.metrics import ACCURACY, BITS, IGNORE_INDEX, Score, bits_metrics, evaluation_metrics

TOKENS = "tokens"
"""The input kind of token windows (`ArrayDataset.input_kind`, a model's `input_kind`)."""
AUTO_TOP_K = 64
"""The k peers send when the vocabulary is above `exchange.top_k_above` and `top_k` is not set."""
PACKING = "end-of-text after each document, tail padded"
"""The packing rule (`pack`), in every text corpus's fingerprint and cache key: tokens cached, or
a checkpoint trained, under another rule are other windows."""
OLD_TEXT_PACKING = "stream cut into windows, no end-of-text, tail dropped"
"""How `text`/`stdlib` corpora were packed before `PACKING` (fingerprints that do not say)."""


@dataclass(frozen=True)
class Fingerprint:
    """What exactly a text corpus's ids are: kept in every checkpoint, so a run resumes only on
    the same ids. Equal fingerprints are the same ids; the fields marked `compare=False` say
    where things are or are counts the others decide, and may differ between machines."""

    corpus_sha256: str
    split: str
    packing: str
    tokenizer_sha256: str | None
    """The tokenizer's files' hash (None: bytes, which need no file)."""
    vocab_size: int
    train_tokens: int
    test_tokens: int
    files: int = field(default=0, compare=False)
    duplicates: int = field(default=0, compare=False)
    tokenizer: str = field(default="", compare=False)
    """The `data.tokenizer` setting that made it (`bpe`, `bytes`, or a folder's mapping)."""
    tokenizer_place: str | None = field(default=None, compare=False)
    """Where the tokenizer is on the machine that loaded the corpus: a folder, or a `tokenizers`
    JSON file (None: bytes). What `codistill export` ships, without loading the corpus."""
    cache: str = field(default="", compare=False)

    def as_dict(self) -> dict:
        """Plain values, as a checkpoint holds them (read back with `weights_only`)."""
        return asdict(self)

    def __getitem__(self, key: str):  # read as the dict it was before it had a type
        return getattr(self, key)

    @classmethod
    def from_dict(cls, saved: dict) -> "Fingerprint":
        """A checkpoint's fingerprint. Those written before a field was kept: split by path, and
        packed as their corpus was then (an `hf_text` corpus already by `PACKING`)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in saved.items() if k in known}
        values.setdefault("split", "path")
        values.setdefault("packing", PACKING if str(saved.get("cache", "")).startswith("hf_text_") else OLD_TEXT_PACKING)
        values.setdefault("tokenizer_sha256", None)
        for key in ("vocab_size", "train_tokens", "test_tokens"):
            values.setdefault(key, 0)
        return cls(**values)

    def difference(self, saw: "Fingerprint") -> str | None:
        """How the ids a checkpoint was trained on (`saw`) differ from these, in one clause (None:
        the same ids)."""
        if saw.corpus_sha256 != self.corpus_sha256:
            return (f"was trained on corpus {saw.corpus_sha256[:12]} ({saw.files} files), but the data is now corpus "
                    f"{self.corpus_sha256[:12]} ({self.files} files): the files changed since")
        if saw.split != self.split:
            return (f"was trained on corpus {saw.corpus_sha256[:12]} split into train and test by {saw.split}, but it "
                    f"is now split by {self.split}: the test documents differ")
        if saw.packing != self.packing:
            return (f"was trained on windows packed as '{saw.packing}', but they are now packed as '{self.packing}' "
                    "(tokens cached under the old rule are rebuilt): the windows differ")
        if saw.tokenizer_sha256 != self.tokenizer_sha256:
            return (f"was trained on ids of tokenizer {_short(saw.tokenizer_sha256)}, but the tokenizer is now "
                    f"{_short(self.tokenizer_sha256)} (at {self.tokenizer_place or 'bytes'}): the same ids would mean "
                    "other text")
        if self != saw:
            return (f"was trained on {saw.train_tokens} training and {saw.test_tokens} test tokens of a "
                    f"{saw.vocab_size}-token vocabulary, but the data now has {self.train_tokens} and "
                    f"{self.test_tokens} of {self.vocab_size}: the cached tokens changed since")
        return None


def _short(sha: str | None) -> str:
    return sha[:16] if sha else "bytes (no tokenizer file)"


class Task:
    """What a row is and how a group of peers is scored (see the module docstring)."""

    input_kind: ClassVar[str | None] = None
    """The input kind the task fixes (None: the data says: sequences or images)."""
    score: ClassVar[Score] = ACCURACY
    ignore_index: ClassVar[int | None] = None
    """The label of a row that counts for nothing (None: every row counts)."""
    size_decides_top_k: ClassVar[bool] = False
    """Whether a large output (a vocabulary) makes peers send top-k targets unasked: the driver
    then loads the data to say so before anything starts."""
    fingerprint: Fingerprint | None = None
    row_unit: ClassVar[str] = "examples"
    """What a row of logits is, in words: what a batch is counted in (a gradient noise scale)."""

    @property
    def size(self) -> int:
        raise NotImplementedError

    @property
    def tokenizer(self) -> str | None:
        """Where the tokenizer the ids come from is (None: no tokenizer, or bytes)."""
        return self.fingerprint.tokenizer_place if self.fingerprint else None

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        """A batch's labels as the rows of logits the model makes."""
        return y

    def rows(self, batch: torch.Tensor) -> int:
        """How many rows of logits a batch of inputs makes."""
        return batch.shape[0]

    @classmethod
    def counted(cls, labels: torch.Tensor) -> torch.Tensor | None:
        """Which rows count (None: all of them)."""
        if cls.ignore_index is None or not bool((labels == cls.ignore_index).any()):
            return None
        return labels != cls.ignore_index

    @classmethod
    def score_group(cls, peer_logits: list[torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
        """The group's figures (`metrics.evaluation_metrics`, and the task's score) over the rows
        that count. A classmethod: a board that only knows the data set's task kind scores too."""
        keep = cls.counted(labels)
        if keep is not None:
            peer_logits, labels = [z[keep] for z in peer_logits], labels[keep]
        metrics = evaluation_metrics(peer_logits, labels)
        if cls.score is BITS:
            metrics.update(bits_metrics(peer_logits, labels))
        return metrics

    @classmethod
    def peer_record(cls, figures: dict, peer: int) -> dict:
        """What a peer's test record carries of `score_group`'s figures (peer `peer`'s): the
        score's name (`metric`, what every reader asks) and, beside accuracy, its own value."""
        name = cls.score.name
        return {"metric": name, **({name: figures[f"peer{peer}_{name}"]} if name != "accuracy" else {})}

    def default_top_k(self, top_k_above: int) -> int:
        """The k of the top-k targets peers send when `exchange.top_k` is not set (0: whole logits)."""
        return 0


@dataclass(frozen=True)
class Classes(Task):
    num_classes: int

    @property
    def size(self) -> int:
        return self.num_classes


@dataclass(frozen=True)
class NextToken(Task):
    vocab: int
    fingerprint: Fingerprint | None = None
    end_of_text: int | None = None
    """The id that ends each document (None: data made elsewhere, packed by its maker)."""

    input_kind: ClassVar[str] = TOKENS
    row_unit: ClassVar[str] = TOKENS
    score: ClassVar[Score] = BITS
    ignore_index: ClassVar[int] = IGNORE_INDEX
    size_decides_top_k: ClassVar[bool] = True

    @property
    def size(self) -> int:
        return self.vocab

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        # A label per position, flattened as the model flattens its logits (B·T rows), so every
        # loss and metric of a classifier applies per position unchanged.
        return y.reshape(-1)

    def rows(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * batch.shape[1]

    def default_top_k(self, top_k_above: int) -> int:
        # 16 × 512 positions of a 32,000-token vocabulary are 1 GB of fp32 a step.
        return AUTO_TOP_K if top_k_above and self.vocab > top_k_above else 0


def task_of(input_kind: str | None, num_classes: int) -> Task:
    """The task data of this input kind declares when it names none."""
    return NextToken(num_classes) if input_kind == TOKENS else Classes(num_classes)


def token_stream(documents: Sequence[Sequence[int]], end_of_text: int) -> np.ndarray:
    """The documents' ids one after another, each followed by `end_of_text` (int32 ids stay int32)."""
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    values = np.concatenate([np.asarray(d) for d in documents]) if len(documents) else np.zeros(0, dtype=np.int64)
    return stream_of_flat(values, lengths, end_of_text)


def stream_of_flat(values: np.ndarray, lengths: np.ndarray, end_of_text: int) -> np.ndarray:
    """`token_stream` of documents given flat (their ids concatenated) with their lengths."""
    ends = np.cumsum(lengths + 1) - 1
    stream = np.empty(len(values) + len(lengths), dtype=np.result_type(values.dtype, np.int32))
    ids = np.ones(len(stream), dtype=bool)
    ids[ends] = False
    stream[ids], stream[ends] = values, end_of_text
    return stream


def windows(stream: np.ndarray, context: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of `context` tokens over a stream and their next-token labels; the last window
    padded on the right with `pad`, its positions with no next token labelled IGNORE_INDEX."""
    count = -(-(len(stream) - 1) // context)
    size = count * context + 1
    inputs, labels = np.full(size, pad, dtype=np.int64), np.full(size, IGNORE_INDEX, dtype=np.int64)
    inputs[:len(stream)], labels[:len(stream)] = stream, stream
    return (torch.from_numpy(inputs[:-1].reshape(count, context)),
            torch.from_numpy(labels[1:].reshape(count, context)))


def pack(documents: Sequence[Sequence[int]], context: int, end_of_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packing of every text corpus (`text`, `stdlib`, `hf_text`, a given `datasets.Dataset`):
    each document's ids followed by `end_of_text`, the stream cut into windows of `context`
    inputs whose labels are the next tokens; the last window padded with `end_of_text` on the
    right, its positions with no next token labelled −100 (they count in no loss or metric).
    (A corpus builder packs its cached stream with `windows`: the same rule.)

    >>> x, y = pack([[5, 6, 7], [8, 9]], context=3, end_of_text=0)
    >>> x.tolist(), y.tolist()
    ([[5, 6, 7], [0, 8, 9]], [[6, 7, 0], [8, 9, 0]])
    >>> x, y = pack([[5, 6, 7, 8]], context=3, end_of_text=0)
    >>> x.tolist(), y.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[6, 7, 8], [0, -100, -100]])
    """
    return windows(token_stream(documents, end_of_text), context, end_of_text)
