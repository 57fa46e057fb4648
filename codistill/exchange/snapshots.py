"""Rounds written once to the run's storage: what a round board holds, for peers apart, in place of
a round too large for its share of the board's memory (`exchange.round_board_mb`).

A weights round is the peer's whole state dict — 4 GB for a 1B-parameter fp32 peer — and the
board keeps each peer's rounds for its readers and for a peer that restarts and reads them again
(`2·max_staleness + 2 + 2·⌈checkpoint_every / period⌉` rounds, 24 at the defaults). Held by value
that is ~96 GB per peer in one node's object store. Written here, a round costs the publisher one
write per round and each reader one read, the board keeps a `RoundSnapshot` (a path and a size,
~200 bytes), and the storage holds what the board keeps: on the run's storage, which every node
of a run already sees (its checkpoints are there), and which outlives every peer — as a round of
peers apart must (the others read a crashed peer's last round while it restarts).

Each publication gets a file of its own (`rounds/peer<k>/round_<r>-<id>.pt`): a restarted peer
publishes a round number again, and a reader of the older file must not see it rewritten under
it. The board deletes a snapshot when it drops the round; what is left at the end of a run is
deleted with the folder (`Apart.close`).
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass

import torch

from codistill.storage import RunStorage

logger = logging.getLogger(__name__)

ROUNDS_DIR = "rounds"
"""The folder of a run that holds its rounds' snapshots (peers apart)."""


@dataclass(frozen=True)
class RoundSnapshot:
    """A reference to one round a peer wrote to the run's storage."""

    run_uri: str
    relative: str
    nbytes: int
    """The payload's tensor bytes (what a reader fetches), not the board's cost."""

    def _storage(self) -> RunStorage:
        return RunStorage.at(self.run_uri)

    def read(self) -> dict[str, torch.Tensor]:
        return torch.load(io.BytesIO(self._storage().read_bytes(self.relative)), weights_only=True)

    def delete(self) -> None:
        """Best effort: a snapshot left behind is deleted with the run's rounds folder at its end."""
        try:
            self._storage().delete(self.relative)
        except Exception as err:  # noqa: BLE001 — never fail a board over a file that is already gone
            logger.warning("could not delete the round snapshot %s: %s", self.relative, err)


def write_snapshot(storage: RunStorage, peer: int, round_id: int, payload: dict[str, torch.Tensor],
                   nbytes: int) -> RoundSnapshot:
    """Write `payload` once (atomically: readers never see half a file) and return its reference."""
    relative = f"{ROUNDS_DIR}/peer{peer}/round_{round_id:08d}-{uuid.uuid4().hex[:12]}.pt"
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.write_bytes(relative, buffer.getbuffer())
    return RoundSnapshot(storage.uri, relative, nbytes)
