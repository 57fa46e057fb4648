"""Hugging Face language-model peers (`-k hf`): `datasets` corpora packed by document, padded
positions left out of every loss and KL term, vocabularies that differ refused, top-k by default
above the vocabulary threshold, the chunked KL equal to the unchunked one, and `codistill
export` round trips — with tiny models built from a config and tokenizers trained here, offline."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from codistill.config import ConfigError, load_config
from tests.conftest import REPO

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is ever downloaded: every model and tokenizer is made here
os.environ["HF_DATASETS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

WORDS = "the quick brown fox jumps over a lazy dog while seven cats sit on warm mats and sing".split()
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_corpus")
    texts = documents(120)
    texts.append(texts[3])  # an exact copy: dropped before the split
    with open(folder / "docs.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "body": text}) + "\n")
    return folder / "docs.jsonl", texts


def hf_config(tmp_path, path, **extra) -> dict:
    peer = {"model": "hf_causal_lm", "model_args": {"config": LLAMA}, "optimizer": {"name": "adamw", "lr": 0.003}}
    cfg = {"name": "hf", "method": {"name": "dml"}, "peers": [peer, peer],
           "data": {"name": "hf_text", "path": str(path), "text_field": "body", "root": str(tmp_path / "cache"),
                    "vocab_size": 300, "context": 16, "batch_size": 4, "eval_batch_size": 8, "test_windows": 8},
           "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2}, "ray": {"storage_path": str(tmp_path / "runs")}}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def test_hf_text_packs_documents_with_an_end_of_text_and_splits_them_by_content(corpus, tmp_path):
    from codistill.data import load_data

    path, texts = corpus
    cfg = load_config(hf_config(tmp_path, path, data={"test_windows": 1000}))  # every test window
    data = load_data(cfg.data)
    tokenizer = transformers.AutoTokenizer.from_pretrained(data.tokenizer)
    eos = tokenizer.eos_token_id
    assert data.fingerprint["duplicates"] == 1 and data.fingerprint["vocab_size"] == len(tokenizer) == data.num_classes

    def stream(x, y):  # the token stream back from the windows: the first input, then every real label
        labels = y.flatten()
        return [int(x[0, 0])] + labels[labels != -100].tolist()

    def docs(ids):  # the stream cut at each end-of-text, decoded
        out, current = [], []
        for token in ids:
            if token == eos:
                out.append(tokenizer.decode(current))
                current = []
            else:
                current.append(token)
        return out

    train_docs, test_docs = docs(stream(data.x_train, data.y_train)), docs(stream(data.x_test, data.y_test))
    distinct = list(dict.fromkeys(texts))
    assert sorted(train_docs + test_docs) == sorted(distinct)  # every document once, whole, followed by eos
    assert not set(train_docs) & set(test_docs) and test_docs  # split by document, not inside one
    # Next-token labels; the last window padded on the right with −100 after the stream ends.
    real = data.y_train[:, :-1] != -100
    assert torch.equal(data.x_train[:, 1:][real], data.y_train[:, :-1][real]) and (data.y_train[-1] == -100).any()
    assert (data.y_train[:-1] != -100).all()
    # What the loop asks (on the CPU) before dropping rows: only a batch with the tail window is padded.
    last = len(data.y_train) - 1
    assert data.padded_in(torch.tensor([0, last])) and not data.padded_in(torch.arange(last))
    # A second load maps nothing: the tokenized Arrow files are there, and give the same windows.
    cached = sorted(p.name for p in (tmp_path / "cache").glob("hf_text_*.arrow"))
    assert len(cached) == 2
    again = load_data(cfg.data)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
    assert sorted(p.name for p in (tmp_path / "cache").glob("hf_text_*.arrow")) == cached
    # A datasets.Dataset given from Python is the same corpus as the file it was read from.
    from codistill.data.given import register_given

    given = datasets.Dataset.from_list([{"id": i, "body": t} for i, t in enumerate(texts)])
    name = register_given(given, cfg.data)
    from_python = load_data(load_config(hf_config(tmp_path, path, data={"name": name, "path": None,
                                                                        "test_windows": 1000})).data)
    assert torch.equal(from_python.x_train, data.x_train) and torch.equal(from_python.y_train, data.y_train)


def test_hf_padded_positions_count_in_no_loss_no_kl_and_no_metric():
    """Rows labelled −100 are dropped from the logits, the labels and every peer's payload before
    the method's loss: changing what the student or a peer predicts there changes nothing."""
    from codistill.engine.loop import _rows_kept
    from codistill.methods import Signals, create_method
    from codistill.metrics import evaluation_metrics

    g = torch.Generator().manual_seed(0)
    rows, vocab = 24, 50
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[-5:] = -100
    keep = labels != -100
    method = create_method(load_config({"method": {"name": "dml"}, "peers": [{"model": "mnist1d_mlp"}] * 2}).method)

    def loss(student, peer):
        s = Signals(network=torch.nn.Linear(1, 1), outputs=student, logits=student, labels=labels, step=0,
                    peers=[{"logits": peer}])
        return method.loss(_rows_kept(s, keep))[0]

    student, peer = torch.randn(rows, vocab, generator=g), torch.randn(rows, vocab, generator=g)
    noisy_student, noisy_peer = student.clone(), peer.clone()
    noisy_student[~keep] += 5 * torch.randn(5, vocab, generator=g)
    noisy_peer[~keep] += 5 * torch.randn(5, vocab, generator=g)
    base = loss(student, peer)
    assert loss(noisy_student, noisy_peer).item() == pytest.approx(base.item(), rel=1e-6)
    plain = Signals(network=torch.nn.Linear(1, 1), outputs=student[keep], logits=student[keep], labels=labels[keep],
                    step=0, peers=[{"logits": peer[keep]}])
    assert base.item() == pytest.approx(method.loss(plain)[0].item(), rel=1e-6)
    # The metrics too: bits per token over the real positions only.
    from codistill.data.task import NextToken
    from codistill.metrics import bits_metrics

    with_pad = NextToken.score_group([noisy_student], labels)
    assert with_pad["peer0_bits"] == pytest.approx(bits_metrics([student[keep]], labels[keep])["peer0_bits"])
    assert with_pad["peer0_accuracy"] == pytest.approx(evaluation_metrics([student[keep]], labels[keep])["peer0_accuracy"])


@pytest.mark.slow
def test_hf_peers_with_another_vocabulary_are_refused_naming_both(corpus, tmp_path):
    from codistill.models import create_model

    with pytest.raises(ConfigError, match="vocab_size: is 200, but the tokenizer has 300 tokens"):
        create_model("hf_causal_lm", 300, config={**LLAMA, "vocab_size": 200})
    small = create_model("hf_causal_lm", 200, config=LLAMA)
    small.model.save_pretrained(tmp_path / "small")
    with pytest.raises(ConfigError, match="predicts 200 tokens but the tokenizer has 300"):
        create_model("hf_causal_lm", 300, path=str(tmp_path / "small"))
    with pytest.raises(ConfigError, match="exactly one of `path`"):
        load_config({"peers": [{"model": "hf_causal_lm", "model_args": {}}]})
    with pytest.raises(ConfigError, match="not a model folder"):
        load_config({"peers": [{"model": "hf_causal_lm", "model_args": {"path": str(tmp_path)}}]})
    # A folder whose tokenizer is another one of the same size: every shape fits, and it is refused.
    from codistill.data import load_data
    from codistill.data.hf_text import END_OF_TEXT
    from codistill.data.text import train_tokenizer
    from codistill.engine.run import train

    cfg = hf_config(tmp_path, corpus[0])
    data = load_data(load_config(cfg).data)
    other = train_tokenizer(documents(50, seed=9)[::-1] + ["zebra quokka " * 20], data.num_classes, [END_OF_TEXT])
    folder = tmp_path / "other"
    create_model("hf_causal_lm", data.num_classes, config=LLAMA).model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=other, eos_token=END_OF_TEXT).save_pretrained(folder)
    cfg["peers"][1] = {"model": "hf_causal_lm", "model_args": {"path": str(folder)}}
    with pytest.raises(ConfigError, match=r"peers.1.model_args: the tokenizer in .*other \(300 tokens\) is not the "
                                          r"run's tokenizer \(.*, 300 tokens\)"):
        train(load_config(cfg), backend="local")
    # A larger output layer (padded rows) is cut to the tokenizer's vocabulary.
    assert create_model("hf_causal_lm", 150, path=str(tmp_path / "small"))(torch.zeros(2, 3, dtype=torch.long)).shape \
        == (6, 150)


@pytest.mark.slow
def test_hf_top_k_targets_are_the_default_above_the_vocabulary_threshold(corpus, tmp_path, caplog):
    from codistill.data.task import AUTO_TOP_K, Classes, NextToken
    from codistill.engine.job import exchanged_top_k
    from codistill.engine.ray.runner import check_exchange

    path, _ = corpus
    peer = {"model": "hf_causal_lm", "model_args": {"config": LLAMA}}
    cfg = load_config(hf_config(tmp_path, path, method={"name": "codistill", "period": 2, "max_staleness": 1}))
    assert cfg.exchange.top_k_above == 16384
    big = NextToken(32000)
    assert exchanged_top_k(cfg, big) == AUTO_TOP_K == 64 and exchanged_top_k(cfg, NextToken(16384)) == 0
    assert exchanged_top_k(cfg, Classes(32000)) == 0  # classes are not a vocabulary: the task decides
    assert exchanged_top_k(load_config({**hf_config(tmp_path, path), "exchange": {"top_k": 8}}), big) == 8
    assert exchanged_top_k(load_config({**hf_config(tmp_path, path), "exchange": {"top_k_above": 0}}), big) == 0
    kd = load_config({**hf_config(tmp_path, path), "method": {"name": "kd"}, "peers": [peer],
                      "teacher": {"model": "hf_causal_lm", "model_args": {"config": LLAMA}, "checkpoint": "t.pt"}})
    assert exchanged_top_k(kd, big) == 0  # a teacher's targets are cut only when asked: nothing travels
    # Whole distributions forced over a vocabulary whose rounds cannot fit the object store: refused.
    forced = load_config({**hf_config(tmp_path, path, method={"name": "codistill", "period": 50}),
                          "exchange": {"top_k_above": 0}})
    with pytest.raises(ConfigError, match=r"exchange.top_k: whole next-token distributions of \d+ tokens"):
        check_exchange(forced, object_store=8 * 2**20)  # 2 rounds × 2 peers × 3.8 MB: 15 MB
    check_exchange(forced, object_store=16 * 2**20)  # fits
    # Above the threshold (here set below the corpus's 300 tokens), the driver says so before anything starts.
    with caplog.at_level("WARNING"):
        check_exchange(load_config({**hf_config(tmp_path, path), "exchange": {"top_k_above": 100}}), 8 * 2**20)
    assert "the vocabulary has 300 tokens, more than exchange.top_k_above=100: peers send top-64 targets" in caplog.text


@pytest.mark.parametrize("payload_kind", ["logits", "top_k"])
def test_hf_chunked_kl_equals_the_unchunked_kl_and_its_gradient(payload_kind):
    from codistill.methods.losses import payload_kl, top_k_targets

    g = torch.Generator().manual_seed(0)
    student = torch.randn(300, 97, generator=g, requires_grad=True)
    teacher = 3 * torch.randn(300, 97, generator=g)
    payload = {"logits": teacher} if payload_kind == "logits" else top_k_targets(teacher, 8, 2.0, torch.float32)
    whole = payload_kl(student, payload, 2.0, chunk_elements=10**9)
    (grad_whole,) = torch.autograd.grad(whole, student)
    chunked = payload_kl(student, payload, 2.0, chunk_elements=97 * 64)  # 5 chunks, the last of 44 rows
    (grad_chunked,) = torch.autograd.grad(chunked, student)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(grad_chunked, grad_whole, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_hf_peers_train_export_to_a_folder_from_pretrained_loads_and_teach_a_student(corpus, tmp_path):
    """Two Llama-architecture peers codistil on a JSONL corpus; `codistill export` writes peer 1
    as a folder whose model gives the run's own test bits per token; that folder then teaches
    a smaller student by KD with top-k targets (a pretrained local teacher, no checkpoint file)."""
    from codistill.cli import main
    from codistill.data import load_data
    from codistill.engine.run import train

    path, _ = corpus
    cfg = load_config(hf_config(tmp_path, path, method={"name": "codistill", "period": 2, "burn_in": 0}))
    train(cfg, backend="local")
    out = tmp_path / "peer1"
    assert main(["export", str(tmp_path / "runs" / "hf"), "--peer", "1", "--to", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    data = load_data(cfg.data)
    assert len(tokenizer) == data.num_classes and "step: 4" in (out / "README.md").read_text()
    with torch.no_grad():
        logits = model(input_ids=data.x_test).logits.reshape(-1, data.num_classes)
    labels = data.y_test.reshape(-1)
    keep = labels != -100
    bits = -logits[keep].log_softmax(-1).gather(-1, labels[keep].view(-1, 1)).mean().item() / math.log(2)
    recorded = float((out / "README.md").read_text().split("test bits per token: ")[1].split()[0])
    assert bits == pytest.approx(recorded, abs=1e-4)
    assert main(["export", str(tmp_path / "runs" / "hf"), "--peer", "1", "--to", str(out)]) == 2  # not over files

    student = {"model": "hf_causal_lm", "model_args": {"config": {**LLAMA, "hidden_size": 16, "intermediate_size": 32}}}
    kd = load_config({**hf_config(tmp_path, path), "name": "kd", "method": {"name": "kd", "temperature": 1.0},
                      "peers": [student], "exchange": {"top_k": 8},
                      "teacher": {"model": "hf_causal_lm", "model_args": {"path": str(out)}}})
    result = train(kd, backend="local")
    assert len(result.final["peer_bits"]) == 1 and math.isfinite(result.final["peer_bits"][0])


def test_hf_the_gpu_recipe_loads_with_a_model_folder_a_tokenizer_and_a_corpus_at_its_paths(corpus, tmp_path):
    """configs/codistill_hf_gpu.yaml (not run here: no GPU) names the user's files; with a model
    folder, its tokenizer and a corpus made here at those paths, it is a valid config that sends
    top-64 targets over a real vocabulary."""
    import yaml

    from codistill.config import dump_config
    from codistill.data import load_data
    from codistill.engine.job import exchanged_top_k
    from codistill.models import create_model

    path, _ = corpus
    data = load_data(load_config(hf_config(tmp_path, path)).data)
    folder = tmp_path / "base"
    create_model("hf_causal_lm", data.num_classes, config=LLAMA).model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(data.tokenizer).save_pretrained(folder)
    cfg = load_config(f"{REPO}/configs/codistill_hf_gpu.yaml", [f"peers.*.model_args.path={folder}", f"data.path={path}",
                                                       f"data.tokenizer.path={folder}"])
    assert cfg.num_peers == 2 and cfg.train.precision == "bf16" and cfg.ray.resources_per_peer == {"GPU": 1, "CPU": 4}
    from codistill.data.task import NextToken

    assert exchanged_top_k(cfg, NextToken(49152)) == 64
    assert load_config(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.slow
def test_hf_the_stdlib_config_trains_offline_from_the_command_line(tmp_path):
    """What the README's first HF command does on a fresh clone, cut to 20 steps: offline (the
    Hub is off in the tests), the BPE trained on the stdlib's source, two Llama peers."""
    from codistill.cli import main

    assert main(["train", f"{REPO}/configs/codistill_hf_stdlib.yaml", "--backend", "local", "--set", "train.steps=20",
                 "--set", "train.eval_every=20", "--set", f"ray.storage_path={tmp_path}"]) == 0
    assert (tmp_path / "codistill_hf_stdlib" / "records.parquet").exists()


def test_hf_one_packing_rule_text_and_hf_text_make_the_same_windows_of_the_same_documents(corpus, tmp_path):
    """`data.tokenizer: {path: DIR}` for the `text` corpus too: the same documents as text files
    (`text`) and as JSONL rows (`hf_text`), tokenized by one folder, give the same windows —
    end-of-text after each document, the tail padded with −100 — on both sides of the split."""
    from codistill.data import load_data

    folder = load_data(load_config(hf_config(tmp_path, corpus[0])).data).tokenizer
    texts = documents(30, seed=3)
    (tmp_path / "texts").mkdir()
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i, text in enumerate(texts):
            (tmp_path / "texts" / f"{i:03d}.txt").write_text(text)  # in the rows' order, by name
            f.write(json.dumps({"body": text}) + "\n")
    settings = {"tokenizer": {"path": folder}, "root": str(tmp_path / "cache"), "context": 16, "batch_size": 4,
                "test_windows": 1000}
    plain = load_data(load_config(hf_config(tmp_path, corpus[0], data={
        **settings, "name": "text", "path": str(tmp_path / "texts")})).data)
    hf = load_data(load_config(hf_config(tmp_path, tmp_path / "docs.jsonl", data=settings)).data)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert plain.num_classes == hf.num_classes == len(tokenizer) and plain.tokenizer == hf.tokenizer == folder
    for a, b in ((plain.x_train, hf.x_train), (plain.y_train, hf.y_train), (plain.x_test, hf.x_test),
                 (plain.y_test, hf.y_test)):
        assert torch.equal(a, b)
    assert plain.fingerprint.tokenizer_sha256 == hf.fingerprint.tokenizer_sha256 and plain.fingerprint.packing \
        == hf.fingerprint.packing
    eos = tokenizer.eos_token_id
    assert int((plain.y_train == eos).sum()) + int((plain.y_test == eos).sum()) == len(texts)  # one per document
    assert (plain.y_train[-1] == -100).any() and (plain.y_test[-1] == -100).any()


def test_hf_the_fsdp_gpu_recipe_loads_sharded_over_four_gpus_a_peer_and_over_a_node_each(corpus, tmp_path):
    """configs/codistill_hf_fsdp_gpu.yaml (not run here: no GPU), with tiny stand-ins at its paths:
    two peers sharded with FSDP over 4 GPUs each in bf16 with activation checkpointing,
    codistilling with weights — and its 2-node form from the --set lines its comment gives."""
    from codistill.data import load_data
    from codistill.models import create_model

    path, _ = corpus
    data = load_data(load_config(hf_config(tmp_path, path)).data)
    folder = tmp_path / "base"
    create_model("hf_causal_lm", data.num_classes, config=LLAMA).model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(data.tokenizer).save_pretrained(folder)
    at_paths = [f"peers.*.model_args.path={folder}", f"data.path={path}", f"data.tokenizer.path={folder}"]
    cfg = load_config(f"{REPO}/configs/codistill_hf_fsdp_gpu.yaml", at_paths)
    assert (cfg.train.sharding, cfg.train.precision, cfg.train.activation_checkpointing) == ("fsdp", "bf16", True)
    assert (cfg.method.publish, cfg.layout, [cfg.workers_of(k) for k in (0, 1)]) == ("weights", "apart", [4, 4])
    two_nodes = load_config(f"{REPO}/configs/codistill_hf_fsdp_gpu.yaml", [
        *at_paths, "ray.workers_per_peer=8", "ray.resources_per_peer={GPU: 8, CPU: 32}", "ray.placement_strategy=STRICT_SPREAD"])
    assert two_nodes.ray.resources_per_peer == {"GPU": 8, "CPU": 32} and two_nodes.workers_of(1) == 8
