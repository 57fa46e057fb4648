"""`hf_causal_lm` takes causal models only (issue 43, items 1 and 6): an encoder such as BERT,
whose positions see the next token — its own label — is refused when it is built, by config and
by folder; a model type with no causal-LM class (DistilBERT, T5) is refused in one line; and the
tiny Llama and GPT-2 models pass. Tiny models built here, offline."""

from __future__ import annotations

import pytest
import torch
import yaml

from codistill.config import ConfigError
from tests.test_hf import LLAMA, corpus, hf_config  # noqa: F401 (corpus: a fixture; the Hub is off from here)

transformers = pytest.importorskip("transformers")

BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}


def build(**model_args):
    from codistill.models import create_model

    return create_model("hf_causal_lm", 100, **model_args)


def test_hf_a_bidirectional_model_is_refused_by_config_and_by_folder_and_decoders_pass(tmp_path):
    from codistill.models.hf import _sees_later_tokens

    with pytest.raises(ConfigError, match=r"^model_args: the bert model of model_args\.config is not a causal "
                                          r"language model: an encoder whose config is not a decoder"):
        build(config={"model_type": "bert", **BERT})
    folder = tmp_path / "bert"
    transformers.BertLMHeadModel(transformers.BertConfig(vocab_size=100, **BERT)).save_pretrained(folder)
    with pytest.raises(ConfigError, match=rf"^model_args: {folder} \(bert\) is not a causal language model"):
        build(path=str(folder))
    # The probe alone tells them apart: a later token moves BERT's earlier logits, not a decoder's.
    bidirectional = transformers.BertLMHeadModel(transformers.BertConfig(vocab_size=100, **BERT))
    assert _sees_later_tokens(bidirectional, 100) and bidirectional.training  # its mode is put back
    assert not _sees_later_tokens(build(config={"model_type": "bert", "is_decoder": True, **BERT}).model, 100)
    assert not _sees_later_tokens(build(config=LLAMA).model, 100)
    # The decoders pass, by config and by folder.
    x = torch.randint(0, 100, (2, 5))
    for config in (LLAMA, GPT2):
        model = build(config=config)
        model.model.save_pretrained(tmp_path / config["model_type"])
        again = build(path=str(tmp_path / config["model_type"]))
        assert again(x).shape == (10, 100) and torch.allclose(again(x), model.eval()(x), atol=1e-5)


@pytest.mark.slow  # a corpus and its tokenizer are built first: ~3 s
def test_hf_a_bidirectional_model_is_refused_on_the_command_line_in_one_line(corpus, tmp_path, capsys):
    """`codistill train` with a BERT peer: one line, exit 2, before any step."""
    from codistill.cli import main

    cfg = hf_config(tmp_path, corpus[0])
    cfg["peers"][1] = {**cfg["peers"][1], "model_args": {"config": {"model_type": "bert", **BERT}}}
    (tmp_path / "bert.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "bert.yaml"), "--backend", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the corpus' progress bars, then the refusal
    assert err[-1].startswith("config error: peers.1.model_args: the bert model of model_args.config is not a causal")  # the refusal names its peer (issue 43, 16)
    assert sum("error" in line for line in err) == 1 and not any("Traceback" in line for line in err)
    assert not (tmp_path / "runs" / "hf" / "records.parquet").exists()


def test_hf_a_model_type_with_no_causal_lm_head_is_refused_in_one_line(tmp_path):
    distilbert = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    t5 = transformers.T5Config(vocab_size=100, d_model=32, num_layers=1, num_heads=2, d_ff=64, d_kv=16)
    for model in (transformers.DistilBertForMaskedLM(distilbert), transformers.T5ForConditionalGeneration(t5)):
        kind = model.config.model_type
        model.save_pretrained(tmp_path / kind)
        with pytest.raises(ConfigError) as info:
            build(path=str(tmp_path / kind))
        assert str(info.value) == (f"model_args.path: {tmp_path / kind} holds a {kind!r} model, which has no causal-LM "
                                   "head in transformers (no AutoModelForCausalLM class): give a decoder such as "
                                   "llama, gpt2 or qwen2")
        with pytest.raises(ConfigError, match=rf"^model_args.config: {kind!r} has no causal-LM head"):
            build(config={"model_type": kind})  # refused before a model is built
