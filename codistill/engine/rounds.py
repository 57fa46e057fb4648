"""Codistillation's side of the loop: every `period` steps a peer publishes what its peers
need to distil from it, and takes the newest publication of every other peer, waiting only
when one is more than `max_staleness` rounds old.

- predictions: at the start of round r a peer predicts (eval mode) on the batches of rounds
  r … r + max_staleness of every peer's schedule, so that a block up to `max_staleness`
  rounds old still covers the batch a peer trains on now. One block per round.
- weights: the peer publishes its state dict; the others load it into a stale copy of its
  model and predict on their own batch each step (the paper's scheme).
"""

from __future__ import annotations

import time

import torch

from codistill.config import PeerSpec
from codistill.data import BatchSchedule
from codistill.exchange.rounds import RoundBoard
from codistill.models import create_model


class PeriodicTeacher:
    def __init__(self, job, board: RoundBoard, config, peer_specs: tuple[PeerSpec, ...],
                 schedules: list[BatchSchedule]):
        self.job = job
        self.board = board
        self.config = config
        self.peer_specs = peer_specs
        self.schedules = schedules  # every peer's schedule (the same one K times when not sharded)
        self.others = [k for k in range(len(peer_specs)) if k != job.peer.index]
        self.round: int | None = None
        self.received: dict[int, tuple[int, object]] = {}
        self.stale_models: dict[int, torch.nn.Module] = {}
        self.round_info: dict = {}

    def _window_steps(self, round_id: int) -> range:
        period = self.config.period
        return range(round_id * period, (round_id + self.config.max_staleness + 1) * period)

    @torch.no_grad()
    def _predict_window(self, round_id: int) -> torch.Tensor:
        """(schedules, window steps, B, C) logits of this peer on every peer's coming batches."""
        job, model = self.job, self.job.peer.model
        steps = self._window_steps(round_id)
        model.eval()
        blocks = []
        for schedule in self.schedules:
            batches = [job.data.train_batch(schedule.indices(s), schedule.generator(s))[0] for s in steps]
            logits = model(torch.cat(batches).to(job.device)).float().cpu()
            blocks.append(logits.view(len(steps), -1, logits.shape[-1]))
        model.train()
        return torch.stack(blocks)

    def _start_round(self, round_id: int) -> None:
        started = time.perf_counter()
        me = self.job.peer.index
        if self.config.exchange == "predictions":
            payload = self._predict_window(round_id)
        else:
            # A copy: the live tensors keep training while the others read this snapshot.
            payload = {k: v.detach().cpu().clone() for k, v in self.job.peer.model.state_dict().items()}
        predicted = time.perf_counter()
        sent = self.board.publish(round_id, me, payload)
        published = time.perf_counter()
        missing = []
        for peer in self.others:
            entry = self.board.newest(peer, round_id - self.config.max_staleness, round_id, self.config.wait_timeout_s)
            if entry is None:
                missing.append(peer)
                self.received.pop(peer, None)
                continue
            self.received[peer] = entry
            if self.config.exchange == "weights":
                self._stale_model(peer).load_state_dict(entry[1])
        self.round = round_id
        self.round_info = {
            "round": round_id,
            "staleness_rounds": max((round_id - r for r, _ in self.received.values()), default=None),
            "bytes_sent": sent,
            "predict_ms": 1000 * (predicted - started),  # the teacher pass (predictions) or the state copy
            "wait_ms": 1000 * (time.perf_counter() - published),
            "round_ms": 1000 * (time.perf_counter() - started),
            "missing_peers": ",".join(map(str, missing)) or None,
        }

    def _stale_model(self, peer: int) -> torch.nn.Module:
        if peer not in self.stale_models:
            model = create_model(self.peer_specs[peer].model, self.job.data.num_classes).to(self.job.device)
            self.stale_models[peer] = model.eval()
        return self.stale_models[peer]

    def teacher_logits(self, step: int, x: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        """The other peers' stale logits on this step's batch, and what the round recorded
        (only on the step that started a round). Rounds that end before `burn_in` exchange
        nothing: their distillation weight is zero."""
        round_id = step // self.config.period
        if (round_id + 1) * self.config.period <= self.config.burn_in:
            return [], {}
        info = {}
        if self.round != round_id:
            self._start_round(round_id)
            info = self.round_info
        logits = []
        for peer, (published_round, payload) in self.received.items():
            if self.config.exchange == "predictions":
                shard = self.job.peer.index if len(self.schedules) > 1 else 0
                z = payload[shard, step - published_round * self.config.period]
                if self.job.replicas > 1:  # this worker trains on one slice of the batch
                    z = z.chunk(self.job.replicas)[self.job.replica]
                logits.append(z.to(x.device))
            else:
                with torch.no_grad():
                    logits.append(self.stale_models[peer](x))
        return logits, info
