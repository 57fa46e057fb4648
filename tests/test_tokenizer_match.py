"""A tokenizer is matched by content, not by its path (issue 43, item 2): a run trained with a
tokenizer folder that was replaced since does not resume, and is not exported with the new
one; one that is gone is exported without it, saying so. Export finds the tokenizer through the
checkpoint's fingerprint: it never loads the corpus."""

from __future__ import annotations

import json
import shutil

import pytest

from codistill.config import load_config
from tests.test_hf import LLAMA, documents, hf_config

transformers = pytest.importorskip("transformers")


def _bpe_folder(folder, texts) -> None:
    from codistill.data.text import END_OF_TEXT, train_tokenizer

    bpe = train_tokenizer(texts, 300, special_tokens=[END_OF_TEXT])
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END_OF_TEXT).save_pretrained(str(folder))


@pytest.mark.slow  # one short training of two tiny Llama peers (~5 s): the full tier
def test_a_replaced_tokenizer_folder_is_refused_on_resume_and_export_and_a_gone_one_is_said(tmp_path, monkeypatch,
                                                                                           capsys):
    from codistill import data as data_package
    from codistill.cli import main
    from codistill.engine.checkpoint import DataChanged
    from codistill.engine.run import train

    texts = documents(80, seed=1)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"body": text}) + "\n")
    tok = tmp_path / "tokX"
    _bpe_folder(tok, texts)
    peer = {"model": "hf_causal_lm", "model_args": {"config": LLAMA}}
    cfg = hf_config(tmp_path, tmp_path / "docs.jsonl", data={"tokenizer": {"path": str(tok)}},
                    peers=[peer, peer])
    train(load_config(cfg), backend="local")
    run = str(tmp_path / "runs" / "hf")

    # Export reads the tokenizer's place from the checkpoint: loading the corpus would fail here.
    def no_loading(*args, **kwargs):
        raise AssertionError("export loaded the run's data")

    monkeypatch.setattr(data_package, "load_data", no_loading)
    monkeypatch.setattr("codistill.data.datasets.load_dataset", no_loading)
    assert main(["export", run, "--peer", "0", "--to", str(tmp_path / "out0")]) == 0
    assert "tokenizer: included" in capsys.readouterr().out
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out0").get_vocab() == \
        transformers.AutoTokenizer.from_pretrained(tok).get_vocab()
    monkeypatch.undo()

    # Another BPE of the same size at the same path.
    from codistill.data.text import folder_hash

    before = folder_hash(tok)
    shutil.rmtree(tok)
    _bpe_folder(tok, documents(80, seed=2)[::-1] + ["zebra quagga okapi " * 30])
    after = folder_hash(tok)
    assert before != after
    assert main(["export", run, "--peer", "0", "--to", str(tmp_path / "out1")]) == 2
    err = capsys.readouterr().err
    assert before[:16] in err and after[:16] in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out1").exists() or not any((tmp_path / "out1").iterdir())  # nothing written
    with pytest.raises(DataChanged) as info:
        train(load_config({**cfg, "train": {**cfg["train"], "steps": 6}}), backend="local")
    assert before[:16] in str(info.value) and after[:16] in str(info.value) and "\n" not in str(info.value)

    # Gone: exported without it, and the success line says so.
    shutil.rmtree(tok)
    assert main(["export", run, "--peer", "1", "--to", str(tmp_path / "out2")]) == 0
    assert "tokenizer: not included (gone)" in capsys.readouterr().out
    assert "tokenizer: not included (gone)" in (tmp_path / "out2" / "README.md").read_text()
