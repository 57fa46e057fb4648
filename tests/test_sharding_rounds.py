"""Codistillation on peers sharded over their workers (`train.sharding: fsdp`, engine/stale_peers.py):
each worker publishes its own piece of a round — its rows of the predictions, or its shard of the
weights — and a sharded peer's stale copy of another is sharded as it is, loaded shard by shard.
Two tiny `gpt` peers apart (one Ray Train run each, the layout codistillation runs in), 2 workers
each, on the shared 2-CPU Ray instance; and the pieces' board and shard logic without training."""

import pytest
import torch
import yaml

from codistill.engine.run import train
from tests.conftest import small_config
from tests.test_sharding import TINY_LLAMA, TWO_WORKER_LM, train_rows

# 12 steps in rounds of 4 from step 0. max_staleness 0: every round waits for the other peer's
# round of the same number, so which round a peer reads does not depend on the peers' timing
# (with staleness a peer apart reads the newest round there is, and two runs could differ).
CODISTILL = ("method={name: codistill, period: 4, burn_in: 0, max_staleness: 0, temperature: 1.0}",
             "train.steps=12", "train.eval_every=12", "train.checkpoint_every=12")


# Two tiny `gpt` peers (sharded per block as an HF model's decoder layers are, tests/test_sharding.py
# shards HF Llama ones): three Ray runs of two 2-worker peers each, and a worker that never imports
# transformers starts ~10 s sooner.
TINY_GPT = (*TWO_WORKER_LM, "peers.*.model_args={width: 32, depth: 2, heads: 2, context: 32}")
GPT = "configs/codistill_lm_stdlib.yaml"


@pytest.fixture(scope="module")
def codistilled(ray_local, tmp_path_factory):
    """The same 12 steps of codistillation with each peer sharded (FSDP) over its two workers,
    publishing predictions and weights, and replicated (DDP) publishing weights. In lock-step a
    stale copy of round r's weights predicts exactly what its peer published from them, so the
    two ways of publishing train alike (equal to the last bit, measured at stop 50 with a DDP run
    of each): the one DDP run is the reference of both."""
    folder = tmp_path_factory.mktemp("sharded_rounds")
    return {(publish, sharding): train(small_config(folder, f"name={publish}_{sharding}", f"train.sharding={sharding}",
                                                    *TINY_GPT, *CODISTILL, f"method.publish={publish}", base=GPT),
                                       "ray")
            for publish, sharding in (("weights", "ddp"), ("predictions", "fsdp"), ("weights", "fsdp"))}


# A replicated peer's whole round of predictions: 4 steps × 8 windows × 32 positions × 1,024 tokens
# × 4 bytes (the distributions of the round's batches, max_staleness 0: one round ahead).
WHOLE_PREDICTIONS_ROUND = 4 * 8 * 32 * 1024 * 4


@pytest.mark.parametrize("publish", ["predictions", "weights"])
def test_fsdp_peers_codistil_with_the_losses_of_ddp_peers_each_worker_sending_its_own_piece(codistilled, publish):
    ddp, fsdp = train_rows(codistilled["weights", "ddp"]), train_rows(codistilled[publish, "fsdp"])
    assert ddp.keys() == fsdp.keys() == {(step, peer) for step in range(1, 13) for peer in (0, 1)}
    # The tolerance of the DML test (tests/test_sharding.py), for its reasons; here the stale copy
    # of a sharded peer all-gathers the fp32 shards it loaded, and a sharded publisher predicts
    # on its 4 rows of a batch where the replicated reference's stale copy predicts all 8 — the same rows, through
    # matrix products of another height (equal to the last bit measured here). A worker that
    # distilled from another's rows, or a shard loaded into the wrong place, moves the loss by >1e-3.
    for key, row in ddp.items():
        assert fsdp[key]["loss"] == pytest.approx(row["loss"], rel=1e-5, abs=1e-6), key
        assert fsdp[key]["workers"] == 2
    rounds = {s: [r for r in codistilled[p, s].records.to_pylist() if r.get("bytes_sent")]
              for p, s in (("weights", "ddp"), (publish, "fsdp"))}
    assert [r["round"] for r in rounds["fsdp"]] == [r["round"] for r in rounds["ddp"]] and len(rounds["ddp"]) == 6
    for d, f in zip(rounds["ddp"], rounds["fsdp"]):
        # A replicated peer's first worker sends the whole round; a sharded peer's (the recording
        # one) sends its own half — no worker gathered the whole to exchange it.
        whole = d["bytes_sent"] if publish == "weights" else WHOLE_PREDICTIONS_ROUND
        assert f["bytes_sent"] <= 0.6 * whole, (publish, d["round"])


def test_a_round_in_pieces_is_read_once_all_are_in_each_worker_fetching_its_own_piece_or_all(ray_local, tmp_path):
    """Through the peers' own handles on the lasting board: a round published in two pieces is
    readable once both are in; a worker whose pieces are cut alike fetches its own alone, a
    replicated one all; a restarted peer's pieces are never mixed with the lost training's."""
    import ray

    from codistill.exchange.base import Piece, Pieces
    from codistill.exchange.round_board import LastingRoundBoard, LastingRoundHandle
    from codistill.storage import RunStorage

    board = LastingRoundBoard.remote(2, 2**30)
    storage = RunStorage(str(tmp_path), "pieces")

    def handle(peer):
        return LastingRoundHandle(board, peer, 2, storage, 2**30)

    def publish(workers, index, r, value):
        workers[index].round_trip(r, 0, {"w": torch.full((2,), float(value))}, [], r, None, 5.0, keep=2,
                                  piece=Piece(index, 2, alone=True))

    def read(r, piece, timeout=5.0):
        answer = handle(1).round_trip(r, 1, None, [0], 0, None, timeout, keep=2, piece=piece)[1][0]
        if answer is None:
            return None
        assert isinstance(answer[1], Pieces) and answer[1].count == 2
        return answer[0], {i: p["w"][0].item() for i, p in answer[1].parts.items()}

    workers = [handle(0), handle(0)]
    publish(workers, 0, 0, 10)
    assert read(0, Piece(1, 2, alone=True), timeout=0.3) is None  # half a round is no round
    publish(workers, 1, 0, 11)
    assert read(1, Piece(1, 2, alone=True)) == (0, {1: 11.0})  # its own shard alone
    assert read(2, Piece()) == (0, {0: 10.0, 1: 11.0})  # a replicated reader: the whole
    assert ray.get(board.bytes_by_value.remote()) == 2 * 2 * 4
    # Peer 0 dies after its first worker published round 1, restarts from round 0 (new handles:
    # they rejoin) and publishes round 0 again: the old round 0 and the half round 1 are gone, and
    # the new round 0 is read only once both new pieces are in.
    publish(workers, 0, 1, 20)
    restarted = [handle(0), handle(0)]
    publish(restarted, 0, 0, 30)
    assert read(3, Piece(), timeout=0.3) is None
    publish(restarted, 1, 0, 31)
    assert read(4, Piece()) == (0, {0: 30.0, 1: 31.0})
    assert ray.get(board.state.remote())["rounds"][0] == [0]


def _exchange_shards(rank: int, init_file: str, out_file: str, config: dict) -> None:
    """In a 2-worker gloo world: a tiny Llama sharded over both, its weights round as each worker
    publishes it (its own shards), loaded into a sharded stale copy (own shard alone), into a
    replicated one (every piece: the fallback) and, from the whole, into a sharded one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from codistill.engine.sharding import blocks_of, fully_sharded, load_weights, local_shards
    from codistill.models import create_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (2,))

        def llama(seed, sharded):
            torch.manual_seed(seed)
            net = create_model("hf_causal_lm", 64, config=config)
            return fully_sharded(net, blocks_of("hf_causal_lm", net), mesh, MixedPrecisionPolicy()) if sharded else net

        def local(net):
            return {k: v.to_local().clone() if hasattr(v, "to_local") else v.clone() for k, v in net.state_dict().items()}

        published = llama(0, True)
        pieces = [None, None]
        dist.all_gather_object(pieces, local_shards(published))  # what the board carries: one piece a worker
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        own, fallback, from_whole = llama(1, True), llama(2, False), llama(3, True)
        load_weights(own, [pieces[rank]], own=True)
        load_weights(fallback, pieces, own=False)
        whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v  # what a replicated peer publishes
                 for k, v in published.state_dict().items()}
        load_weights(from_whole, [whole], own=False)
        with torch.no_grad():
            logits = {name: net(x).float() for name, net in
                      (("published", published), ("own", own), ("fallback", fallback), ("from_whole", from_whole))}
        torch.save({"local": {n: local(net) for n, net in (("published", published), ("own", own),
                                                             ("from_whole", from_whole))},
                    "fallback": fallback.state_dict(), "whole": whole, "logits": logits,
                    "own_numel": sum(v.to_local().numel() if hasattr(v, "to_local") else v.numel()
                                     for v in own.state_dict().values()),
                    "whole_numel": sum(v.numel() for v in whole.values())}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a gloo world of its own processes (torch and transformers imported in each)
def test_a_weights_round_loads_shard_by_shard_into_a_sharded_copy_and_whole_where_shardings_differ(tmp_path):
    """The shard logic of a weights round (engine/sharding.py) on two gloo processes: a worker of a
    sharded copy loads its own shard alone and holds half; a replicated copy (a DDP peer, or one
    sharded otherwise) makes the whole from both pieces; a sharded copy takes its shard of a
    whole round (a replicated publisher). All predict as the published network does."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "seen")
    mp.spawn(_exchange_shards, args=(str(tmp_path / "init"), out, yaml.safe_load(TINY_LLAMA)), nprocs=2, join=True)
    seen = [torch.load(f"{out}.{rank}") for rank in (0, 1)]
    for rank in seen:
        for name in ("own", "from_whole"):
            for key, value in rank["local"]["published"].items():
                assert torch.equal(rank["local"][name][key], value), (name, key)  # exactly the published shard
        for key, value in rank["whole"].items():
            assert torch.equal(rank["fallback"][key], value), key
        assert rank["own_numel"] <= 0.6 * rank["whole_numel"]
        for name in ("own", "fallback", "from_whole"):
            assert torch.allclose(rank["logits"][name], rank["logits"]["published"], rtol=1e-5, atol=1e-6), name
