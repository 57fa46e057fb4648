"""Peers that run apart: for a method that exchanges in rounds (`Needs.rounds`: codistillation),
each peer is its own Ray Train run — its own worker group of its own size, `FailureConfig`,
checkpoints (`<run>/peer<k>/step_…`) and restarts — as Anil et al. (2018) intend: peers that
meet only every `period` steps need not live and die together.

What they share outlives them all and lives on the driver's node:
- the round board (`PublicationCoordinator(apart=True)`): the only state of the training they
  share. A peer that is away (crashed and restarting, or not started yet) costs each other peer
  one wait of `wait_timeout_s`, then it is left out (recorded as `missing_peers`) until it has a
  usable round again;
- the evaluation board (`EvaluationBoard`): peers evaluate alone; once every peer has evaluated
  a step, the board writes the group's figures of that step (ensemble, churn, members), which the
  records fill into the peers' test rows.

The engine chooses this layout from the method's declared needs (`runs_apart`), never from its
name; every-step methods cannot run apart (each step waits for every peer's payload)."""

from __future__ import annotations

import ray

from codistill.config import ExperimentConfig
from codistill.engine.evaluate import GROUP_FIELDS, group_figures
from codistill.exchange.base import Exchange, Payload
from codistill.methods import create_method
from codistill.records import write_group_row
from codistill.storage import RunStorage


def runs_apart(cfg: ExperimentConfig) -> bool:
    """Whether the Ray runner runs each peer of `cfg` as its own Ray Train run: the method
    declares rounds, and `ray.layout` is auto."""
    return create_method(cfg.method).needs.rounds is not None and cfg.ray.layout == "auto"


@ray.remote(num_cpus=0)
class EvaluationBoard:
    """Every peer's test logits of an evaluation step, until all have posted it; then the group's
    figures of that step go to the run's records and the logits are dropped."""

    def __init__(self, num_peers: int, run_uri: str, with_bits: bool):
        self.num_peers = num_peers
        self.storage = RunStorage.at(run_uri)
        self.with_bits = with_bits
        self.pending: dict[int, dict[int, Payload]] = {}

    def post(self, step: int, peer: int, payload: Payload) -> None:
        posted = self.pending.setdefault(step, {})
        posted[peer] = payload
        if len(posted) < self.num_peers:
            return
        del self.pending[step]
        payloads = [posted[k] for k in range(self.num_peers)]
        figures = group_figures(payloads, payloads[0]["labels"], with_bits=self.with_bits)
        write_group_row(self.storage, {"step": step, **{k: figures[k] for k in GROUP_FIELDS if k in figures}})


class BoardExchange(Exchange):
    """The evaluation exchange of a peer that runs apart: it posts, it never waits for the others."""

    lock_step = False

    def __init__(self, board: "ray.actor.ActorHandle", peer: int, num_peers: int):
        self.board, self.peer, self.num_peers = board, peer, num_peers

    def post(self, step: int, payload: Payload) -> None:
        # Waited for: the figures are written before the peer's checkpoint of this step is.
        ray.get(self.board.post.remote(step, self.peer, {name: t.detach().cpu() for name, t in payload.items()}))
