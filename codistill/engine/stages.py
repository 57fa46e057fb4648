"""Teacher stages: networks a method trains on its frozen teacher before any peer starts
(`Needs.teacher_stages`, e.g. an autoencoder of the teacher's features), trained once per run on
the driver (`prepare_stages`, before the runner starts any peer) and loaded frozen beside the
teacher in every worker (`load_stages`), wherever the peers run.

Each is stored under the student's run, `stages/<name>-<teacher>-<settings>.pt`: `<teacher>` the
start of the sha256 of the teacher file's bytes, `<settings>` of a hash of the stage's settings,
the run's seed and data section. A re-run or a resume finds the file and trains nothing; another
teacher or other settings find another file. The file is written atomically after the stage's
last step (through the run's storage), so a crash mid-stage leaves nothing behind and the next
start trains the stage again from its beginning — a stage is short next to the run it serves.
Its loss per step is beside it, `<same name>.parquet` (step, loss), not in the run's records.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from codistill.config import ExperimentConfig, to_dict
from codistill.data import BatchSchedule, load_data
from codistill.engine.checkpoint import from_bytes, to_bytes
from codistill.engine.seeds import STAGE_INDEX, init_seed, stage_order_seed
from codistill.engine.teacher import load_teacher
from codistill.errors import RunError
from codistill.methods.base import TeacherStage
from codistill.models import MODELS
from codistill.models.taps import capture_taps, tap_shapes
from codistill.storage import RunStorage, read_uri

logger = logging.getLogger(__name__)

STAGES_DIR = "stages"


def teacher_digest(uri: str) -> str:
    """The teacher file's identity: the sha256 of its bytes."""
    return hashlib.sha256(read_uri(uri)).hexdigest()


def stage_file(stage: TeacherStage, digest: str, cfg: ExperimentConfig) -> str:
    """Where `stage` trained on the teacher of sha256 `digest` is stored, relative to the run."""
    keyed = json.dumps({"stage": stage.settings(), "seed": cfg.seed, "data": to_dict(cfg)["data"]}, sort_keys=True)
    return f"{STAGES_DIR}/{stage.name}-{digest[:16]}-{hashlib.sha256(keyed.encode()).hexdigest()[:12]}.pt"


def train_stage(stage: TeacherStage, teacher: nn.Module, paths: dict[str, str], data, seed: int, batch_size: int,
                device: torch.device) -> tuple[nn.Module, dict[str, tuple[int, ...]], list[float]]:
    """`stage` trained on `teacher`'s taps (`paths`) over `stage.steps` batches of the training
    set: (the network, the taps' shapes it was built from, the loss per step)."""
    example = next(data.test_batches(2))[0].to(device)
    shapes = tap_shapes(teacher, paths, example)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(seed, STAGE_INDEX))  # not any peer's
        module = stage.build(shapes).to(device)
    optimizer = stage.optimizer(module.parameters())
    # The stage's own batch order, from the seed (not the peers' order, which it must not consume).
    schedule = BatchSchedule(len(data.y_train), batch_size, stage_order_seed(seed))
    losses = []
    module.train()
    for step in range(stage.steps):
        x, _ = data.train_batch(schedule.indices(step), schedule.generator(step))
        with torch.no_grad(), capture_taps(teacher, paths) as taps:
            teacher(x.to(device))
        loss = stage.loss(module, dict(taps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return module.eval().requires_grad_(False), shapes, losses


def _stage_paths(stage: TeacherStage, cfg: ExperimentConfig) -> dict[str, str]:
    entry = MODELS[cfg.teacher.model]
    return {tap: entry.taps[tap] for tap in stage.taps}


def prepare_stages(cfg: ExperimentConfig, storage: RunStorage) -> None:
    """Train and store every teacher stage of `cfg`'s method that the run does not hold yet (on
    this process, the driver, before any peer starts)."""
    stages = cfg.method.needs.teacher_stages
    if not stages:
        return
    digest = teacher_digest(cfg.teacher.checkpoint)
    missing = []
    for stage in stages:
        relative = stage_file(stage, digest, cfg)
        if storage.exists(relative):
            logger.info("%s stage: found %s/%s, not trained again", stage.name, storage.uri, relative)
        else:
            missing.append((stage, relative))
    if not missing:
        return
    data = load_data(cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(cfg.teacher, data.num_classes, device)
    for stage, relative in missing:
        module, shapes, losses = train_stage(stage, teacher, _stage_paths(stage, cfg), data, cfg.seed,
                                             cfg.data.batch_size, device)
        table = pa.table({"step": list(range(1, len(losses) + 1)), "loss": losses})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes(relative.removesuffix(".pt") + ".parquet", buffer.getvalue())
        # The network last: its file is what says the stage is done.
        storage.write_bytes(relative, to_bytes({
            "state": {k: v.cpu() for k, v in module.state_dict().items()},
            "shapes": {tap: list(shape) for tap, shape in shapes.items()},
            "settings": json.dumps(stage.settings(), sort_keys=True), "teacher": cfg.teacher.checkpoint,
            "teacher_sha256": digest}))
        logger.info("%s stage: trained %d steps on the teacher (loss %.4g → %.4g), stored at %s/%s", stage.name,
                    len(losses), losses[0], losses[-1], storage.uri, relative)


def load_stages(cfg: ExperimentConfig, stages: tuple[TeacherStage, ...],
                device: torch.device) -> list[tuple[TeacherStage, nn.Module]]:
    """Each of `stages` as `prepare_stages` stored it under `cfg`'s run: (stage, its frozen network)."""
    if not stages:
        return []
    storage = RunStorage(cfg.ray.storage_path, cfg.name)
    digest = teacher_digest(cfg.teacher.checkpoint)
    loaded = []
    for stage in stages:
        relative = stage_file(stage, digest, cfg)
        if not storage.exists(relative):
            raise RunError(f"the {stage.name} stage of run {cfg.name!r} is not at {storage.uri}/{relative}: it is "
                           "trained on the teacher before the peers start (`codistill train` does it first)")
        state = from_bytes(storage.read_bytes(relative))
        module = stage.build({tap: tuple(shape) for tap, shape in state["shapes"].items()})
        module.load_state_dict(state["state"])
        loaded.append((stage, module.to(device).eval().requires_grad_(False)))
    return loaded
