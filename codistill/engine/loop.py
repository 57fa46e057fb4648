"""The one training loop. `train_peer` trains one peer's job and reports through a
`RunContext`. The local runner runs it in K threads; the Ray runner runs it inside each Ray
Train worker; neither the loop nor the runners know which method they run: a step asks each of
the job's signal sources (built from what the method declared it needs) to fill the step's
`Signals`, then the method turns them into a loss.
"""

from __future__ import annotations

import resource
import time
from dataclasses import replace

import torch

from codistill.engine.checkpoint import load_peer_state, peer_state
from codistill.engine.evaluate import evaluate_peers
from codistill.engine.job import PeerJob, learning_rate
from codistill.engine.sharding import all_finite, local_state_bytes
from codistill.errors import RunError
from codistill.metrics import IGNORE_INDEX
from codistill.methods import Signals
from codistill.models.taps import capture_taps


class RunContext:
    """What the loop needs from its runner: resume state, reporting, checkpoints, records."""

    node: str = ""

    def restore(self, peer: int) -> dict | None:
        """The newest checkpoint's state of `peer`, or None for a fresh start."""
        raise NotImplementedError

    def report(self, step: int, metrics: dict, checkpoint: dict | None, records: list[dict]) -> None:
        """Called by every worker at the same steps. `checkpoint` (this peer's state, or None
        on evaluation-only steps and on a replicated peer's non-leader replicas; every replica of
        a split peer has one: each writes its shards, `checkpoint.write_peer`) and `records` (the
        leader's) are saved together."""
        raise NotImplementedError

    def progress(self, step: int, metrics: dict) -> None:
        pass

    def stopping(self) -> bool:
        """True once the run was asked to stop (Ctrl-C in the local runner)."""
        return False


PROGRESS_EVERY = 10


class _Clock:
    """The wall time of a step's parts, accumulated into its record. On a GPU the device runs
    behind the host, so a part's time is only its own when the clock waits for the device at
    each lap (`sync`, which `codistill bench step` asks for; a training run does not pay it)."""

    def __init__(self, record: dict, sync: torch.device | None):
        self.record, self.sync, self.last = record, sync, time.perf_counter()

    def lap(self, part: str) -> None:
        if self.sync is not None and self.sync.type == "cuda":
            torch.cuda.synchronize(self.sync)
        now = time.perf_counter()
        self.record[part] = self.record.get(part, 0.0) + 1000 * (now - self.last)
        self.last = now


def _rows_kept(signals: Signals, keep: torch.Tensor) -> Signals:
    """`signals` without the rows whose label is IGNORE_INDEX: the logits, labels and every
    row-aligned tensor of the peers' and the teacher's payloads (a row per position), so every
    loss and every KL term of every method leaves them out without knowing of them."""
    rows = len(signals.labels)

    def cut(value):
        return value[keep] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows else value

    return replace(signals, outputs=cut(signals.outputs), logits=cut(signals.logits), labels=signals.labels[keep],
                   peers=[{k: cut(v) for k, v in p.items()} for p in signals.peers],
                   teacher={k: cut(v) for k, v in signals.teacher.items()} if signals.teacher is not None else None)


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory so far: the device's allocations on a GPU, else the process's resident
    set (shared by the local runner's peer threads)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_step(job: PeerJob, step: int) -> dict:
    """One optimizer step of one peer; returns the record of the step."""
    peer = job.peer
    started = time.perf_counter()
    record: dict = {"exchange_ms": 0.0}
    clock = _Clock(record, job.device if job.sync_timing else None)
    indices = job.schedule.indices(step)
    x, y = job.data.train_batch(indices, job.schedule.generator(step))
    x, y, indices = (job.place.batch_slice(t) for t in (x, y, indices))  # this replica's slice
    ignored = job.data.padded_in(indices)  # a padded tail window in this batch (asked on the CPU)
    x, y = x.to(job.device, non_blocking=True), y.to(job.device, non_blocking=True)
    if job.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for group in peer.optimizer.param_groups:
        group["lr"] = learning_rate(peer.spec.optimizer, step, job.train.steps)
    clock.lap("data_ms")

    with job.precision.forward():
        with capture_taps(peer.base, job.tap_paths) as taps:
            outputs = job.train_model(x)
        signals = Signals(network=peer.network, outputs=outputs, logits=job.method.logits(outputs), labels=y,
                          step=step, peer=peer.index, seed=job.seed, taps=taps, indices=indices,
                          label_smoothing=job.train.label_smoothing)
        clock.lap("forward_ms")
        for source in job.sources:
            record.update(source.serve(job, step, x, signals))
            clock.lap(source.timing)
        if ignored:  # after the sources: what a peer sends covers every row, as its peers' do
            signals = _rows_kept(signals, y != IGNORE_INDEX)
        loss, terms = job.method.loss(signals)
    peer.optimizer.zero_grad(set_to_none=True)
    clock.lap("forward_ms")
    if job.train.on_nonfinite == "skip_step" and not torch.isfinite(loss).item():
        peer.optimizer.zero_grad(set_to_none=True)
        record["skipped"] = True  # this step's update is dropped; the run goes on
    else:
        if loss.requires_grad:
            job.precision.backward(loss)
        clock.lap("backward_ms")
        job.precision.optimizer_step(peer.optimizer)
        job.method.after_update(peer.network, step)
        clock.lap("optimizer_ms")
    # A record's step counts the updates done once it is written: this update is number step + 1.
    # `time`: when the step ended (seconds since the epoch), for step rates of peers running apart.
    return {"step": step + 1, "peer": peer.index, "split": "train", "node": None, "time": time.time(), **terms,
            "lr": peer.optimizer.param_groups[0]["lr"], "step_ms": 1000 * (time.perf_counter() - started),
            "peers_used": len(signals.peers), "workers": job.replicas, "peak_memory_mb": peak_memory_mb(job.device),
            "state_mb": sum(local_state_bytes(peer.network, peer.optimizer).values()) / 2**20, **record}


class NonFiniteLoss(RunError):
    pass


def first_nonfinite(records: list[dict]) -> tuple[int, str, float] | None:
    """(step, term, value) of the first non-finite loss term in `records`, or None. One check
    of all the losses at once (a single GPU sync), then a closer look only when one is bad."""
    losses = [r["loss"] for r in records if r["split"] == "train" and not r.get("skipped")]
    if not losses or bool(torch.isfinite(torch.stack([torch.as_tensor(v).float() for v in losses])).all()):
        return None
    for r in records:
        if r["split"] != "train" or r.get("skipped"):
            continue
        terms = [(k, v) for k, v in r.items() if isinstance(v, torch.Tensor) and k != "loss"] + [("loss", r["loss"])]
        for name, value in terms:
            if not bool(torch.isfinite(torch.as_tensor(value)).all()):
                return r["step"], name, float(torch.as_tensor(value).float().flatten()[0])
    return None


def _plain(record: dict) -> dict:
    # Loss terms stay tensors during training so a GPU is not synchronised every step.
    return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}


def train_peer(job: PeerJob, run: RunContext, eval_batch_size: int = 1000) -> dict:
    """Train one peer from its newest checkpoint (or from scratch) to `train.steps`.
    Returns the last evaluation metrics (every peer's accuracy, ensemble accuracy, churn)."""
    state = run.restore(job.peer.index)
    start = load_peer_state(job, state) if state is not None else 0
    loop = PeerLoop(job, run, start, resumed=state is not None, eval_batch_size=eval_batch_size)
    if start == job.train.steps and job.evaluations.evaluates_when_finished:
        loop.metrics, _ = evaluate_peers(job, eval_batch_size, start)
    for step in range(start, job.train.steps):
        loop.step(step)
    return loop.metrics


class PeerLoop:
    """One peer's training from step `start`, in named parts: a step and its record, the watch
    for divergence, progress, and evaluation with its report (and checkpoint). `step` is the
    whole per-step path, which `codistill bench bare` times against a bare PyTorch loop."""

    def __init__(self, job: PeerJob, run: RunContext, start: int, resumed: bool, eval_batch_size: int = 1000):
        self.job, self.run, self.cfg = job, run, job.train
        self.eval_batch_size = eval_batch_size
        self.first = start if resumed else None  # the step whose record says it resumed
        self.records: list[dict] = []  # since the last checkpoint: handed over with the next one
        self.unchecked = 0  # records not yet checked for a non-finite loss
        self.last_checkpoint = start
        self.metrics: dict = {}

    def step(self, step: int) -> dict:
        """Train step `step`, keep its record, and do what falls due after it."""
        job, cfg = self.job, self.cfg
        if self.run.stopping():
            raise KeyboardInterrupt(f"peer {job.peer.index} stopped at step {step}")
        record = train_step(job, step)
        record["node"] = self.run.node
        if step == self.first:
            record["resumed"] = True  # the first step after a restart or a resume: what the summary counts
        self.records.append(record)
        self.unchecked += 1
        done = step + 1
        checkpoint = done == cfg.steps or bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
        # Checkpoint steps are evaluated too, so every report carries the metrics (Tune's
        # schedulers read the objective from each one).
        evaluate = checkpoint or done % cfg.eval_every == 0
        if done % PROGRESS_EVERY == 0 or evaluate:
            self.check_losses()
        if job.peer.index == 0 and job.is_leader and (done % PROGRESS_EVERY == 0 or done == cfg.steps):
            self.run.progress(done, {"loss": float(record["loss"])})
        if checkpoint:
            self.check_weights(done)
        if evaluate:
            self.evaluate_and_report(done, checkpoint)
        return record

    def check_losses(self) -> None:
        """Divergence is looked for where the loop reports anyway, and always before a
        checkpoint: weights that went NaN never overwrite a good checkpoint."""
        bad = first_nonfinite(self.records[-self.unchecked:]) if self.unchecked else None
        self.unchecked = 0
        if bad is not None:
            kept = (f"Nothing after step {self.last_checkpoint} was saved and every checkpoint up to it is kept: re-run "
                    "the same command with --set train.on_nonfinite=skip_step to resume from it dropping such "
                    "steps," if self.last_checkpoint else "No checkpoint was written yet: re-run with --set "
                    "train.on_nonfinite=skip_step to drop such steps,")
            raise NonFiniteLoss(f"peer {self.job.peer.index} diverged: its loss term {bad[1]!r} is {bad[2]} at step "
                                f"{bad[0]}. {kept} or start a new run (another name) with a smaller learning rate.")

    def check_weights(self, done: int) -> None:
        # Skipped steps keep the weights, but a step with a finite loss can still blow them up.
        if not all_finite(self.job.peer.network):
            raise NonFiniteLoss(f"peer {self.job.peer.index}'s weights are not finite at step {done}; nothing after "
                                f"step {self.last_checkpoint} was saved. Start a new run (another name) with a smaller "
                                "learning rate.")

    def evaluate_and_report(self, done: int, checkpoint: bool) -> None:
        job = self.job
        self.metrics, test_record = evaluate_peers(job, self.eval_batch_size, done)
        self.records.append({**test_record, "node": self.run.node})
        if job.peer.index == 0 and job.is_leader:
            self.run.progress(done, self.metrics)
        # Records are handed over only with checkpoints, so disk never runs ahead of a checkpoint.
        leader_saves = checkpoint and job.is_leader
        # A sharded peer's checkpoint is written by all its replicas, each its own shards (a
        # collective: `checkpoint.write_peer`); its leader writes the peer file and the records.
        state = peer_state(job, done) if checkpoint and (job.is_leader or job.sharded) else None
        self.run.report(done, self.metrics, state, [_plain(r) for r in self.records] if leader_saves else [])
        if checkpoint:
            self.records = []
            self.last_checkpoint = done
