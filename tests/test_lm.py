"""Language-model peers: the top-k KL against the full KL, the corpus and tokenizer built the
same way twice, text paths that hold nothing refused naming `data.path`, the GPT causal, and
token-level DML / codistillation training with top-k targets (Ray = local: test_ray_runner)."""

import math
import shutil

import pytest
import torch

from codistill.config import ConfigError, load_config
from codistill.data.text import build_corpus, corpus_hash, stdlib_files, text_files
from codistill.engine.run import train
from codistill.methods.losses import soft_kl, soft_targets, top_k_kl, top_k_targets
from codistill.models import create_model
from tests.conftest import small_config

LM = "configs/codistill_lm_stdlib.yaml"
TINY = ("peers.*.model_args={width: 32, depth: 1, heads: 2, context: 32}", "data.context=32", "data.batch_size=8",
        "train.steps=60", "train.eval_every=30", "train.checkpoint_every=30")


def full_kl(student, teacher, T):
    return soft_kl(student, soft_targets(teacher, T), T).item()


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_top_k_kl_is_the_full_kl_when_k_is_the_vocabulary(T):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(64, 50, generator=g), 3 * torch.randn(64, 50, generator=g)
    target = top_k_targets(teacher, 50, T, dtype=torch.float32)
    assert top_k_kl(student, target, T).item() == pytest.approx(full_kl(student, teacher, T), rel=1e-5)


def test_top_k_kl_on_peaked_distributions_is_within_the_tail_bound():
    """Merging the tail into one bucket never raises a KL, and loses exactly the tail's own
    divergence, weighted by its mass: KL − KL_top-k = T²·p_tail·KL(p̂ ‖ q̂) (p̂, q̂: the two
    distributions within the tail) ≤ T²·p_tail·max_tail log(p̂/q̂) — small when p_tail is."""
    g = torch.Generator().manual_seed(1)
    V, k, T = 1000, 8, 1.0
    teacher = torch.randn(256, V, generator=g)
    teacher[torch.arange(256), torch.randint(0, V, (256,), generator=g)] += 12  # one token holds most mass
    student = teacher + torch.randn(256, V, generator=g)
    full = full_kl(student, teacher, T)
    got = top_k_kl(student, top_k_targets(teacher, k, T, dtype=torch.float32), T).item()
    p, q = soft_targets(teacher, T).double(), soft_targets(student, T).double()
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, p.topk(k, -1).indices, False)
    p_tail, q_tail = (p * tail).sum(-1), (q * tail).sum(-1)
    p_hat, q_hat = (p * tail) / p_tail[:, None], (q * tail) / q_tail[:, None]
    ratio = torch.where(tail, (p_hat / q_hat).log(), torch.zeros_like(p))
    gap = (T * T * p_tail * (p_hat * ratio).sum(-1)).mean().item()
    assert full - got == pytest.approx(gap, rel=1e-3, abs=1e-6) and 0 <= full - got
    assert full - got <= (T * T * p_tail * ratio.max(-1).values).mean().item()
    assert p_tail.mean() < 0.02  # peaked: 8 tokens of 1000 hold > 98% of the mass
    # fp16 values on the wire: within 1e-3 relative of the fp32 target's KL
    half = top_k_kl(student, top_k_targets(teacher, k, T, dtype=torch.float16), T).item()
    assert half == pytest.approx(got, rel=1e-3)


def test_top_k_targets_are_small():
    target = top_k_targets(torch.randn(16 * 128, 1024), 8, 1.0)
    sent = sum(t.numel() * t.element_size() for t in target.values())
    assert sent == 16 * 128 * (8 * 2 + 8 * 4 + 2)  # fp16 values, int32 ids, fp16 tail
    assert sent < 16 * 128 * 1024 * 4 / 80


def corpus_folder(tmp_path, files=30):
    root, all_files = stdlib_files()
    folder = tmp_path / "corpus"
    for f in all_files[:files]:
        dest = folder / f.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    return folder


@pytest.mark.slow
def test_corpus_split_and_tokenizer_are_deterministic(tmp_path):
    folder = corpus_folder(tmp_path)
    root, files = text_files(str(folder))
    a = build_corpus(root, files, tmp_path / "cache_a", "bpe", 300, 32, 16)
    b = build_corpus(root, files, tmp_path / "cache_b", "bpe", 300, 32, 16)
    assert a.fingerprint == b.fingerprint and a.fingerprint["corpus_sha256"] == corpus_hash(root, files)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    saved = [sorted((tmp_path / c).glob("*.tokenizer.json")) for c in ("cache_a", "cache_b")]
    assert len(saved[0]) == 1 and saved[0][0].read_bytes() == saved[1][0].read_bytes()  # the same BPE, byte for byte
    assert a.num_classes == 300 and a.input_kind == "tokens"
    real = a.y_train[:, :-1] != -100  # the labels are the next tokens (the padded tail's count for nothing)
    assert torch.equal(a.x_train[:, 1:][real], a.y_train[:, :-1][real]) and (a.y_train[-1] == -100).any()
    # One more file changes the hash (a run records exactly what it saw), and test files are test by name
    (folder / "extra.py").write_text("x = 1\n")
    assert corpus_hash(*text_files(str(folder))) != a.fingerprint["corpus_sha256"]


def test_bytes_tokenizer_needs_no_training(tmp_path):
    root, files = text_files(str(corpus_folder(tmp_path, 5)))
    data = build_corpus(root, files, tmp_path / "cache", "bytes", 1024, 16, 4)
    assert data.num_classes == 257 and int(data.x_train.max()) == 256  # the bytes, and 256 ending each document
    assert int((data.x_train == 256).sum()) >= 3  # five files, at least three of them on the training side


@pytest.mark.parametrize("make,message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no text"),
    (lambda p: (p / "bin").write_bytes(b"\0\1\2" * 100) and str(p / "bin"), "holds no text"),
])
def test_a_text_path_that_does_not_exist_or_holds_no_text_is_refused(tmp_path, make, message):
    with pytest.raises(ConfigError) as info:
        load_config(LM, ["data.name=text", f"data.path={make(tmp_path)}"])
    assert info.value.path == "data.path" and message in info.value.message
    with pytest.raises(ConfigError) as info:
        load_config(LM, ["data.name=text"])
    assert info.value.path == "data.path"


def test_the_gpt_is_causal_tied_and_flattens_positions():
    model = create_model("gpt", 50, width=32, depth=2, heads=4, context=16).eval()
    x = torch.randint(0, 50, (3, 16))
    logits = model(x)
    assert logits.shape == (3 * 16, 50)
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 50
    after = model(changed).view(3, 16, 50)
    assert torch.allclose(after[:, :10], logits.view(3, 16, 50)[:, :10], atol=1e-6)  # the past does not see the future
    assert not torch.allclose(after[:, 10:], logits.view(3, 16, 50)[:, 10:])
    assert model.output.weight is model.token.weight
    with pytest.raises(ConfigError) as info:
        load_config(LM, ["peers.0.model_args={width: 32, layers: 2}"])
    assert info.value.path == "peers.0.model_args" and "depth" in info.value.message


def test_top_k_with_a_method_that_uses_logits_otherwise_is_refused():
    with pytest.raises(ConfigError) as info:
        load_config(LM, ["method={name: kdcl}", "exchange.top_k=8"])
    assert info.value.path == "exchange.top_k" and "codistill" in info.value.message and "dml" in info.value.message


@pytest.mark.slow  # two short LM trainings: the full tier
@pytest.mark.parametrize("method", ["dml", "codistill"])
def test_lm_peers_learn_with_top_k_targets_and_report_bits(tmp_path, method):
    overrides = [*TINY, f"method={{name: {method}, burn_in: 0, period: 10}}" if method == "codistill" else "method=dml"]
    full = train(small_config(tmp_path, "name=full", *overrides, base=LM), "local")
    top = train(small_config(tmp_path, "name=top8", *overrides, "exchange.top_k=8", base=LM), "local")
    for result in (full, top):
        bits = result.final["peer_bits"]
        assert all(b < math.log2(1024) - 1 for b in bits)  # a point below uniform over the vocabulary
        assert result.final["ensemble_bits"] <= max(bits) + 1e-6
        assert "bits/token" in result.summary
    if method == "codistill":
        sent = {name: [r["bytes_sent"] for r in t.records.to_pylist() if r.get("bytes_sent")]
                for name, t in (("full", full), ("top8", top))}
        assert max(sent["top8"]) * 20 < min(sent["full"])  # 8 of 1024 tokens, fp16 + ids + tail


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_a_run_does_not_resume_on_a_changed_corpus(tmp_path):
    folder = corpus_folder(tmp_path, 20)
    overrides = (*TINY, "method=dml", "data.name=text", f"data.path={folder}", "data.vocab_size=300",
                 f"data.root={tmp_path / 'cache'}", "peers.*.optimizer.schedule=constant")
    train(small_config(tmp_path, "name=lm", *overrides, base=LM), "local")
    (folder / "new_file.py").write_text("print('a file that was not there')\n" * 50)
    from codistill.engine.checkpoint import DataChanged

    with pytest.raises(DataChanged, match="corpus"):
        train(small_config(tmp_path, "name=lm", *overrides, "train.steps=90", base=LM), "local")


@pytest.mark.slow  # > 1.5 s: the full tier
def test_kd_from_a_language_model_teacher_run_builds_it_as_the_run_did(tmp_path):
    teacher = train(small_config(tmp_path, "name=lm_teacher", *TINY, "method=independent",
                                 "peers=[{model: gpt, model_args: {width: 32, depth: 1, heads: 2, context: 32}}]",
                                 base=LM), "local")
    assert teacher.final["peer_bits"][0] < math.log2(1024) - 1
    student = train(small_config(tmp_path, "name=lm_student", *TINY, "method={name: kd, temperature: 1.0}",
                                 "teacher.run=lm_teacher",  # width 32: from the teacher run's own config
                                 "peers=[{model: gpt, model_args: {width: 16, depth: 1, heads: 2, context: 32}}]",
                                 base=LM), "local")
    assert student.config.teacher.model_args == {"width": 32, "depth": 1, "heads": 2, "context": 32}
    kd = [r["kd"] for r in student.records.to_pylist() if r["split"] == "train"]
    assert all(v > 0 for v in kd) and student.final["peer_bits"][0] < math.log2(1024) - 1


@pytest.mark.slow  # over ~1.5 s: the full tier (make test)
def test_a_run_split_by_path_does_not_resume_on_the_split_by_content(tmp_path):
    folder = corpus_folder(tmp_path, 20)
    overrides = (*TINY, "method=dml", "data.name=text", f"data.path={folder}", "data.tokenizer=bytes",
                 f"data.root={tmp_path / 'cache'}")
    train(small_config(tmp_path, "name=lm", *overrides, base=LM), "local")
    for file in (tmp_path / "lm" / "checkpoints").glob("step_*/peer*.pt"):  # as written before the split was kept
        state = torch.load(file, weights_only=True)
        del state["data"]["split"], state["data"]["duplicates"]
        torch.save(state, file)
    from codistill.engine.checkpoint import DataChanged

    with pytest.raises(DataChanged, match="split into train and test by path, but it is now split by content"):
        train(small_config(tmp_path, "name=lm", *overrides, base=LM), "local")
