"""Evaluation of one peer inside the loop: every head the method declares on the test split,
then the peers swap test logits so each reports every peer's accuracy, the ensemble's and
churn, and the group's members (peers, or one network's branches) for comparisons.

Where the figures come from is the job's evaluation sink, which the layout hands over: the
all-gather of peers in one group (`Gathered`), or — peers that swap nothing every step — a
board each posts its test logits to (`Posted`, around a `Poster`), which writes the group's
figures once every peer has posted that step; each then reports only its own figures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from codistill.data.task import Classes, Task
from codistill.errors import RunError
from codistill.metrics import BITS, accuracy, bits_metrics, evaluation_metrics

if TYPE_CHECKING:  # the job holds its sink: a type only, not an import at run time
    from codistill.engine.job import PeerJob


class Poster(Protocol):
    """Where a peer that swaps nothing every step posts its test logits (and labels) of an
    evaluation step; the board writes the group's figures once every peer has posted it."""

    def post(self, step: int, payload: dict[str, torch.Tensor]) -> None: ...


class EvaluationSink:
    """Where a peer's evaluation goes and the group's figures come from, as the layout decides
    (`evaluate.Gathered`, `evaluate.Posted`): its one verb gives (metrics, test record) of a
    step from this peer's test heads, what it sends (`sent`) and the labels."""

    evaluates_when_finished: bool = False
    """Whether a peer that had already finished evaluates its last step again when re-run."""

    def figures(self, job: PeerJob, heads: dict, sent: dict, labels: torch.Tensor, step: int) -> tuple[dict, dict]:
        raise NotImplementedError


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
        with job.precision.forward():
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
    metrics, record = job.evaluations.figures(job, heads, sent, labels, step)
    if len(heads) > 1:  # e.g. branches beside their ensemble
        record.update({f"{name}_accuracy": accuracy(z, labels) for name, z in heads.items() if name != primary})
    return metrics, record


def _evaluate_together(job: PeerJob, heads: dict, sent: dict, labels: torch.Tensor, step: int) -> tuple[dict, dict]:
    """Peers in one group swap their test logits: every peer reports the group's figures."""
    received = job.exchange.all_gather(sent)
    # Each tensor once: every peer's sent logits (and members), then this peer's other heads
    # (branches beside their ensemble) — a language model's test logits are tens of MB.
    check_finite(list(enumerate(received)), step)
    primary = next(iter(heads))
    check_finite([(job.peer.index, {name: z for name, z in heads.items() if name != primary})], step)
    task = job.data.task
    metrics = {"step": step, **group_figures(received, labels, task)}
    record = {"step": step, "peer": job.peer.index, "split": "test",
              "accuracy": metrics[f"peer{job.peer.index}_accuracy"],
              **{k: metrics[k] for k in GROUP_FIELDS if k in metrics}, **task.peer_record(metrics, job.peer.index)}
    return metrics, record


def _evaluate_on_the_board(job: PeerJob, heads: dict, sent: dict, labels: torch.Tensor, step: int,
                           board: Poster) -> tuple[dict, dict]:
    """A peer with a board evaluates alone: its own figures now; the group's (`GROUP_FIELDS`)
    come from the board once every peer has posted this step."""
    check_finite([(job.peer.index, heads)], step)
    if job.is_leader:
        board.post(step, {**sent, "labels": labels})
    own = job.data.task.score_group([sent["logits"]], labels)
    metrics = {"step": step, f"peer{job.peer.index}_accuracy": own["peer0_accuracy"]}
    record = {"step": step, "peer": job.peer.index, "split": "test", "accuracy": own["peer0_accuracy"],
              **job.data.task.peer_record(own, 0)}
    return metrics, record


class Gathered(EvaluationSink):
    """Peers in one group: the figures through the job's every-step all-gather."""

    def figures(self, job, heads, sent, labels, step):
        return _evaluate_together(job, heads, sent, labels, step)


class Posted(EvaluationSink):
    """Peers apart: each reports its own figures and posts its test logits to `board`, which
    writes the group's. A peer that had finished while another failed, re-run to resume that
    one, posts its last evaluation again: the group's figures of the last step need every
    peer's test logits on this run's board."""

    evaluates_when_finished = True

    def __init__(self, board: Poster):
        self.board = board

    def figures(self, job, heads, sent, labels, step):
        return _evaluate_on_the_board(job, heads, sent, labels, step, self.board)


# What a test record takes from the group's figures beside the peer's own accuracy.
GROUP_FIELDS = ("ensemble_accuracy", "churn", "member_first_accuracy", "member_mean_accuracy", "member_best_accuracy",
                "member_ensemble_accuracy", "member_churn", "ensemble_bits", "member_mean_bits")


def group_figures(payloads: list[dict], labels: torch.Tensor, task: Task | type[Task] = Classes) -> dict:
    """From every peer's test logits (and members), in peer order: each peer's accuracy, the
    mean, best, ensemble and churn (and the task's score: bits for next tokens), and the group's
    members' — the peers, or the branches of a network that holds several: what a comparison of
    methods reports, whichever form a method takes. Over the rows the task counts."""
    metrics = task.score_group([p["logits"] for p in payloads], labels)
    members = [z for p in payloads for z in p.get("members", p["logits"][None])]
    keep = task.counted(labels)
    if keep is not None:
        members, labels = [z[keep] for z in members], labels[keep]
    group = evaluation_metrics(members, labels)
    metrics.update({"member_first_accuracy": group["peer0_accuracy"],
                    **{f"member_{k}": group[k] for k in ("mean_accuracy", "best_accuracy", "ensemble_accuracy", "churn")}})
    if task.score is BITS:  # what a language model's tuning is judged by: the members' mean bits per token
        # (the peers' own, already scored, unless a network holds several members)
        metrics["member_mean_bits"] = (bits_metrics(members, labels)["mean_bits"] if any("members" in p for p in payloads)
                                       else metrics["mean_bits"])
    return metrics
