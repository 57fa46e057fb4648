"""Evaluation of one peer inside the loop: every head the method declares on the test split,
then the peers swap test logits so each reports every peer's accuracy, the ensemble's and
churn, and the group's members (peers, or one network's branches) for comparisons."""

from __future__ import annotations

import torch

from codistill.engine.job import PeerJob
from codistill.errors import RunError
from codistill.metrics import accuracy, evaluation_metrics


class NonFiniteLogits(RunError):
    pass


def check_finite(payloads: list[tuple[int, dict]], step: int) -> None:
    """An accuracy computed from NaN logits is a number that means nothing (argmax of NaN is
    class 0), so no evaluation is reported from them. Every peer checks every peer's logits,
    so all stop together (none waits for the others in the next exchange)."""
    for peer, payload in payloads:
        for name, logits in payload.items():
            if not bool(torch.isfinite(logits).all()):
                rows = int((~torch.isfinite(logits.reshape(-1, logits.shape[-1]))).any(dim=-1).sum())
                raise NonFiniteLogits(f"peer {peer}'s test logits ({name}) are not finite at step {step} (NaN or "
                                      f"infinity in {rows} predictions), so no accuracy is reported and this step "
                                      "is not checkpointed: its weights or its evaluation-mode layers (e.g. a "
                                      "normalisation's running statistics) went bad")


@torch.no_grad()
def predict_test(job: PeerJob, batch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Test logits of every head the method declares for the peer's network (one for a plain
    model; a multi-branch network's ensemble and each branch; the first stands for the peer),
    and the labels."""
    network = job.peer.network
    network.eval()
    heads: dict[str, list[torch.Tensor]] = {}
    labels = []
    for x, y in job.data.test_batches(batch_size):
        with job.autocast():
            outputs = network(x.to(job.device))
        for name, logits in job.method.evaluation_heads(outputs).items():
            heads.setdefault(name, []).append(logits.float().cpu())
        labels.append(y.cpu())
    network.train()
    return {name: torch.cat(chunks) for name, chunks in heads.items()}, torch.cat(labels)


def evaluate_peers(job: PeerJob, batch_size: int, step: int) -> tuple[dict, dict]:
    """Every peer's test accuracy, the ensemble's and churn (peers swap test logits), plus
    this peer's test record (with each head's accuracy when its network has several)."""
    heads, labels = predict_test(job, batch_size)
    primary = next(iter(heads))
    names = job.method.evaluation_members(heads)
    # The members are sent only when they are not just the peer's own head (a language model's
    # test logits are tens of MB: sent once).
    sent = {"logits": heads[primary]} if names == [primary] else {
        "logits": heads[primary], "members": torch.stack([heads[name] for name in names])}
    received = job.exchange.all_gather(sent)
    # Each tensor once: every peer's sent logits (and members), then this peer's other heads
    # (branches beside their ensemble) — a language model's test logits are tens of MB.
    check_finite(list(enumerate(received)), step)
    check_finite([(job.peer.index, {name: z for name, z in heads.items() if name != primary})], step)
    gathered = [{"members": p["logits"][None], **p} for p in received]
    lm = job.data.input_kind == "tokens"
    metrics = {"step": step, **evaluation_metrics([p["logits"] for p in gathered], labels, with_bits=lm)}
    # The group's members: the peers, or the branches of a network that holds several. What a
    # comparison of methods reports, whichever form a method takes.
    group = evaluation_metrics([z for p in gathered for z in p["members"]], labels)
    metrics.update({"member_first_accuracy": group["peer0_accuracy"],
                    **{f"member_{k}": group[k] for k in ("mean_accuracy", "best_accuracy", "ensemble_accuracy", "churn")}})
    record = {"step": step, "peer": job.peer.index, "split": "test",
              "accuracy": metrics[f"peer{job.peer.index}_accuracy"],
              "ensemble_accuracy": metrics["ensemble_accuracy"], "churn": metrics["churn"],
              **{k: v for k, v in metrics.items() if k.startswith("member_")},
              **({"bits": metrics[f"peer{job.peer.index}_bits"], "ensemble_bits": metrics["ensemble_bits"]} if lm else {})}
    if len(heads) > 1:  # e.g. branches beside their ensemble
        record.update({f"{name}_accuracy": accuracy(z, labels) for name, z in heads.items() if name != primary})
    return metrics, record
