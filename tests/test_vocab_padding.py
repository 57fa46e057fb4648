"""Vocabulary paddings over one tokenizer (`-k padding`): Hugging Face peers and a teacher whose
output layers have different numbers of rows (Qwen2.5-0.5B has 151,936, Qwen2.5-7B 152,064 over
one tokenizer) train together — every model's logits are cut to the tokenizer's tokens before
any distribution meets another — and a model with fewer rows than the tokenizer has tokens is
refused in one line naming both sizes and whose model it is. Tiny Llama configs built here,
nothing downloaded."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from codistill.config import load_config
from tests.test_hf import LLAMA, corpus, hf_config  # noqa: F401 — corpus: the shared module fixture

transformers = pytest.importorskip("transformers")


def padded(rows: int) -> dict:
    return {"model": "hf_causal_lm", "model_args": {"config": {**LLAMA, "vocab_size": rows}},
            "optimizer": {"name": "adamw", "lr": 0.003}}


@pytest.fixture(scope="module")
def vocab(corpus, tmp_path_factory):  # noqa: F811
    from codistill.data import load_data

    return load_data(load_config(hf_config(tmp_path_factory.mktemp("vocab"), corpus[0])).data).num_classes


def teacher_folder(path, rows: int):
    from codistill.models import create_model

    create_model("hf_causal_lm", rows, config={**LLAMA, "vocab_size": rows}).model.save_pretrained(path)
    return str(path)


@pytest.mark.slow  # three tiny trainings over a corpus built first: the full tier
@pytest.mark.parametrize("method", [{"name": "dml"}, {"name": "codistill", "period": 2, "burn_in": 0},
                                    {"name": "codistill", "period": 2, "burn_in": 0, "publish": "weights"}],
                         ids=["dml", "codistill_predictions", "codistill_weights"])
def test_padding_peers_padded_differently_over_one_tokenizer_learn_from_each_other(corpus, vocab, tmp_path, method):  # noqa: F811
    """One peer unpadded, one padded by 36 rows: their payloads (and, publishing weights, the
    stale copy of the padded peer each builds) meet over the tokenizer's tokens."""
    from codistill.engine.run import train

    cfg = hf_config(tmp_path, corpus[0], method=method)
    cfg["peers"] = [padded(vocab), padded(vocab + 36)]
    result = train(load_config(cfg), backend="local")
    kl = [r["kl"] for r in result.records.to_pylist() if r["split"] == "train"]
    assert kl and all(math.isfinite(v) for v in kl) and max(kl) > 0  # a distillation term was taken
    assert len(result.final["peer_bits"]) == 2 and all(math.isfinite(b) for b in result.final["peer_bits"])


@pytest.mark.slow  # a corpus, then one tiny KD training: the full tier
def test_padding_a_teacher_padded_otherwise_than_its_students_teaches_them(corpus, vocab, tmp_path):  # noqa: F811
    """A pretrained teacher folder of vocab + 64 rows (no tokenizer of its own: its size is checked
    when it is built) teaching students of vocab and vocab + 8 rows, with top-k targets."""
    from codistill.engine.run import train
    from codistill.models import create_model

    folder = teacher_folder(tmp_path / "teacher", vocab + 64)
    logits = create_model("hf_causal_lm", vocab, path=folder)(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (10, vocab)  # the padded rows cut away
    cfg = hf_config(tmp_path, corpus[0], method={"name": "kd", "temperature": 1.0}, exchange={"top_k": 8})
    cfg["peers"] = [padded(vocab), padded(vocab + 8)]
    cfg["teacher"] = {"model": "hf_causal_lm", "model_args": {"path": folder}}
    result = train(load_config(cfg), backend="local")
    kd = [r["kd"] for r in result.records.to_pylist() if r["split"] == "train"]
    assert kd and all(math.isfinite(v) and v > 0 for v in kd)


def _refusal(capsys, cfg: dict, tmp_path) -> str:
    from codistill.cli import main

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "run.yaml"), "--backend", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the corpus' progress bars, then the refusal
    assert sum("error" in line for line in err) == 1 and not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.mark.slow  # a corpus and its tokenizer are built first
def test_padding_rows_fewer_than_the_tokenizer_refused_in_one_line_naming_both_sizes(corpus, vocab, tmp_path, capsys):  # noqa: F811
    cfg = hf_config(tmp_path, corpus[0])
    cfg["peers"] = [padded(vocab + 8), padded(vocab - 4)]
    assert _refusal(capsys, cfg, tmp_path) == (f"config error: peers.1.model_args.config.vocab_size: is {vocab - 4}, "
                                               f"but the tokenizer has {vocab} tokens")
    cfg = hf_config(tmp_path, corpus[0], method={"name": "kd"})
    cfg["peers"] = [padded(vocab + 8)]
    cfg["teacher"] = {"model": "hf_causal_lm", "model_args": {"path": teacher_folder(tmp_path / "small", vocab - 4)}}
    line = _refusal(capsys, cfg, tmp_path)
    assert line.startswith(f"config error: teacher.model_args: the model predicts {vocab - 4} tokens but the "
                           f"tokenizer has {vocab}"), line  # the teacher named, as a peer is
    assert not (tmp_path / "runs" / "hf" / "records.parquet").exists()
