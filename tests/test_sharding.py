"""Peers sharded over their workers (`train.sharding: fsdp`, engine/sharding.py) on real Ray Train
workers over gloo: a sharded peer trains as a replicated (DDP) one does, each of its workers
holding about half of its state at two workers a peer; its checkpoints resume onto another
number of workers. Two tiny Llama-architecture peers (Hugging Face, built from a config) learn
mutually (DML), 2 peers × 2 workers on the shared 2-CPU Ray instance."""

import pytest
import torch

from codistill.engine.checkpoint import checkpoint_name, from_bytes
from codistill.engine.run import train
from tests.conftest import small_config

# Two decoder layers, so FSDP shards two blocks and the root (embeddings, last norm, head).
# Tiny language-model peers on two workers each, whatever the model (test_sharding_rounds.py too).
TWO_WORKER_LM = ("data.context=32", "data.batch_size=8", "data.test_windows=16",
                 "peers.*.optimizer.schedule=constant", "peers.*.optimizer.warmup_steps=0",
                 "ray.workers_per_peer=2", "ray.resources_per_peer={CPU: 1}")
TINY_LLAMA = ("{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
              "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 32}")
TINY_LLAMA_DML = ("method={name: dml}", *TWO_WORKER_LM, f"peers.*.model_args.config={TINY_LLAMA}",
                  "train.steps=20", "train.eval_every=10", "train.checkpoint_every=10")
HF = "configs/codistill_hf_stdlib.yaml"


def train_rows(result) -> dict:
    return {(r["step"], r["peer"]): r for r in result.records.to_pylist() if r["split"] == "train"}


@pytest.fixture(scope="module")
def ddp_and_fsdp(ray_local, tmp_path_factory):
    """The same 20 steps with each peer replicated (DDP) and sharded (FSDP) over its two workers."""
    folder = tmp_path_factory.mktemp("sharding")
    return {sharding: train(small_config(folder, f"name={sharding}", f"train.sharding={sharding}", *TINY_LLAMA_DML,
                                         base=HF), "ray")
            for sharding in ("ddp", "fsdp")}


def test_fsdp_peers_learn_mutually_with_the_losses_of_ddp_peers(ddp_and_fsdp):
    ddp, fsdp = (train_rows(ddp_and_fsdp[s]) for s in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys() == {(step, peer) for step in range(1, 21) for peer in (0, 1)}
    # The tolerance: FSDP all-gathers exactly the fp32 values each DDP worker holds and computes
    # the same forward and backward on the same slice; the two gradients of a peer's workers are
    # summed in another grouping (a reduce-scatter of flat shards against DDP's all-reduce of
    # buckets) and halved — a sum of two floats is exact whichever goes first, so measured here
    # the losses are equal to the last bit. 1e-5 relative (Adam amplifying a last-bit difference
    # in a reduction over 20 steps stays far below it) still fails any real difference: a
    # gradient not averaged, or a replica training on the other's slice, moves the loss by >1e-3.
    for key, row in ddp.items():
        assert fsdp[key]["loss"] == pytest.approx(row["loss"], rel=1e-5, abs=1e-6), key
        assert (row["workers"], fsdp[key]["workers"]) == (2, 2)
    assert ddp_and_fsdp["fsdp"].final["peer_accuracy"] == pytest.approx(ddp_and_fsdp["ddp"].final["peer_accuracy"],
                                                                       abs=1e-6)


def test_an_fsdp_worker_holds_at_most_0_6_of_the_state_a_ddp_worker_holds_at_two_workers_a_peer(ddp_and_fsdp):
    # state_mb: the bytes of the parameters, gradients and Adam's moments the recording worker
    # (each peer's first: FSDP gives it the larger shard of an uneven split) holds itself,
    # counted from its tensors. Ideal: 1/2; the 0.6 leaves room for shards split unevenly.
    ddp, fsdp = (train_rows(ddp_and_fsdp[s]) for s in ("ddp", "fsdp"))
    for key, row in ddp.items():
        assert fsdp[key]["state_mb"] <= 0.6 * row["state_mb"], key


def _whole_files(result, step: int) -> list[dict]:
    """Each peer's file at `step` of a run, its weights and Adam moments whole (a sharded run's
    read from its DCP shards in this process: no process group)."""
    from codistill.engine.shard_files import whole, with_shards

    folder = f"{result.storage.uri}/{checkpoint_name(step)}"
    return [whole(with_shards(from_bytes(result.storage.read_bytes(f"{checkpoint_name(step)}/peer{k}.pt")), folder))
            for k in (0, 1)]


def test_a_sharded_checkpoint_is_written_shard_by_shard_and_holds_the_replicated_ones_state(ddp_and_fsdp):
    """No worker gathers the model to write a checkpoint: each of a peer's two workers writes its
    own shards into the peer's DCP folder, and its file holds no weights; read whole, they are the
    weights and Adam moments of the DDP run's file."""
    storage = ddp_and_fsdp["fsdp"].storage
    for k in (0, 1):
        assert "model" not in from_bytes(storage.read_bytes(f"step_00000020/peer{k}.pt"))
        assert set(storage.list(f"step_00000020/peer{k}.dcp")) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert not ddp_and_fsdp["ddp"].storage.exists("step_00000020/peer0.dcp")  # a DDP peer's file as before
    for ddp, fsdp in zip(_whole_files(ddp_and_fsdp["ddp"], 20), _whole_files(ddp_and_fsdp["fsdp"], 20)):
        assert ddp["model"].keys() == fsdp["model"].keys() and ddp["optimizer"]["state"].keys() == fsdp["optimizer"]["state"].keys()
        assert fsdp["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
        for key, tensor in ddp["model"].items():
            assert torch.allclose(fsdp["model"][key], tensor, rtol=1e-5, atol=1e-7), key
        for index, state in ddp["optimizer"]["state"].items():
            for name, value in state.items():
                assert torch.allclose(fsdp["optimizer"]["state"][index][name], value, rtol=1e-5, atol=1e-9), (index, name)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_damaged_shard_is_a_damaged_checkpoint_the_one_before_is_used_and_it_is_set_aside(ddp_and_fsdp, tmp_path,
                                                                                           caplog, damage):
    import shutil

    from codistill.engine.checkpoint import checkpoint_folders, newest_loadable, past_damaged
    from codistill.storage import RunStorage

    shutil.copytree(ddp_and_fsdp["fsdp"].storage.run_dir, tmp_path / "run")  # the fixture's run stays whole
    storage = RunStorage(str(tmp_path), "run")
    shard = tmp_path / "run" / "step_00000020" / "peer1.dcp" / "__1_0.distcp"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "garbage":  # the same length: only its digest tells
        shard.write_bytes(bytes(len(shard.read_bytes())))
    else:
        shard.unlink()
    folders = checkpoint_folders(storage)
    assert [step for step, _ in folders] == [10, 20]  # committed, so only reading finds it damaged
    step, states = newest_loadable(storage, folders, 2)
    assert step == 10 and "skipping the checkpoint at step 20" in caplog.text and "peer1.dcp" in caplog.text
    assert [s["step"] for s in states] == [10, 10]
    past_damaged(storage, folders, 10, copy_aside=True)  # what a Ray restart does before retraining 11..20
    (aside,) = storage.list("set_aside")
    assert storage.exists(f"set_aside/{aside}/peer0.dcp/.metadata")


def test_an_exported_folder_of_a_sharded_run_is_the_ddp_runs(ddp_and_fsdp, tmp_path):
    from transformers import AutoModelForCausalLM

    from codistill.export import export_peer

    models = {}
    for s in ("ddp", "fsdp"):
        card = export_peer(ddp_and_fsdp[s].storage.uri, 0, str(tmp_path / s))
        assert card["step"] == 20
        models[s] = AutoModelForCausalLM.from_pretrained(tmp_path / s).state_dict()
    assert (tmp_path / "ddp" / "config.json").read_text() == (tmp_path / "fsdp" / "config.json").read_text()
    assert models["ddp"].keys() == models["fsdp"].keys()
    for key, tensor in models["ddp"].items():
        assert torch.allclose(models["fsdp"][key], tensor, rtol=1e-5, atol=1e-7), key


def test_a_sharded_checkpoint_resumes_onto_one_worker_a_peer_as_the_replicated_one(ddp_and_fsdp):
    """The FSDP run's checkpoint at step 20, written by two workers a peer, resumed on one worker a
    peer (resharded: read whole into the unsplit peer) trains to step 30 as the DDP run's
    checkpoint does on one worker."""
    storage = ddp_and_fsdp["fsdp"].config.ray.storage_path
    onto_one = ("train.steps=30", "ray.workers_per_peer=1", "ray.resources_per_peer={CPU: 1}")
    resumed = {s: train(small_config(storage, f"name={s}", f"train.sharding={s}", *TINY_LLAMA_DML, *onto_one, base=HF),
                        "ray") for s in ("ddp", "fsdp")}
    ddp, fsdp = (train_rows(resumed[s]) for s in ("ddp", "fsdp"))
    assert [r["step"] for r in resumed["fsdp"].records.to_pylist() if r.get("resumed")] == [21, 21]
    for step in range(21, 31):
        for peer in (0, 1):
            assert fsdp[step, peer]["workers"] == 1
            assert fsdp[step, peer]["loss"] == pytest.approx(ddp[step, peer]["loss"], rel=1e-5), (step, peer)


def _train_both_ways(rank: int, init_file: str, out_file: str, cfg_data: dict, steps: int) -> None:
    """In each of a 1-peer × 2-worker gloo world: the same job built replicated and sharded, `steps`
    steps each; what every rank holds of the student and of the teacher."""
    import torch.distributed as dist

    from codistill.config import load_config
    from codistill.data import load_data
    from codistill.engine.job import make_job, peer_schedules
    from codistill.engine.loop import train_step
    from codistill.engine.mesh import PeerMesh
    from codistill.engine.sharding import local_state_bytes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        seen = {}
        place = PeerMesh(1, 2).build(torch.device("cpu"))
        for sharding in ("ddp", "fsdp"):
            cfg = load_config({**cfg_data, "train": {**cfg_data["train"], "sharding": sharding}})
            data = load_data(cfg.data)
            job = make_job(cfg, 0, data, peer_schedules(cfg, len(data.y_train)), torch.device("cpu"), None, place=place)
            losses = [float(train_step(job, step)["loss"]) for step in range(steps)]
            teacher = next(s for s in job.sources if hasattr(s, "tap_shapes")).network
            seen[sharding] = {"losses": losses, "state": sum(local_state_bytes(job.peer.network, job.peer.optimizer).values()),
                              "teacher": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                             for p in teacher.parameters()),
                              "teacher_whole": sum(p.numel() for p in teacher.parameters())}
        torch.save(seen, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a gloo world of its own processes (torch and transformers imported in each)
def test_a_kd_teacher_from_a_pretrained_folder_is_sharded_like_its_fsdp_student(tmp_path):
    """KD from a Hugging Face folder (`from_pretrained`, no checkpoint file) to a student on two
    workers: sharded, each worker holds half of the teacher as of the student (a teacher left whole
    beside sharded students is huggingface/trl#2580), and the student learns as it does replicated."""
    import torch.multiprocessing as mp

    from codistill.config import load_config, to_dict
    from codistill.data import load_data
    from codistill.models import create_model

    base = small_config(tmp_path, *TINY_LLAMA_DML, base=HF)
    vocab = load_data(base.data).num_classes
    folder = tmp_path / "teacher"
    create_model("hf_causal_lm", vocab, config={**base.peers[0].model_args["config"], "hidden_size": 48}).model.save_pretrained(folder)
    cfg = to_dict(base)
    cfg["peers"], cfg["method"] = cfg["peers"][:1], {"name": "kd", "temperature": 1.0}
    cfg["teacher"] = {"model": "hf_causal_lm", "model_args": {"path": str(folder)}}
    load_config(cfg)  # a valid config as written
    out = str(tmp_path / "seen")
    mp.spawn(_train_both_ways, args=(str(tmp_path / "init"), out, cfg, 5), nprocs=2, join=True)
    seen = [torch.load(f"{out}.{rank}") for rank in (0, 1)]
    for rank in seen:
        assert rank["ddp"]["teacher"] == rank["ddp"]["teacher_whole"]  # replicated: the whole teacher on each
        assert rank["fsdp"]["teacher"] <= 0.6 * rank["fsdp"]["teacher_whole"]
        assert rank["fsdp"]["state"] <= 0.6 * rank["ddp"]["state"]
        # The same tolerance as the DML run's above, for the same reason.
        assert rank["fsdp"]["losses"] == pytest.approx(rank["ddp"]["losses"], rel=1e-5, abs=1e-6)
    assert sum(rank["fsdp"]["teacher"] for rank in seen) == seen[0]["fsdp"]["teacher_whole"]


def _mlp_and_adam(world: int, rank: int, folder: str):
    """A small MLP (rows that do not split evenly over 3) sharded over a gloo world of `world`, its AdamW."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from codistill.engine.sharding import fully_sharded

    dist.init_process_group("gloo", init_method=f"file://{folder}/init{world}", rank=rank, world_size=world)
    torch.manual_seed(0)
    network = fully_sharded(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)), [],
                            init_device_mesh("cpu", (world,)), MixedPrecisionPolicy())
    return network, torch.optim.AdamW(network.parameters(), lr=0.1)


def _write_on_two(rank: int, folder: str) -> None:
    import torch.distributed as dist

    from codistill.engine.sharding import save_shards

    network, optimizer = _mlp_and_adam(2, rank, folder)
    for _ in range(2):
        network(torch.randn(4, 5)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    save_shards(network, optimizer, f"{folder}/dcp")  # both ranks into one folder: a shared filesystem
    torch.save({k: v.full_tensor() for k, v in network.state_dict().items()}, f"{folder}/whole.{rank}")
    dist.destroy_process_group()


def _read_on_three(rank: int, folder: str) -> None:
    import torch.distributed as dist

    from codistill.engine.sharding import load_shards

    network, optimizer = _mlp_and_adam(3, rank, folder)
    load_shards(network, optimizer, f"{folder}/dcp")
    moments = {i: {k: v.full_tensor() for k, v in s.items() if k != "step"} for i, s in optimizer.state_dict()["state"].items()}
    torch.save(({k: v.full_tensor() for k, v in network.state_dict().items()}, moments), f"{folder}/read.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow  # a gloo world of its own processes (torch and transformers imported in each)
def test_dcp_shards_of_two_workers_load_resharded_onto_three_and_whole_without_a_process_group(tmp_path):
    """Resharding as DCP does it: each of three workers reads its (uneven) shards of a checkpoint
    two wrote; and the whole state read in this process alone is what the three hold."""
    import torch.multiprocessing as mp

    from codistill.engine.sharding import whole_from_shards

    mp.spawn(_write_on_two, args=(str(tmp_path),), nprocs=2, join=True)
    mp.spawn(_read_on_three, args=(str(tmp_path),), nprocs=3, join=True)
    written = torch.load(tmp_path / "whole.0")
    model, optimizer = whole_from_shards(str(tmp_path / "dcp"))
    assert [int(s["step"]) for s in optimizer["state"].values()] == [2, 2, 2, 2]
    for rank in range(3):
        weights, moments = torch.load(tmp_path / f"read.{rank}")
        assert weights.keys() == written.keys() == model.keys()
        assert all(torch.equal(weights[k], written[k]) and torch.equal(model[k], written[k]) for k in written)
        for i, state in moments.items():
            assert all(torch.equal(value, optimizer["state"][i][name]) for name, value in state.items())


def _saved_bytes_and_grads(network, x):
    """The bytes autograd keeps for backward in one forward of `network` on `x`, and the gradients."""
    saved = []

    def keep(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = network(x).float().logsumexp(-1).mean()
    loss.backward()
    return sum(saved), {n: p.grad.clone() for n, p in network.named_parameters()}


@pytest.mark.parametrize("model,args", [
    ("gpt", {"width": 32, "depth": 2, "heads": 2, "context": 32}),
    ("hf_causal_lm", {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32}}),
])
def test_activation_checkpointing_keeps_less_for_backward_and_gives_the_same_gradients_unsharded(model, args):
    from codistill.engine.sharding import blocks_of, checkpoint_activations
    from codistill.models import create_model

    torch.manual_seed(0)
    plain = create_model(model, 64, **args)
    recomputed = create_model(model, 64, **args)
    recomputed.load_state_dict(plain.state_dict())
    assert len(blocks_of(model, recomputed)) == 2
    checkpoint_activations(blocks_of(model, recomputed))
    x = torch.randint(0, 64, (4, 32))
    kept, grads = _saved_bytes_and_grads(plain, x)
    kept_recomputed, grads_recomputed = _saved_bytes_and_grads(recomputed, x)
    assert kept_recomputed < 0.5 * kept  # the blocks' insides are recomputed, not kept
    assert recomputed.state_dict().keys() == plain.state_dict().keys()  # checkpoints and taps unchanged
    for name, grad in grads.items():
        assert torch.allclose(grads_recomputed[name], grad, rtol=1e-5, atol=1e-7), name


def test_a_sharded_peer_casts_by_fsdps_policy_not_by_autocast():
    from codistill.engine.precision import Precision

    cpu = torch.device("cpu")
    sharded = Precision("bf16", cpu, sharded=True)
    policy = sharded.sharding_policy()
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    with sharded.forward():
        assert not torch.is_autocast_enabled("cpu")
    with Precision("bf16", cpu).forward():  # replicated: autocast as before
        assert torch.is_autocast_enabled("cpu")
    assert Precision("fp32", cpu, sharded=True).sharding_policy().param_dtype is None


def test_sharding_settings_refused_in_one_line_and_kept_by_the_data_parallel_arm(make_config):
    from codistill.config import ConfigError, data_parallel

    with pytest.raises(ConfigError, match=r"^train\.precision: fp16 needs a gradient scaler.*use bf16"):
        make_config("train.sharding=fsdp", "train.precision=fp16")
    with pytest.raises(ConfigError, match=r"^train\.activation_checkpointing: peer 0's model 'mnist1d_cnn' declares "
                                          r"no transformer blocks.*gpt, hf_causal_lm"):
        make_config("train.activation_checkpointing=true")
    with pytest.raises(ConfigError, match=r"train\.sharding: got 'zero'; allowed: 'ddp', 'fsdp'"):
        make_config("train.sharding=zero")
    # The data-parallel arm: one model on all K·M workers, sharded as each peer was.
    one = data_parallel(make_config("train.sharding=fsdp", "ray.workers_per_peer=2", "train.precision=bf16"))
    assert (one.train.sharding, one.train.precision, one.ray.workers_per_peer) == ("fsdp", "bf16", 4)


def test_a_killed_fsdp_group_resumes_exactly_from_its_sharded_checkpoint(ray_local, tmp_path):
    """Two MNIST-1D CNN peers sharded over two workers each (FSDP per top-level child); peer 0's
    first worker killed once a checkpoint is committed: Ray Train restarts the group, every
    worker reads its shards back from the DCP checkpoint, and the run ends as an uninterrupted DDP run
    of the same peers does (equal to the last bit uninterrupted, as the Llama run above)."""
    import os
    import signal

    from tests.conftest import committed_step

    overrides = ("train.steps=200", "train.checkpoint_every=50", "train.eval_every=100", "ray.workers_per_peer=2",
                 "ray.resources_per_peer={CPU: 1}")
    killed = {}

    def kill(step, metrics):
        if not killed and "pid" in metrics and committed_step(tmp_path / "killed") >= 50:
            killed["at"] = step
            os.kill(metrics["pid"], signal.SIGKILL)

    result = train(small_config(tmp_path, "name=killed", "train.sharding=fsdp", "ray.max_failures=1", *overrides),
                   "ray", on_progress=kill)
    assert killed and killed["at"] < 200, "the worker was not killed mid-run"
    rows = result.records.to_pylist()
    restarts = {r["peer"]: r["step"] - 1 for r in rows if r.get("resumed")}
    assert set(restarts) == {0, 1} and len(set(restarts.values())) == 1 and restarts[0] % 50 == 0, restarts
    for peer in (0, 1):
        assert [r["step"] for r in rows if r["split"] == "train" and r["peer"] == peer] == list(range(1, 201))
    reference = train(small_config(tmp_path, "name=uninterrupted", "train.sharding=ddp", *overrides), "ray")
    assert result.final["peer_accuracy"] == pytest.approx(reference.final["peer_accuracy"], abs=1e-6)
    assert result.final["ensemble_accuracy"] == pytest.approx(reference.final["ensemble_accuracy"], abs=1e-6)
    ddp = train_rows(reference)
    for key, row in train_rows(result).items():
        assert row["loss"] == pytest.approx(ddp[key]["loss"], rel=1e-5, abs=1e-6), key
