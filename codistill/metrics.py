"""Evaluation metrics from the peers' test logits: accuracy, the ensemble's accuracy, churn
(the share of test samples on which two peers disagree, Anil et al. 2018) and, for language
models, bits per token."""

from __future__ import annotations

import math

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


def evaluation_metrics(peer_logits: list[torch.Tensor], labels: torch.Tensor, with_bits: bool = False) -> dict[str, float]:
    if with_bits and bool((labels == IGNORE_INDEX).any()):  # padded positions of token windows count for nothing
        keep = labels != IGNORE_INDEX
        peer_logits, labels = [z[keep] for z in peer_logits], labels[keep]
    accs = [accuracy(z, labels) for z in peer_logits]
    metrics = {f"peer{k}_accuracy": a for k, a in enumerate(accs)}
    metrics.update(mean_accuracy=sum(accs) / len(accs), best_accuracy=max(accs),
                   ensemble_accuracy=ensemble_accuracy(peer_logits, labels), churn=churn(peer_logits))
    if with_bits:  # language models: test loss in bits per token, each peer's and the ensemble's
        metrics.update({f"peer{k}_bits": bits(z.float().log_softmax(-1), labels) for k, z in enumerate(peer_logits)})
        mixture = torch.stack([z.float().log_softmax(-1) for z in peer_logits]).logsumexp(0) - math.log(len(peer_logits))
        metrics["ensemble_bits"] = bits(mixture, labels)
    return metrics
