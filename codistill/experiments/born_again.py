"""`codistill born-again`: born-again networks (Furlanello et al., ICML 2018).

Generation 0 is the config trained as it is (its own method, no teacher). Generation k is the
same peers with the same recipe and a new initialisation, taught by generation k − 1's newest
checkpoint through `born_again.method` (KD by default). Every generation is an ordinary
codistill run, `<name>-gen<k>`, so a re-run resumes where it stopped and never retrains a
finished generation. At the end each generation's first peer and the ensemble of the
generations so far (the mean of their probabilities) are evaluated on the test split, and the
table is written to `<storage_path>/<name>/generations.parquet`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from codistill.config import ExperimentConfig, TeacherConfig, build_dataclass
from codistill.config.method import MethodConfig
from codistill.data import load_data
from codistill.engine.run import RunResult, train
from codistill.engine.teacher import load_teacher, resolve_teacher_config
from codistill.metrics import accuracy, ensemble_accuracy
from codistill.storage import RunStorage, resolve_storage_path

GENERATIONS_FILE = "generations.parquet"


def default_method() -> MethodConfig:
    """How a generation learns from the one before unless `born_again.method` says otherwise:
    KD at T = 1, α = 0.5 (the paper's born-again networks match the teacher's output)."""
    return build_dataclass(MethodConfig, {"name": "kd", "temperature": 1.0, "alpha": 0.5}, "born_again.method")


@dataclass
class BornAgainResult:
    runs: list[RunResult]
    table: pa.Table
    storage: RunStorage

    @property
    def summary(self) -> str:
        lines = [f"{'generation':<12}{'run':<36}{'peer 0':>9}{'ensemble of 0..k':>18}"]
        for row in self.table.to_pylist():
            lines.append(f"{row['generation']:<12}{row['run']:<36}{100 * row['accuracy']:>8.2f}%"
                         f"{100 * row['ensemble_accuracy']:>17.2f}%")
        return "\n".join(lines)


def generation_config(cfg: ExperimentConfig, k: int, teacher_run: str | None) -> ExperimentConfig:
    name = f"{cfg.name}-gen{k}"
    if k == 0:
        return replace(cfg, name=name, born_again=None)
    return replace(cfg, name=name, born_again=None, method=cfg.born_again.method or default_method(),
                   teacher=TeacherConfig(run=teacher_run, peer=0))


def run_generations(cfg: ExperimentConfig, backend: str = "local", on_progress=None) -> BornAgainResult:
    if cfg.born_again is None:
        raise ValueError("the config has no `born_again` section")
    cfg = replace(cfg, ray=replace(cfg.ray, storage_path=resolve_storage_path(cfg.ray.storage_path)))
    runs: list[RunResult] = []
    for k in range(cfg.born_again.generations):
        teacher_run = runs[-1].storage.uri if runs else None
        runs.append(train(generation_config(cfg, k, teacher_run), backend, on_progress=on_progress))
    table = evaluate_generations(cfg, runs)
    storage = RunStorage(cfg.ray.storage_path, cfg.name)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(GENERATIONS_FILE, buffer.getvalue())
    return BornAgainResult(runs, table, storage)


@torch.no_grad()
def evaluate_generations(cfg: ExperimentConfig, runs: list[RunResult]) -> pa.Table:
    """Each generation's first peer on the test split, and the ensemble of generations 0..k."""
    data = load_data(replace(cfg.data, augment=False))
    labels = data.y_test
    rows, logits = [], []
    for k, run in enumerate(runs):
        # A finished generation is loaded exactly as a teacher is: its newest checkpoint, frozen.
        teacher = resolve_teacher_config(TeacherConfig(run=run.storage.uri, peer=0), cfg.ray.storage_path)
        network = load_teacher(teacher, data.num_classes, torch.device("cpu"))
        logits.append(torch.cat([network(x) for x, _ in data.test_batches(cfg.data.eval_batch_size)]))
        rows.append({"generation": k, "run": run.config.name, "accuracy": accuracy(logits[-1], labels),
                     "ensemble_accuracy": ensemble_accuracy(logits, labels)})
    return pa.Table.from_pylist(rows)
