"""Records of a run → one Parquet table; the summary table and the accuracy plot.

Each peer writes its own part files (`records/peer{k}/{first:08d}-{last:08d}.parquet`) at
every checkpoint, so what is on disk always matches a checkpoint: a resumed run deletes
the parts written after the checkpoint it resumes from and no step appears twice.

Peers that run apart evaluate alone; the group's figures of an evaluation step (ensemble,
churn, members) are put together once every peer has evaluated it and written as one row in
`records/group/{step:08d}.parquet`; reading the records fills them into the peers' test rows.

Every part is checked where it is read: one that does not read (truncated, empty, not Parquet)
or holds other steps than its name says is one line naming the file, never a traceback — and a
resume checks them all before it trains (`scan_records`): a damaged part is set aside as
`<name>.damaged`, never deleted."""

from __future__ import annotations

import io
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq

from codistill.errors import RunError, first_line
from codistill.metrics import ACCURACY, SCORES, score_of
from codistill.storage import RunStorage

RECORDS_FILE = "records.parquet"
PART = re.compile(r"(\d{8})-(\d{8})\.parquet")
PEER_DIR = re.compile(r"peer(\d+)")
GROUP_DIR = "group"
DAMAGED = ".damaged"  # the suffix of a part set aside because it does not read
logger = logging.getLogger(__name__)


class RecordsError(RunError):
    """A run's record parts do not add up (a part missing or damaged, or two covering the same steps)."""


class DamagedPart(RecordsError):
    """A record part that does not read, or holds other steps than its name says."""

    def __init__(self, path: str, why: str):
        self.path, self.why = path, why
        super().__init__(f"{path} is damaged ({why}): restore it, or re-run the run's train command — the local "
                         "runner then sets it aside and trains its steps again from a checkpoint before them, if one "
                         "is kept")

    def __reduce__(self):
        return type(self), (self.path, self.why)


def _part_name(first: int, last: int) -> str:
    return f"{first:08d}-{last:08d}.parquet"


def write_record_part(storage: RunStorage, peer: int, rows: list[dict]) -> None:
    if not rows:
        return
    # Train and test rows carry different columns; from_pylist would keep only the first row's.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    storage.write_bytes(f"records/peer{peer}/{_part_name(first, last)}", buffer.getvalue())


def write_group_row(storage: RunStorage, row: dict) -> None:
    """The group's figures at one evaluation step of peers that run apart (written again, the
    same, when a restarted peer evaluates that step again)."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row]), buffer)
    storage.write_bytes(f"records/{GROUP_DIR}/{row['step']:08d}.parquet", buffer.getvalue())


def _with_group_rows(storage: RunStorage, table: pa.Table) -> pa.Table:
    """The peers' test rows with the group's figures of their step filled in."""
    names = [n for n in storage.list(f"records/{GROUP_DIR}") if n.endswith(".parquet")]
    if not names:
        return table
    group = {row["step"]: row for name in names
             for row in _read_table(storage, f"records/{GROUP_DIR}/{name}").to_pylist()}
    rows = table.to_pylist()
    for row in rows:
        if row["split"] == "test" and row["step"] in group:
            row.update({k: v for k, v in group[row["step"]].items() if k != "step"})
    columns = list(dict.fromkeys([*table.column_names, *(k for g in group.values() for k in g)]))
    return pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])


def record_parts(storage: RunStorage, folder: str) -> list[tuple[int, int, str]]:
    """(first step, last step, name) of the record parts in `folder`, in step order. Files that
    are not parts (another tool's, an editor's copy) are left alone, with a warning."""
    parts = []
    for name in storage.list(folder):
        match = PART.fullmatch(name)
        if match is None:
            # A write interrupted by a crash leaves only a .tmp; a damaged part was set aside with a warning.
            if not name.endswith((".tmp", DAMAGED)):
                logger.warning("ignoring %s/%s/%s: not a record part (NNNNNNNN-NNNNNNNN.parquet)", storage.uri, folder, name)
            continue
        parts.append((int(match.group(1)), int(match.group(2)), name))
    return sorted(parts)


def drop_records_after(storage: RunStorage, peer: int, step: int) -> None:
    """Delete the parts of `peer` holding steps after `step` (written after the checkpoint we resume from)."""
    for first, _, name in record_parts(storage, f"records/peer{peer}"):
        if first > step:
            storage.delete(f"records/peer{peer}/{name}")


def _read_table(storage: RunStorage, path: str) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(path)))
    except pa.ArrowException as err:  # truncated, empty, not Parquet
        raise DamagedPart(f"{storage.uri}/{path}", f"{type(err).__name__}: {first_line(err, 200)}") from None


def read_part(storage: RunStorage, folder: str, name: str) -> pa.Table:
    """One record part, checked: a DamagedPart naming the file when it does not read or its steps
    are not the ones its name says."""
    first, last = (int(n) for n in PART.fullmatch(name).groups())
    table = _read_table(storage, f"{folder}/{name}")
    steps = table.column("step").to_pylist() if "step" in table.column_names else []
    if not steps or (min(steps), max(steps)) != (first, last):
        held = f"steps {min(steps)}..{max(steps)}" if steps else "no steps"
        raise DamagedPart(f"{storage.uri}/{folder}/{name}", f"it holds {held}, its name says {first}..{last}")
    return table


def scan_records(storage: RunStorage, peer: int) -> tuple[int, str | None, list[str]]:
    """`peer`'s parts, each read: the last step up to which they hold every step from 1 (0: none),
    why they stop there while later steps are recorded (a part missing or damaged; None: they do
    not stop), and the names of the parts that do not read. Two parts holding one step are an
    error: which one to keep is the user's call."""
    folder = f"records/peer{peer}"
    intact, stop, damaged, expected = 0, None, [], 1
    for first, last, name in record_parts(storage, folder):
        if first < expected:
            raise _overlap(f"peer{peer}", first, last, name)
        try:
            read_part(storage, folder, name)
            problem = None
        except DamagedPart as err:
            damaged.append(name)
            problem = f"{err.path} is damaged ({err.why})"
        if stop is None:
            if first > expected:
                stop = f"{storage.uri}/{folder}: steps {expected}..{first - 1} are missing (no part before {name})"
            elif problem:
                stop = problem
            else:
                intact = last
        expected = last + 1
    return intact, stop, damaged


def set_aside(storage: RunStorage, peer: int, name: str) -> str:
    """Move a damaged part out of the records — kept, for whoever can repair or read it — and
    return its new name (`<name>.damaged`; `<name>.2.damaged` … when that is taken)."""
    folder, aside, n = f"records/peer{peer}", f"{name}{DAMAGED}", 1
    while storage.exists(f"{folder}/{aside}"):
        n += 1
        aside = f"{name}.{n}{DAMAGED}"
    storage.move(f"{folder}/{name}", f"{folder}/{aside}")
    return aside


def _overlap(peer_dir: str, first: int, last: int, name: str) -> RecordsError:
    return RecordsError(f"records/{peer_dir}/{name} covers steps {first}..{last}, which an earlier part covers too "
                        "(a copied or stray part?): remove one of them")


def check_parts(peer_dir: str, parts: list[tuple[int, int, str]]) -> None:
    """A peer's parts must cover steps 1.. without a gap or an overlap: each part starts one
    step after the previous one ends."""
    expected = 1
    for first, last, name in parts:
        if first < expected:
            raise _overlap(peer_dir, first, last, name)
        if first > expected:
            raise RecordsError(f"records/{peer_dir}: steps {expected}..{first - 1} are missing (no part "
                               f"before {name}); the records of this run are incomplete")
        expected = last + 1


def read_records(storage: RunStorage) -> pa.Table:
    """All peers' parts as one table sorted by (step, peer, split), or the consolidated file."""
    tables = []
    for peer_dir in storage.list("records"):
        if peer_dir == GROUP_DIR:
            continue
        if PEER_DIR.fullmatch(peer_dir) is None:
            logger.warning("ignoring %s/records/%s: not a peer's folder (peerN)", storage.uri, peer_dir)
            continue
        parts = record_parts(storage, f"records/{peer_dir}")
        check_parts(peer_dir, parts)
        for _, _, name in parts:
            tables.append(read_part(storage, f"records/{peer_dir}", name))
    if not tables:
        if storage.exists(RECORDS_FILE):
            return _read_table(storage, RECORDS_FILE)
        raise FileNotFoundError(f"no records under {storage.uri}")
    table = _with_group_rows(storage, pa.concat_tables(tables, promote_options="default"))
    return table.sort_by([("step", "ascending"), ("peer", "ascending"), ("split", "ascending")])


def consolidate_records(storage: RunStorage) -> pa.Table:
    table = read_records(storage)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(RECORDS_FILE, buffer.getvalue())
    return table


# ---------------------------------------------------------------------------------------------
# Summary and plot


def final_metrics(table: pa.Table) -> dict:
    """The last evaluation: per-peer accuracy, ensemble accuracy, churn."""
    rows = [r for r in table.to_pylist() if r["split"] == "test"]
    if not rows:
        return {}
    last = max(r["step"] for r in rows)
    final = sorted((r for r in rows if r["step"] == last), key=lambda r: r["peer"])
    head_columns = sorted(k for k in final[0] if k.endswith("_accuracy") and k != "ensemble_accuracy"
                          and not k.startswith("member_") and any(r.get(k) is not None for r in final))
    return {
        "step": last,
        "peer_accuracy": [r["accuracy"] for r in final],
        "ensemble_accuracy": final[0]["ensemble_accuracy"],
        "churn": final[0]["churn"],
        # Extra heads of a peer's network (ONE's branches), per peer.
        "head_accuracy": {k[:-len("_accuracy")]: [r[k] for r in final] for k in head_columns},
        # The group's members (the peers, or one network's branches): first, mean, best, ensemble, churn.
        "members": {k[len("member_"):]: v for k, v in final[0].items() if k.startswith("member_") and v is not None},
        # The task's own score beside accuracy (bits per token for next tokens), per peer and the ensemble's.
        **({"score": score.name, f"peer_{score.name}": [r[score.name] for r in final],
            f"ensemble_{score.name}": final[0].get(f"ensemble_{score.name}")}
           if (score := score_of(final[0])) is not ACCURACY else {}),
    }


def trained_step(table: pa.Table) -> int:
    """The step every peer's training records reach (0: none)."""
    last: dict[int, int] = {}
    for r in table.to_pylist():
        if r["split"] == "train":
            last[r["peer"]] = max(last.get(r["peer"], 0), r["step"])
    return min(last.values(), default=0)


def summary_text(table: pa.Table, peer_models: list[str] | None = None, unfinished: str | None = None) -> str:
    """The final evaluation as a table; `unfinished`: a line saying the run has not finished,
    put first (its last evaluation is then not the run's final one)."""
    final = final_metrics(table)
    if not final:
        return "\n".join([*([unfinished] if unfinished else []), "no evaluation recorded"])
    score = SCORES.get(final.get("score"))  # the task's score beside accuracy (bits per token), if any

    def scored(values: list, k: int) -> str:
        return f"{score.scale * values[k]:>13.{score.digits}f}" if score and values[k] is not None else ""

    lines = [*([unfinished] if unfinished else []),
             f"{'last' if unfinished else 'final'} evaluation at step {final['step']}",
             f"{'peer':<6}{'model':<22}{'test acc':>10}" + (f"{score.column:>13}" if score else "")]
    for k, acc in enumerate(final["peer_accuracy"]):
        model = peer_models[k] if peer_models else ""
        lines.append(f"{k:<6}{model:<22}{100 * acc:>9.2f}%" + (scored(final[f"peer_{score.name}"], k) if score else ""))
    for head, values in final["head_accuracy"].items():
        for k, acc in enumerate(values):
            lines.append(f"{k:<6}{'  ' + head:<22}{100 * acc:>9.2f}%")
    accs = final["peer_accuracy"]
    lines.append(f"{'mean':<28}{100 * sum(accs) / len(accs):>9.2f}%")
    if final["ensemble_accuracy"] is None:  # peers apart, one of which did not evaluate this step
        lines.append(f"{'ensemble, churn':<28}{'n/a':>10}  (not every peer evaluated step {final['step']})")
    else:
        lines.append(f"{'ensemble':<28}{100 * final['ensemble_accuracy']:>9.2f}%"
                     + (scored([final[f"ensemble_{score.name}"]], 0) if score else ""))
        lines.append(f"{'churn':<28}{100 * final['churn']:>9.2f}%")
    lines.extend(peer_run_lines(table))
    if "skipped" in table.column_names:
        skipped = sum(1 for v in table.column("skipped").to_pylist() if v)
        if skipped:
            lines.append(f"{skipped} step(s) skipped for a non-finite loss (train.on_nonfinite: skip_step)")
    return "\n".join(lines)


def peer_run_lines(table: pa.Table) -> list[str]:
    """What peers that ran apart (a Ray Train run each) went through: each peer's resumes from a
    checkpoint, and the steps it distilled without a given peer (it was away, or too far behind
    or ahead)."""
    lines = []
    train = [r for r in table.to_pylist() if r["split"] == "train"]
    for peer in sorted({r["peer"] for r in train}):
        mine = [r for r in train if r["peer"] == peer]
        resumed = sorted(r["step"] - 1 for r in mine if r.get("resumed"))
        if resumed:
            lines.append(f"peer {peer} resumed from its checkpoint {len(resumed)} time(s), at step(s) "
                         + ", ".join(map(str, resumed)))
        without: dict[str, int] = {}
        for r in mine:
            for other in (r.get("missing_peers") or "").split(","):
                if other:
                    without[other] = without.get(other, 0) + 1
        for other, steps in sorted(without.items()):
            lines.append(f"peer {peer} distilled {steps} step(s) without peer {other}")
    return lines


def plot_accuracy(table: pa.Table, storage: RunStorage, filename: str = "accuracy.png") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table.to_pylist() if r["split"] == "test"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for peer in sorted({r["peer"] for r in rows}):
        mine = [r for r in rows if r["peer"] == peer]
        ax.plot([r["step"] for r in mine], [100 * r["accuracy"] for r in mine], label=f"peer {peer}")
    ensemble = [r for r in rows if r["peer"] == 0 and r.get("ensemble_accuracy") is not None]
    ax.plot([r["step"] for r in ensemble], [100 * r["ensemble_accuracy"] for r in ensemble], "k--", label="ensemble")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(filename, buffer.getvalue())
    return storage.path(filename)
