"""The one training loop. `train_peer` trains one peer (or one data-parallel worker of a peer)
against an `Exchange` and reports through a `RunContext`. The local runner runs it in K
threads; the Ray runner runs it inside each Ray Train worker. Nothing here knows which.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from codistill.config import OptimizerConfig, PeerSpec, TrainConfig
from codistill.data import ArrayDataset, BatchSchedule
from codistill.exchange import Exchange
from codistill.methods import Method
from codistill.metrics import accuracy, evaluation_metrics
from codistill.models import create_model

if TYPE_CHECKING:
    from codistill.engine.rounds import PeriodicTeacher


@dataclass
class Peer:
    index: int
    spec: PeerSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer


def build_peer(index: int, spec: PeerSpec, num_classes: int, seed: int, device: torch.device,
               method: Method) -> Peer:
    """Peer `index`'s network (the registered model, shaped by the method: e.g. ONE's
    branches) and optimizer. The init seed depends on (seed, index) only, so a peer starts
    from the same weights in every runner; different peers start differently, which is what
    makes mutual learning worth anything."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + index)
        model = method.wrap_model(create_model(spec.model, num_classes), spec.model).to(device)
    return Peer(index, spec, model, make_optimizer(spec.optimizer, model.parameters()))


def make_optimizer(cfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def learning_rate(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """A pure function of the step, so a resumed run needs no scheduler state."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "multistep":
        return cfg.lr * 0.1 ** sum(step >= m * total_steps for m in cfg.milestones)
    return cfg.lr


def peer_schedules(cfg, num_examples: int) -> list[BatchSchedule]:
    """Each peer's batch schedule: its own shard of the data when `data.shard`, else one
    schedule all peers share."""
    if not cfg.data.shard:
        return [BatchSchedule(num_examples, cfg.data.batch_size, cfg.seed)]
    return [BatchSchedule(num_examples, cfg.data.batch_size, cfg.seed, shard=k, num_shards=cfg.num_peers)
            for k in range(cfg.num_peers)]


class RunContext:
    """What the loop needs from its runner: resume state, reporting, checkpoints, records."""

    node: str = ""

    def restore(self, peer: int) -> dict | None:
        """The newest checkpoint's state of `peer`, or None for a fresh start."""
        raise NotImplementedError

    def report(self, step: int, metrics: dict, checkpoint: dict | None, records: list[dict]) -> None:
        """Called by every worker at the same steps. `checkpoint` (this peer's state, or None
        on non-leader replicas and on evaluation-only steps) and `records` are saved together."""
        raise NotImplementedError

    def progress(self, step: int, metrics: dict) -> None:
        pass


@dataclass
class PeerJob:
    """Everything one worker trains with. `replica`/`replicas`: this worker's position among
    the data-parallel workers of its peer (each takes one slice of the shared batch)."""

    peer: Peer
    method: Method
    data: ArrayDataset
    schedule: BatchSchedule
    train: TrainConfig
    device: torch.device
    train_model: nn.Module | None = None  # the DDP wrapper when replicas > 1
    replica: int = 0
    replicas: int = 1
    teacher: "PeriodicTeacher | None" = None  # codistillation's stale-peer source

    @property
    def is_leader(self) -> bool:
        return self.replica == 0


PROGRESS_EVERY = 10


def train_step(job: PeerJob, exchange: Exchange, step: int) -> dict:
    """One optimizer step of one peer; returns the record of the step."""
    peer, model = job.peer, job.train_model or job.peer.model
    started = time.perf_counter()
    x, y = job.data.train_batch(job.schedule.indices(step), job.schedule.generator(step))
    if job.replicas > 1:
        x, y = x.chunk(job.replicas)[job.replica], y.chunk(job.replicas)[job.replica]
    x, y = x.to(job.device, non_blocking=True), y.to(job.device, non_blocking=True)
    for group in peer.optimizer.param_groups:
        group["lr"] = learning_rate(peer.spec.optimizer, step, job.train.steps)

    outputs = model(x)
    exchange_seconds = 0.0
    from_peers: list[torch.Tensor] = []
    round_record: dict = {}
    if job.teacher is not None:
        exchange_started = time.perf_counter()
        from_peers, round_record = job.teacher.teacher_logits(step, x)
        exchange_seconds = time.perf_counter() - exchange_started
    elif job.method.uses_peers:
        exchange_started = time.perf_counter()
        gathered = exchange.all_gather(job.method.payload(outputs))
        exchange_seconds = time.perf_counter() - exchange_started
        from_peers = [z for k, z in enumerate(gathered) if k != peer.index]
    loss, terms = job.method.loss(outputs, from_peers, y, step)
    peer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    peer.optimizer.step()
    # A record's step counts the updates done once it is written: this update is number step + 1.
    return {"step": step + 1, "peer": peer.index, "split": "train", "node": None, **terms,
            "lr": peer.optimizer.param_groups[0]["lr"], "exchange_ms": 1000 * exchange_seconds,
            "step_ms": 1000 * (time.perf_counter() - started), "peers_used": len(from_peers), **round_record}


@torch.no_grad()
def predict_test(job: PeerJob, batch_size: int) -> tuple[dict[str, torch.Tensor], str, torch.Tensor]:
    """Test logits of every head of the peer's network (one for a plain model; ONE's
    ensemble and each branch for a multi-branch one), the name of the head that stands for
    the peer, and the labels."""
    model = job.peer.model
    primary = getattr(model, "primary_head", "model")
    model.eval()
    heads: dict[str, list[torch.Tensor]] = {}
    labels = []
    for x, y in job.data.test_batches(batch_size):
        x = x.to(job.device)
        outputs = model.evaluation_heads(x) if hasattr(model, "evaluation_heads") else {"model": model(x)}
        for name, logits in outputs.items():
            heads.setdefault(name, []).append(logits.float().cpu())
        labels.append(y)
    model.train()
    return {name: torch.cat(chunks) for name, chunks in heads.items()}, primary, torch.cat(labels)


def evaluate_peers(job: PeerJob, exchange: Exchange, batch_size: int, step: int) -> tuple[dict, dict]:
    """Every peer's test accuracy, the ensemble's and churn (peers swap test logits), plus
    this peer's test record (with each head's accuracy when its network has several)."""
    heads, primary, labels = predict_test(job, batch_size)
    metrics = {"step": step, **evaluation_metrics(exchange.all_gather(heads[primary]), labels)}
    record = {"step": step, "peer": job.peer.index, "split": "test",
              "accuracy": metrics[f"peer{job.peer.index}_accuracy"],
              "ensemble_accuracy": metrics["ensemble_accuracy"], "churn": metrics["churn"]}
    if len(heads) > 1:  # e.g. ONE's branches beside its gated ensemble
        record.update({f"{name}_accuracy": accuracy(z, labels) for name, z in heads.items() if name != primary})
    return metrics, record


def peer_state(job: PeerJob, step: int) -> dict:
    return {"peer": job.peer.index, "model_name": job.peer.spec.model, "step": step,
            "model": job.peer.model.state_dict(), "optimizer": job.peer.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state()}


def _plain(record: dict) -> dict:
    # Loss terms stay tensors during training so a GPU is not synchronised every step.
    return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}


def train_peer(job: PeerJob, exchange: Exchange, run: RunContext, eval_batch_size: int = 1000) -> dict:
    """Train one peer from its newest checkpoint (or from scratch) to `train.steps`.
    Returns the last evaluation metrics (every peer's accuracy, ensemble accuracy, churn)."""
    cfg, peer = job.train, job.peer
    state = run.restore(peer.index)
    start = 0
    if state is not None:
        peer.model.load_state_dict(state["model"])
        peer.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
    records: list[dict] = []
    metrics: dict = {}
    for step in range(start, cfg.steps):
        record = train_step(job, exchange, step)
        record["node"] = run.node
        records.append(record)
        done = step + 1
        if peer.index == 0 and job.is_leader and (done % PROGRESS_EVERY == 0 or done == cfg.steps):
            run.progress(done, {"loss": float(record["loss"])})
        checkpoint = done == cfg.steps or bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        # Checkpoint steps are evaluated too, so every report carries the metrics (Tune's
        # schedulers read the objective from each one).
        evaluate = checkpoint or done % cfg.eval_every == 0
        if evaluate:
            metrics, test_record = evaluate_peers(job, exchange, eval_batch_size, done)
            records.append({**test_record, "node": run.node})
            if peer.index == 0 and job.is_leader:
                run.progress(done, metrics)
            # Records are handed over only with checkpoints, so disk never runs ahead of a checkpoint.
            run.report(done, metrics,
                       peer_state(job, done) if checkpoint and job.is_leader else None,
                       [_plain(r) for r in records] if checkpoint and job.is_leader else [])
            if checkpoint:
                records = []
    return metrics
