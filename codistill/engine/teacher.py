"""Frozen teachers: which weights teach (resolved once on the driver, before anything is
written) and loading them in each worker through the storage layer (so s3:// works on a
cluster), with `weights_only=True`."""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn

from codistill.config import ExperimentConfig, TeacherConfig, load_yaml
from codistill.data import DATASETS
from codistill.engine.checkpoint import (BranchedNetwork, NotOneModel, from_bytes, newest_complete, peer_file,
                                        registered_model)
from codistill.engine.shard_files import check_shards, with_shards
from codistill.errors import ConfigError, first_line
from codistill.models import create_model
from codistill.models.registry import check_model_tokenizer
from codistill.storage import RunStorage, read_uri

RUN_CONFIG_FILE = "config.yaml"


def teacher_run_storage(run: str, storage_path: str) -> RunStorage:
    """A bare name is a run under this run's storage path; anything path-like is the run's folder."""
    if "://" in run or "/" in run or run.startswith(("~", ".")):
        return RunStorage.at(os.path.expanduser(run) if "://" not in run else run)
    return RunStorage(storage_path, run)


def resolve_teacher_config(teacher: TeacherConfig, storage_path: str) -> TeacherConfig:
    """`teacher` with `model` and `checkpoint` filled in from `run` (its newest complete
    checkpoint). Errors name the teacher's key."""
    if teacher.checkpoint is not None or teacher.run is None:  # a file, or a model with its own weights
        return teacher
    storage = teacher_run_storage(teacher.run, storage_path)
    if not storage.exists(RUN_CONFIG_FILE):
        raise ConfigError("teacher.run", f"no codistill run at {storage.uri} (no {RUN_CONFIG_FILE}); "
                          "give a run name under ray.storage_path, or the run folder's path or URI")
    peers = load_yaml(storage.read_bytes(RUN_CONFIG_FILE).decode()).get("peers", [])
    if teacher.peer >= len(peers):
        raise ConfigError("teacher.peer", f"run {storage.uri} has {len(peers)} peers (0..{len(peers) - 1}), "
                          f"got {teacher.peer}")
    folder = newest_complete(storage, teacher.peer)
    if folder is None:
        raise ConfigError("teacher.run", f"run {storage.uri} has no complete checkpoint yet")
    from_run = teacher.model is None  # the run's model, built as the run built it
    return replace(teacher, model=teacher.model or peers[teacher.peer]["model"],
                   model_args=peers[teacher.peer].get("model_args") or {} if from_run else teacher.model_args,
                   checkpoint=f"{storage.uri}/{folder}/{peer_file(teacher.peer)}")


def _same_teacher_asked(asked: TeacherConfig, stored: TeacherConfig) -> bool:
    """Whether `asked` (as the user wrote it) names the teacher `stored` was resolved from."""
    return (asked.checkpoint is None and asked.run == stored.run and asked.peer == stored.peer
            and (asked.model is None or (asked.model, asked.model_args) == (stored.model, stored.model_args)))


def resolve_teacher(cfg: ExperimentConfig, stored: TeacherConfig | None = None) -> ExperimentConfig:
    """`cfg` with its teacher resolved (see `resolve_teacher_config`), after checking the weights
    load into the model and fit the data's classes: before the run writes anything. `stored`:
    the resolved teacher of a run that has trained. A resumed run keeps the teacher it trained
    with, even when the teacher run has a newer checkpoint by now."""
    if cfg.teacher is None:
        return cfg
    resumed = stored is not None and stored.checkpoint is not None and _same_teacher_asked(cfg.teacher, stored)
    teacher = stored if resumed else resolve_teacher_config(cfg.teacher, cfg.ray.storage_path)
    cfg = replace(cfg, teacher=teacher)  # validated again
    classes = DATASETS[cfg.data.name].num_classes
    if classes is not None:  # else known only from the data: checked where the workers load it
        try:
            load_teacher(cfg.teacher, classes, torch.device("cpu"))
        except ConfigError as err:
            if not resumed:
                raise
            cause = err.message.removeprefix(f"cannot load {teacher.checkpoint}: ")
            raise ConfigError("teacher.checkpoint", (
                f"run {cfg.name!r} was trained with the teacher {teacher.checkpoint} (teacher.run {teacher.run!r} "
                f"when it started) and resumes only with it, but it cannot be loaded now ({cause}). Restore that "
                "file, or choose another `name` to start over with the teacher run's newest checkpoint")) from None
    return cfg


def load_teacher(teacher: TeacherConfig, num_classes: int, device: torch.device,
                 tokenizer: str | None = None) -> nn.Module:
    """The teacher's network with its weights, frozen. The file may be a plain state dict of
    `teacher.model` or a codistill peer checkpoint, whose model is the one the file names
    (`checkpoint.registered_model`). Without a file, the model brings its own weights (a
    pretrained folder)."""
    if teacher.checkpoint is None:
        check_model_tokenizer(teacher.model, teacher.model_args, tokenizer, "teacher.model_args")
        return _teacher_model(teacher.model, num_classes, teacher.model_args).to(device).eval().requires_grad_(False)
    try:
        # A split peer's file names its shard folder beside it; checked as a resume checks it.
        state = with_shards(from_bytes(read_uri(teacher.checkpoint)), teacher.checkpoint.rsplit("/", 1)[0])
        check_shards(state)
    except Exception as err:  # noqa: BLE001 — unreadable, truncated, not a weights-only file: all one answer
        raise ConfigError("teacher.checkpoint", f"cannot load {teacher.checkpoint}: "
                          f"{first_line(err, 200)}") from None
    try:
        model, model_args, weights = registered_model(state, teacher.model, teacher.model_args)
    except NotOneModel as err:
        raise ConfigError("teacher.checkpoint" if isinstance(err, BranchedNetwork) else "teacher.model",
                          f"{teacher.checkpoint}: {err}; a teacher is one model (a peer trained across workers)") from None
    network = _teacher_model(model, num_classes, model_args)
    expected = network.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    if missing:
        raise ConfigError("teacher.model", f"the weights in {teacher.checkpoint} are not model {teacher.model!r}'s: "
                          f"{len(missing)} tensors missing (e.g. {missing[0]})")
    for key, value in expected.items():
        if weights[key].shape != value.shape:
            if key.startswith("classifier."):
                raise ConfigError("teacher.model", f"the teacher predicts {weights[key].shape[0]} classes, "
                                  f"the data set has {num_classes}")
            raise ConfigError("teacher.model", f"{key} is {list(weights[key].shape)} in {teacher.checkpoint}, "
                              f"model {teacher.model!r} has {list(value.shape)}")
    network.load_state_dict({k: weights[k] for k in expected})
    return network.to(device).eval().requires_grad_(False)


def _teacher_model(model: str, num_classes: int, model_args: dict) -> nn.Module:
    """The teacher's model; a refusal of its args (output rows fewer than the tokenizer's tokens)
    names the teacher, as a peer's names the peer."""
    try:
        return create_model(model, num_classes, **model_args)
    except ConfigError as err:
        raise (err.under("teacher") if err.path.startswith("model_args") else err) from None
