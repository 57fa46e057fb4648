"""What a run meets that its config did not say (issue 43, the low items): a top-k no smaller than
the classes, a private Ray instance that times out starting, a tokens cache a killed process
left half written in data.root — and, for language models (`-k hf`), a model with fewer
positions than data.context and the object-store refusal's arithmetic."""

from __future__ import annotations

import os
import time

import pytest

from codistill.config import ConfigError, load_config
from tests.conftest import REPO, small_config
from tests.test_hostile_inputs import _last_err_line


# -- exchange.top_k not below the classes: whole logits, said ---------------------------------

def test_a_top_k_not_below_the_classes_sends_whole_logits_and_says_so(tmp_path, caplog):
    from codistill.data.task import Classes
    from codistill.engine.job import exchanged_top_k, top_k_note
    from codistill.engine.ray.runner import check_exchange

    cfg = small_config(tmp_path, "exchange.top_k=64", base="configs/codistill_mnist1d.yaml")
    assert exchanged_top_k(cfg, Classes(10)) == 0  # top-64 of 10 classes is all of them: 124,000 bytes a round, not 80,000
    assert exchanged_top_k(cfg, Classes(100)) == 64  # below the classes: the top-k asked for
    assert exchanged_top_k(small_config(tmp_path, "exchange.top_k=10", base="configs/codistill_mnist1d.yaml"), Classes(10)) == 0
    assert top_k_note(cfg, 10, 0) == ("exchange.top_k=64 is not below the 10 classes (the vocabulary): peers send "
                                      "whole logits, the same distribution in fewer bytes")
    with caplog.at_level("WARNING"):  # on the driver too, before anything starts (a worker's log may not show)
        check_exchange(cfg, object_store=2**30)
    assert "exchange.top_k=64 is not below the 10 classes" in caplog.text


# -- a private Ray instance that times out starting ------------------------------------------

def test_a_ray_start_up_that_times_out_is_one_line(tmp_path, capsys, monkeypatch):
    import ray

    from codistill.cli import main

    def init(**kwargs):  # what Ray 2.60 raises when its node does not come up within 30 s
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["train", f"{REPO}/configs/dml_mnist1d.yaml", "--set", f"ray.storage_path={tmp_path}"])
    last = _last_err_line(capsys)
    assert code == 1 and last.startswith("error: the private Ray instance did not start: The current node timed "
                                         "out during startup"), last
    assert "--backend local" in last


# -- a tokens cache a killed process left half written ----------------------------------------

def test_a_half_written_tokens_cache_a_killed_process_left_is_deleted_and_a_live_one_is_not(tmp_path):
    from codistill.data.hf_text import ABANDONED_S, _clear_abandoned_writes

    left, live, other = tmp_path / "tmpab12cd34", tmp_path / "tmpzz99yy88", tmp_path / "hf_text_1234_train.arrow"
    for path in (left, live, other):
        path.write_bytes(b"\xff" * 100)
    long_ago = time.time() - ABANDONED_S - 60
    os.utime(left, (long_ago, long_ago))  # a kill -9 mid-map, long ago
    os.utime(other, (long_ago, long_ago))  # a finished cache: never touched
    _clear_abandoned_writes(tmp_path)
    assert not left.exists() and live.exists() and other.exists()  # another process may be writing `live` now


# -- language models: positions, and the object store's arithmetic -----------------------------

GPT2_8_POSITIONS = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 8}


def corpus_file(tmp_path):
    import json

    from tests.test_hf import documents

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": text}) + "\n" for text in documents(60)))
    return path


def test_hf_a_model_with_fewer_positions_than_the_context_names_both(tmp_path):
    pytest.importorskip("transformers")
    from tests.test_hf import hf_config

    from codistill.engine.run import train

    cfg = hf_config(tmp_path, corpus_file(tmp_path))
    cfg["peers"] = [{"model": "hf_causal_lm", "model_args": {"config": GPT2_8_POSITIONS}}] * 2
    with pytest.raises(ConfigError) as info:
        train(load_config(cfg), "local")
    assert info.value.path == "peers.0.model" and "the model has 8 positions, fewer than the 16 tokens" in str(info.value)
    assert "data.context=16" in str(info.value) and "index out of range" not in str(info.value)


def test_hf_the_object_store_refusal_counts_rounds_and_a_run_inside_burn_in_is_not_refused(tmp_path):
    pytest.importorskip("transformers")
    from tests.test_hf import hf_config

    from codistill.engine.ray.runner import check_exchange

    path = corpus_file(tmp_path)

    def forced(**method):
        return load_config({**hf_config(tmp_path, path, method={"name": "codistill", "period": 50, **method}),
                            "exchange": {"top_k_above": 0}})

    with pytest.raises(ConfigError, match=r"GB a round per peer .*; 1 round of 2 peers \("):
        check_exchange(forced(max_staleness=0), object_store=4 * 2**20)
    check_exchange(forced(burn_in=100), object_store=4 * 2**20)  # 4 steps, all inside burn_in: no round is sent
