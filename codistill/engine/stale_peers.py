"""The signal source of methods that exchange in rounds (codistillation): every `period`
steps a peer publishes what its peers need to distil from it, and takes the newest
publication of every other peer, waiting only when one is more than `max_staleness` rounds old.

- predictions: at the start of round r a peer predicts (eval mode) on the batches of rounds
  r … r + max_staleness of every peer's schedule, so that a block up to `max_staleness`
  rounds old still covers the batch a peer trains on now. One block per round.
- weights: the peer publishes its state dict; the others load it into a stale copy of its
  network and predict on their own batch each step (the paper's scheme).

A peer sharded over its M workers (`train.sharding: fsdp`) publishes a round in M pieces, one
per worker: predictions on the worker's own rows of every batch, or the worker's own shard of
the weights. A reader whose pieces are cut alike (its worker m needs the publisher's rows or shard
m) fetches its own piece alone, and a sharded peer's stale copy of another is sharded as it is
itself, each worker loading its shard: no worker gathers a whole model to exchange it. Where the
two peers are cut otherwise (one replicated, or sharded over another number of workers) the
reader fetches every piece and makes the whole, then keeps its own rows or shard of it. A
replicated peer's first worker publishes the whole, its other workers only read.

What is published is the method's own payload (named tensors), so any method that declares
`Needs.rounds` is served, not one method by name. `StalePeers` holds the round mechanics; the
two subclasses say what a round publishes and how a received publication becomes this step's
payload; `stale_peers_source` picks one by `RoundSpec.publish`.
"""

from __future__ import annotations

import logging
import time

import torch

from codistill.config import ExperimentConfig, PeerSpec
from codistill.data import BatchSchedule
from codistill.engine.sharding import blocks_of, fully_sharded, load_weights, local_shards
from codistill.engine.sources import SignalSource
from codistill.exchange import PeriodicExchange
from codistill.exchange.base import Piece, Pieces
from codistill.methods import RoundSpec
from codistill.models import create_model


logger = logging.getLogger(__name__)


def warn_of_checkpoints_inside_rounds(cfg: ExperimentConfig) -> None:
    """A round's publications come from each peer's weights at the round's start; a checkpoint
    inside a round holds later weights, so a run resumed from it publishes that round again
    from them and goes on differently from an uninterrupted one (still a valid codistillation,
    not the same numbers). Said once, before the run, where the user sees it."""
    rounds = cfg.method.needs.rounds
    every = cfg.train.checkpoint_every
    if rounds is None or not every or every % rounds.period == 0:
        return
    below = every - every % rounds.period  # the nearest multiples (0 is none)
    fitting = [str(v) for v in (below, below + rounds.period) if v > 0]
    logger.warning("train.checkpoint_every=%d is not a multiple of the method's period (%d): a run resumed from a "
                   "checkpoint inside a round publishes that round again from later weights and does not equal an "
                   "uninterrupted run; %s resume exactly", every, rounds.period, " or ".join(fitting))


class StalePeers(SignalSource):
    """Rounds: when one starts, publish and take every other peer's newest publication."""

    def __init__(self, periodic: PeriodicExchange, spec: RoundSpec, peer_specs: tuple[PeerSpec, ...],
                 schedules: list[BatchSchedule]):
        self.periodic = periodic
        self.spec = spec
        self.peer_specs = peer_specs
        self.schedules = schedules  # every peer's schedule (the same one K times when not sharded)
        self.round: int | None = None
        self.received: dict[int, tuple[int, object]] = {}
        self.stale_networks: dict[int, torch.nn.Module] = {}
        self.round_info: dict = {}
        self.missing: str | None = None

    def publication(self, job, round_id: int):
        """What this worker publishes at the start of round `round_id`: its piece (`piece`) — the
        whole for a replicated peer's first worker, the only one of its workers asked (`_start_round`)."""
        raise NotImplementedError

    def piece(self, job) -> Piece:
        """This worker's piece of its peer's publications: its own under sharding (and of a
        publication in as many pieces, its own alone serves it: worker m of every peer trains on
        rows m of a batch, and a stale copy sharded as this peer is holds shard m), else the whole."""
        return Piece(job.place.replica, job.place.replicas, alone=True) if job.sharded else Piece()

    def received_publication(self, job, peer: int, publication):
        """Called with each peer's publication as it arrives; returns what `payload_now` gets of it."""
        return publication

    def payload_now(self, job, step: int, x: torch.Tensor, peer: int, published_round: int, publication) -> dict:
        """Peer `peer`'s payload on this step's batch `x`, from its publication of `published_round`."""
        raise NotImplementedError

    def _start_round(self, job, round_id: int) -> None:
        started = time.perf_counter()
        me = job.peer.index
        # Every worker of a sharded peer publishes its piece; of a replicated one, the first the whole
        # (its replicas hold the same weights) and the others only read.
        payload = self.publication(job, round_id) if job.sharded or job.place.is_leader else None
        predicted = time.perf_counter()
        others = [peer for peer in range(len(self.peer_specs)) if peer != me]
        sent, entries = self.periodic.round_trip(round_id, me, payload, others, round_id - self.spec.max_staleness,
                                                 self.max_round(round_id), self.spec.wait_timeout_s,
                                                 keep=self._keep(job), piece=self.piece(job))
        missing = []
        for peer in others:
            entry = entries[peer]
            if entry is None:
                missing.append(peer)
                self.received.pop(peer, None)
                continue
            self.received[peer] = (entry[0], self.received_publication(job, peer, entry[1]))
        self.round = round_id
        self.missing = ",".join(map(str, missing)) or None
        self.round_info = {
            "round": round_id,
            "staleness_rounds": max((round_id - r for r, _ in self.received.values()), default=None),
            "bytes_sent": sent,
            "predict_ms": 1000 * (predicted - started),  # the teacher pass (predictions) or the state copy
            "wait_ms": 1000 * (time.perf_counter() - predicted),  # publishing, waiting for late peers, fetching
            "round_ms": 1000 * (time.perf_counter() - started),
        }

    def _keep(self, job) -> int:
        """The rounds of this peer the board keeps: a reader is at most max_staleness rounds
        behind (it waits), so 2·max_staleness + 2 suffice, and what the round handle keeps for a
        peer that restarts (`PeriodicExchange.rounds_kept_for_restart`)."""
        span = job.train.checkpoint_every or job.train.steps
        return 2 * self.spec.max_staleness + 2 + self.periodic.rounds_kept_for_restart(self.spec.period, span)

    def max_round(self, round_id: int) -> int | None:
        """The newest round of another peer this round may use: this one (its publication must
        cover this peer's batches)."""
        return round_id

    def serve(self, job, step, x, signals):
        """The other peers' stale payloads on this step's batch; the round's record fields on the
        step that starts a round, and on every step the peers it distils without (`missing_peers`).
        Rounds that end before `burn_in` exchange nothing."""
        round_id = step // self.spec.period
        if (round_id + 1) * self.spec.period <= self.spec.burn_in:
            return {}
        info = {}
        if self.round != round_id:
            self._start_round(job, round_id)
            info = self.round_info
        signals.peers = [self.payload_now(job, step, x, peer, published_round, publication)
                         for peer, (published_round, publication) in self.received.items()]
        return {**info, "missing_peers": self.missing}


class StalePredictions(StalePeers):
    """A round publishes this peer's payload on every peer's batches of the coming rounds."""

    def _window_steps(self, round_id: int) -> range:
        period = self.spec.period
        return range(round_id * period, (round_id + self.spec.max_staleness + 1) * period)

    @torch.no_grad()
    def publication(self, job, round_id: int) -> dict[str, torch.Tensor]:
        """This peer's payload on every peer's coming batches: each tensor (schedules, window steps,
        B, …) — under sharding B is this worker's rows (`MeshPlace.batch_slice`) and all the
        workers predict together, each on its own."""
        rows = job.place.batch_slice if job.sharded else (lambda t: t)
        network = job.peer.network
        steps = self._window_steps(round_id)
        network.eval()
        blocks: dict[str, list[torch.Tensor]] = {}
        for schedule in self.schedules:
            batches = [rows(job.data.train_batch(schedule.indices(s), schedule.generator(s))[0]) for s in steps]
            payload = job.method.payload(network(torch.cat(batches).to(job.device)), {})
            for name, t in payload.items():
                t = t.cpu()  # in the compute dtype: bf16 halves the bytes of a round
                blocks.setdefault(name, []).append(t.view(len(steps), -1, *t.shape[1:]))
        network.train()
        return {name: torch.stack(parts) for name, parts in blocks.items()}

    def received_publication(self, job, peer, publication):
        """(whether its rows are this worker's already, the tensors)."""
        if not isinstance(publication, Pieces):
            return False, publication
        if len(publication.parts) == 1:
            return True, next(iter(publication.parts.values()))
        parts = [publication.parts[i] for i in range(publication.count)]  # the rows of every worker, in order
        return False, {name: torch.cat([p[name] for p in parts], dim=2) for name in parts[0]}

    def payload_now(self, job, step, x, peer, published_round, publication):
        mine, tensors = publication
        shard = job.peer.index if len(self.schedules) > 1 else 0
        here = {}
        for name, t in tensors.items():
            z = t[shard, step - published_round * self.spec.period]
            here[name] = (z if mine else job.place.batch_slice(z)).to(x.device)  # this worker's rows
        return here


class StaleWeights(StalePeers):
    """A round publishes this peer's weights; the others predict with a stale copy each step."""

    def max_round(self, round_id):
        # Weights serve any batch: where the handle says so, a peer that fell behind distils from
        # the others' newest weights, even rounds ahead of its own.
        return None if self.periodic.weights_from_newer_rounds else round_id

    def publication(self, job, round_id):
        # A copy: the live tensors keep training while the others read this snapshot. A sharded
        # peer's worker publishes its own shards (nothing gathered).
        if job.sharded:
            return local_shards(job.peer.network)
        return {k: v.detach().cpu().clone() for k, v in job.peer.network.state_dict().items()}

    def received_publication(self, job, peer, publication):
        # What is kept is the stale copy (sharded like this peer), not the publication.
        pieces = publication.parts if isinstance(publication, Pieces) else {0: publication}
        own = isinstance(publication, Pieces) and len(pieces) == 1 < publication.count
        load_weights(self._stale_network(job, peer), [pieces[i] for i in sorted(pieces)], own)
        return None

    def _stale_network(self, job, peer: int) -> torch.nn.Module:
        """A copy of peer `peer`'s network, built as its method builds it, to load its weights into;
        sharded over this peer's workers as this peer is (frozen: resharded after each forward)."""
        if peer not in self.stale_networks:
            spec = self.peer_specs[peer]
            base = create_model(spec.model, job.data.num_classes, **spec.model_args)
            network = job.method.build_network(base, spec.model).to(job.device)
            if job.sharded:
                fully_sharded(network, blocks_of(spec.model, base), job.place.replica_mesh,
                              job.precision.sharding_policy(), frozen=True)
            self.stale_networks[peer] = network.eval()
        return self.stale_networks[peer]

    @torch.no_grad()
    def payload_now(self, job, step, x, peer, published_round, publication):
        return job.method.payload(self.stale_networks[peer](x), {})


def stale_peers_source(periodic: PeriodicExchange, spec: RoundSpec, peer_specs: tuple[PeerSpec, ...],
                       schedules: list[BatchSchedule]) -> StalePeers:
    source = {"predictions": StalePredictions, "weights": StaleWeights}[spec.publish]
    return source(periodic, spec, peer_specs, schedules)
