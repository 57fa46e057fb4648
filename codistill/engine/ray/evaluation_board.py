"""The evaluation board of peers apart (Ray): where each peer posts its test logits of an
evaluation step, and which writes the group's figures of that step once every peer has posted
it (`evaluate.Posted` is a peer's sink around its `BoardPoster`)."""

from __future__ import annotations

import ray

from codistill.data.task import Task
from codistill.engine.evaluate import GROUP_FIELDS, group_figures
from codistill.exchange.base import Payload
from codistill.records import write_group_row
from codistill.storage import RunStorage


@ray.remote(num_cpus=0)
class EvaluationBoard:
    """Every peer's test logits of an evaluation step, until all have posted it; then the group's
    figures of that step go to the run's records and the logits are dropped."""

    def __init__(self, num_peers: int, run_uri: str, task: type[Task]):
        self.num_peers = num_peers
        self.storage = RunStorage.at(run_uri)
        self.task = task  # the data set's kind of task: how the group is scored
        self.pending: dict[int, dict[int, Payload]] = {}

    def post(self, step: int, peer: int, payload: Payload) -> None:
        posted = self.pending.setdefault(step, {})
        posted[peer] = payload
        if len(posted) < self.num_peers:
            return
        del self.pending[step]
        payloads = [posted[k] for k in range(self.num_peers)]
        figures = group_figures(payloads, payloads[0]["labels"], self.task)
        write_group_row(self.storage, {"step": step, **{k: figures[k] for k in GROUP_FIELDS if k in figures}})


class BoardPoster:
    """A peer's handle on the evaluation board (a `job.Poster`, which `evaluate.Posted` posts to)."""

    def __init__(self, board: "ray.actor.ActorHandle", peer: int):
        self.board, self.peer = board, peer

    def post(self, step: int, payload: Payload) -> None:
        # Waited for: the figures are written before the peer's checkpoint of this step is.
        ray.get(self.board.post.remote(step, self.peer, {name: t.detach().cpu() for name, t in payload.items()}))
