"""Checkpoint files carry their format (`CHECKPOINT_FORMAT`), and every reader goes through one
`upgrade`: an old peer file is read as today's, a file of a newer codistill is refused in one line."""

from __future__ import annotations

import io

import pytest
import torch

from codistill.engine.checkpoint import CHECKPOINT_FORMAT, from_bytes, registered_model, saved_model, upgrade
from codistill.errors import RunError


def _bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _format_1_file(**extra) -> dict:
    """A peer file as codistill wrote it before the format was: no `format`, no `base_prefix`, no
    model name, a data fingerprint without its split or packing."""
    weights = {"model.0.weight": torch.ones(2, 2), "model.0.bias": torch.zeros(2)}
    return {"peer": 0, "step": 40, "model": weights, "optimizer": {"state": {}, "param_groups": []},
            "torch_rng": torch.get_rng_state(), **extra}


def test_a_format_1_peer_file_is_read_as_todays():
    state = from_bytes(_bytes(_format_1_file(data={"corpus_sha256": "abc", "files": 3})))
    assert state["format"] == CHECKPOINT_FORMAT
    assert state["base_prefix"] == "model."  # every weight under "model.": a wrapped model
    assert state["model_name"] is None and saved_model(state, "mnist1d_mlp", {}) == ("mnist1d_mlp", {})
    assert state["data"]["split"] == "path" and state["data"]["corpus_sha256"] == "abc"  # the fields' defaults
    name, args, weights = registered_model(state, "mnist1d_mlp", {})
    assert name == "mnist1d_mlp" and set(weights) == {"0.weight", "0.bias"}


def test_a_file_written_today_is_left_as_it_is_and_other_files_are_not_touched():
    today = {**_format_1_file(), "format": CHECKPOINT_FORMAT, "base_prefix": "", "model_name": "m", "model_args": {}}
    assert upgrade(today) is today
    plain = {"0.weight": torch.ones(1)}  # a plain state dict, and a run's meta file
    meta = {"step": 3, "config": {}}
    assert from_bytes(_bytes(plain)).keys() == plain.keys() and upgrade(meta) is meta


def test_a_peer_file_of_a_newer_format_is_refused_in_one_line():
    with pytest.raises(RunError, match=f"format {CHECKPOINT_FORMAT + 1} was written by a newer codistill"):
        from_bytes(_bytes({**_format_1_file(), "format": CHECKPOINT_FORMAT + 1}))
