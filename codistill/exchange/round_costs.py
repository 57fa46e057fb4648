"""What a weights round costs through each way a round board can carry it, beside the physical
anchor — a bare `ray.put` + `ray.get` of the same tensors in the same process — for
`codistill bench rounds` (which imports no ray itself: the timing lives beside the boards).

Arms, each one round as a peer pays it (publish, one board call, fetch), in a group of one that
reads its own publication, so nothing waits for another peer:

- `bare`: `ray.get(ray.put(state_dict))`, no board;
- `whole`: the group board's round trip (`ObjectStorePeriodicExchange`) of the whole state dict;
- `pieces`: the state dict split into M pieces by bytes, each its own publisher's round trip —
  as M ranks of a sharded peer would each publish their shard (here one after the other, in one
  process: the sum of the M calls, not their overlap);
- `snapshot`: the lasting board's path for a round beyond its share (`LastingRoundHandle` with
  `round_board_mb: 0`): written once to the run's storage (a local folder here), read back.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import ray
import torch

from codistill.exchange.base import payload_bytes
from codistill.exchange.round_board import GroupRoundBoard, LastingRoundBoard, LastingRoundHandle, \
    ObjectStorePeriodicExchange
from codistill.storage import RunStorage


def split_by_bytes(state: dict[str, torch.Tensor], pieces: int) -> list[dict[str, torch.Tensor]]:
    """`state`'s tensors in `pieces` groups of about equal bytes (whole tensors, in order)."""
    total, groups, size = payload_bytes(state), [{} for _ in range(pieces)], 0
    for name, t in state.items():
        groups[min(pieces - 1, int(pieces * size / total))][name] = t
        size += t.numel() * t.element_size()
    return [g for g in groups if g]


def time_weights_round(state: dict[str, torch.Tensor], pieces: list[int], repeats: int) -> dict[str, list[float]]:
    """Seconds per round of each arm, `repeats` times, the arms in rotating order each repeat (so
    that a drifting machine affects them alike; the caller pairs repeat i of each)."""
    state = {n: t.detach().contiguous() for n, t in state.items()}
    parts = {m: split_by_bytes(state, m) for m in pieces}
    # A group of one per publication (a group's join waits for all its peers), each arm its own:
    # piece k reads itself back.
    groups = {name: [GroupRoundBoard.remote(1) for _ in payloads]
              for name, payloads in (("whole", [state]), *((f"pieces_{m}", parts[m]) for m in pieces))}
    handles = {name: [ObjectStorePeriodicExchange(board, 0) for board in boards] for name, boards in groups.items()}
    folder = tempfile.mkdtemp(prefix="codistill-rounds-")
    lasting = LastingRoundBoard.remote(1, 0)
    snapshots = LastingRoundHandle(lasting, 0, 1, RunStorage(folder, "bench"), 0)
    round_id = [0]

    def bare():
        ray.get(ray.put(state))

    def through(handle, payload):
        handle.round_trip(round_id[0], 0, payload, [0], round_id[0], round_id[0], 30.0, keep=2)

    arms = {"bare": bare, "whole": lambda: through(handles["whole"][0], state),
            **{f"pieces_{m}": (lambda m=m: [through(handles[f"pieces_{m}"][k], piece) for k, piece in enumerate(parts[m])])
               for m in pieces},
            "snapshot": lambda: through(snapshots, state)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for repeat in range(repeats + 2):  # two warm-up repeats
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            started = time.perf_counter()
            arms[name]()
            if repeat >= 2:
                times[name].append(time.perf_counter() - started)
        round_id[0] += 1
    for actor in (*[b for boards in groups.values() for b in boards], lasting):
        ray.kill(actor)
    shutil.rmtree(folder, ignore_errors=True)
    return times
