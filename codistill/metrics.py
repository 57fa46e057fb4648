"""Evaluation metrics from the peers' test logits: accuracy, the ensemble's accuracy, churn
(the share of test samples on which two peers disagree, Anil et al. 2018), bits per token, and
the `Score` a task's records are read by (its name, its direction, how it is shown)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""A label that counts for nothing: a padded position of a token window."""


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def ensemble_accuracy(peer_logits: list[torch.Tensor], labels: torch.Tensor) -> float:
    """Accuracy of the mean of the peers' probabilities."""
    probs = torch.stack([z.softmax(-1) for z in peer_logits]).mean(0)
    return accuracy(probs, labels)


def churn(peer_logits: list[torch.Tensor]) -> float:
    """Share of samples on which two peers' top-1 predictions differ (Anil et al. 2018),
    averaged over all pairs of peers."""
    preds = [z.argmax(-1) for z in peer_logits]
    pairs = [(preds[i] != preds[j]).float().mean().item()
             for i in range(len(preds)) for j in range(i + 1, len(preds))]
    return sum(pairs) / len(pairs) if pairs else 0.0


def bits(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean −log2 of the label's probability: bits per token for a language model."""
    return (-log_probs.gather(-1, labels.view(-1, 1)).mean() / math.log(2)).item()


def evaluation_metrics(peer_logits: list[torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """Each peer's accuracy, their mean and best, the ensemble's, and churn (of rows that count:
    a task that ignores rows drops them first, `data/task.py`)."""
    accs = [accuracy(z, labels) for z in peer_logits]
    metrics = {f"peer{k}_accuracy": a for k, a in enumerate(accs)}
    metrics.update(mean_accuracy=sum(accs) / len(accs), best_accuracy=max(accs),
                   ensemble_accuracy=ensemble_accuracy(peer_logits, labels), churn=churn(peer_logits))
    return metrics


def bits_metrics(peer_logits: list[torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """Test loss in bits per token, each peer's and the ensemble's (the mean of their probabilities)."""
    each = [bits(z.float().log_softmax(-1), labels) for z in peer_logits]
    metrics = {f"peer{k}_bits": b for k, b in enumerate(each)}
    # The peers' mean and best beside the ensemble: what a sweep of a language model is judged by.
    metrics.update(mean_bits=sum(each) / len(each), best_bits=min(each))
    mixture = torch.stack([z.float().log_softmax(-1) for z in peer_logits]).logsumexp(0) - math.log(len(peer_logits))
    metrics["ensemble_bits"] = bits(mixture, labels)
    return metrics


@dataclass(frozen=True)
class Score:
    """How a task's group is scored, as every reader of its records shows and compares it: the
    record column (`name`), which way is better, and how it is printed."""

    name: str
    label: str
    """What it is, in words ("bits per token")."""
    title: str
    """A plot's axis: the group's figure a curve follows."""
    lower_is_better: bool
    scale: float
    """Shown as scale × value (accuracy as a percentage)."""
    digits: int
    column: str
    """The summary table's column heading."""

    def better(self, a: float, b: float) -> bool:
        """Whether `a` is at least as good as `b`."""
        return a <= b if self.lower_is_better else a >= b

    def best(self, values, key=None):
        """The best of `values` (by `key`): the fewest bits, the most accuracy."""
        return (min if self.lower_is_better else max)(values, key=key)

    @property
    def mode(self) -> str:
        """Ray Tune's word for the direction: "min" or "max"."""
        return "min" if self.lower_is_better else "max"

    def shown(self, value: float, unit: bool = True) -> str:
        """`value` as the records' readers show it: 94.12% (accuracy), 3.456 bits per token."""
        text = f"{self.scale * value:.{self.digits}f}"
        return text if not unit else text + ("%" if self.scale == 100 else f" {self.label}")


ACCURACY = Score("accuracy", "accuracy", "mean member test accuracy (%)", False, 100, 2, "test acc")
BITS = Score("bits", "bits per token", "mean bits per token", True, 1, 3, "bits/token")
SCORES = {s.name: s for s in (ACCURACY, BITS)}


def score_of(record: dict) -> Score:
    """The score a test record (or a comparison's row) was made under: its `metric` column, or —
    records written before it was kept — bits when it has them."""
    if record.get("metric") in SCORES:
        return SCORES[record["metric"]]
    return BITS if record.get("bits") is not None or record.get("bits_mean") is not None else ACCURACY
