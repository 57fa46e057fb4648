"""What a resume does with records that stop short of its checkpoint: a record part damaged
(truncated, empty, not Parquet) or missing.

Every part is read before anything trains. A run resumed past such a part would train to the
end and then fail to gather its records — every time — so instead:

- the local runner goes back to the newest checkpoint whose steps every peer's records hold
  (the later checkpoints and parts belong to a training that is thrown away, as when a
  checkpoint does not load), sets the damaged parts aside as `<name>.damaged` (never
  deleted) and says so in one line; with no such checkpoint kept, it refuses in one line;
- the Ray runner resumes only from its newest checkpoint, so it refuses in one line.

A damaged part after the checkpoint resumed from (written, never committed) is set aside too."""

from __future__ import annotations

import logging

from codistill.engine.checkpoint import CHECKPOINT_DIR, newest_complete, newest_loadable
from codistill.records import RecordsError, scan_records, set_aside
from codistill.storage import RunStorage

logger = logging.getLogger(__name__)


def _short(storage: RunStorage, scans: list, steps: list[int]) -> tuple[int, str] | None:
    """(the last step its records hold, why) of the peer whose records stop furthest before the
    step it resumes from (`steps[k]`, from `scans[k]`: `scan_records`), or None: none stops short."""
    short = [(intact, stop or f"{storage.uri}/records/peer{k} hold steps up to {intact} only")
             for k, (intact, stop, _) in enumerate(scans) if intact < steps[k]]
    return min(short) if short else None


def _set_aside(storage: RunStorage, scans: list) -> str:
    """Every damaged part set aside; what was moved, for the line that says so."""
    moved = [f"records/peer{k}/{set_aside(storage, k, name)}" for k, (_, _, damaged) in enumerate(scans)
             for name in damaged]
    return f"; set aside: {', '.join(moved)}" if moved else ""


def local_resume_point(storage: RunStorage, folders: list[tuple[int, str]], num_peers: int):
    """The local runner's checkpoint to resume from, as `newest_loadable`: the newest of `folders`
    that loads, or — when the records stop short of it — the newest before where they stop."""
    scans = [scan_records(storage, k) for k in range(num_peers)]
    found = newest_loadable(storage, folders, num_peers)
    short = _short(storage, scans, [found[0]] * num_peers) if found else None
    if short is not None:
        limit, why = short
        found = newest_loadable(storage, [(step, f) for step, f in folders if step <= limit], num_peers)
        if found is None:
            raise RecordsError(f"{why}, and no checkpoint before step {limit + 1} is kept to train those steps again "
                               "from: restore the file, or train the run again under another `name`")
    moved = _set_aside(storage, scans)
    if short is not None:
        logger.warning("%s: the run resumes from step %d, the newest checkpoint whose steps every peer's records "
                       "hold%s", short[1], found[0], moved)
    elif moved:
        logger.warning("damaged record parts after the checkpoint the run resumes from%s", moved)
    return found


def check_ray_resume(storage: RunStorage, num_peers: int) -> None:
    """Before a Ray run resumes: every peer's records hold the steps of its newest checkpoint."""
    scans = [scan_records(storage, k) for k in range(num_peers)]
    folders = [newest_complete(storage, k) for k in range(num_peers)]
    steps = [int(CHECKPOINT_DIR.fullmatch(f.rsplit("/", 1)[-1]).group(1)) if f else 0 for f in folders]
    short = _short(storage, scans, steps)
    if short is not None:
        raise RecordsError(f"{short[1]}, but a Ray run resumes only from its newest checkpoint (step {max(steps)}): "
                           "restore the file, or train the run again under another `name`")
    moved = _set_aside(storage, scans)
    if moved:
        logger.warning("damaged record parts after the run's newest checkpoint%s", moved)
