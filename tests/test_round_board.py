"""Weights rounds that fit (issue 42, item 3): the round board of peers apart holds at most
`exchange.round_board_mb` of rounds in its node's object store — the rest are snapshots on the
run's storage, written once by their publisher, the board holding references — and a peer that
restarts reads exactly the rounds it read before. Memory is read from the object store's own
accounting (the raylet's store stats), never estimated."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from codistill import train
from tests.conftest import committed_step, small_config
from tests.test_ray_runner import flat


def object_store_bytes() -> tuple[int, int]:
    """(bytes in this Ray instance's object store now, bytes it ever spilled to disk): the
    raylet's own count, what `ray memory --stats-only` prints."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
    return stats.object_store_bytes_used, stats.spilled_bytes_total


def test_a_restarted_reader_reads_again_exactly_the_rounds_it_read_before_not_the_newer_ones(ray_local):
    """Peers apart read each other's newest weights, so a peer that restarted would read rounds
    published after the ones it read before its crash — and train differently from a peer that
    was never killed. The board remembers what it served each reader for each of its rounds and
    keeps those rounds (beyond the publisher's own `keep`) until the reader is past them."""
    import ray

    from codistill.exchange.round_board import LastingRoundBoard

    board = LastingRoundBoard.remote(2)

    def publish(peer, r, **kw):
        ray.get(board.publish.remote(0, r, peer, [{"w": torch.full((1,), float(10 * peer + r))}], 2, **kw))

    def read(reader, r, **kw):  # a weights reader: any round will do (max_round None)
        answer = ray.get(board.round_trip.remote(0, r, reader, [{"w": torch.zeros(1)}], [1 - reader], 0, None,
                                                 5.0, 4, **kw))[1 - reader]
        return None if answer is None else (answer[0], ray.get(answer[1][0])["w"].item())

    publish(1, 0)
    assert read(0, 0) == (0, 10.0)
    for r in (1, 2):
        publish(1, r)
    assert read(0, 1) == (2, 12.0)  # the newest
    for r in (3, 4, 5):
        publish(1, r)
    # Peer 1 keeps 2 rounds of its own (4, 5), and the ones peer 0 read (0 and 2): pinned.
    assert ray.get(board.state.remote())["rounds"][1] == [0, 2, 4, 5]
    # Peer 0 restarts from round 0 and asks for rounds 0 and 1 again: what it read, not round 5.
    assert read(0, 0, rejoin=True) == (0, 10.0)
    assert read(0, 1) == (2, 12.0)
    assert read(0, 2) == (5, 15.0)  # a round it never reached before: the newest, as any reader
    # Peer 1 restarts from its round 2 and publishes it again: a reader that asks again for a
    # round it was served from the thrown-away training reads the round as published now.
    publish(1, 2, rejoin=True)
    assert ray.get(board.state.remote())["rounds"][1] == [0, 2]
    assert read(0, 1) == (2, 12.0)
    # Once the reader is past them (its own keep of 4), the pinned rounds go with the next publication.
    for r in range(3, 8):
        read(0, r)
    publish(1, 3)
    assert ray.get(board.state.remote())["rounds"][1] == [2, 3]


def test_a_round_beyond_the_boards_share_is_a_snapshot_on_the_runs_storage_and_the_board_holds_no_copy(
        ray_local, tmp_path):
    """Through the peers' own handles: weights that fit the share travel by value (the board's
    object, counted); weights that do not are written once to `rounds/`, read back equal by the
    other peer, the board holding only their references, and deleted when the board drops them."""
    import time

    import ray

    from codistill.exchange.round_board import LastingRoundBoard, LastingRoundHandle
    from codistill.exchange.snapshots import ROUNDS_DIR
    from codistill.storage import RunStorage

    storage = RunStorage(str(tmp_path), "run")
    weights = {"layer.weight": torch.randn(512, 512), "layer.bias": torch.randn(512)}  # 1 MiB
    size = 4 * (512 * 512 + 512)
    keep = 3

    def exchange_rounds(mb: float, rounds: int):
        board = LastingRoundBoard.remote(2, int(mb * 2**20))
        # Peer 0 only publishes, peer 1 only reads (no payload: as a data-parallel peer's other
        # replicas do).
        publisher = LastingRoundHandle(board, 0, 2, storage, int(mb * 2**20))
        reader = LastingRoundHandle(board, 1, 2, storage, int(mb * 2**20))
        answers = []
        for r in range(rounds):
            publisher.round_trip(r, 0, {n: t + r for n, t in weights.items()}, [], r, None, 5.0, keep)
            answers.append(reader.round_trip(r, 1, None, [0], r, None, 5.0, keep)[1][0])
        return board, answers

    # 64 MiB: the 2 × 3 rounds of peer 0 the board may hold (its own 3, and 3 that peer 1's record
    # of what it read may pin) fit peer 0's 32 MiB share: by value. Held: its newest 3, and the
    # one before, which peer 1 read 3 of its rounds ago.
    board, answers = exchange_rounds(64, 5)
    assert ray.get(board.bytes_by_value.remote()) == (keep + 1) * size
    assert answers[-1][0] == 4 and torch.equal(answers[-1][1]["layer.weight"], weights["layer.weight"] + 4)
    assert not storage.exists(ROUNDS_DIR)
    ray.kill(board)

    used_before, _ = object_store_bytes()
    board, answers = exchange_rounds(4, 6)  # a 2 MiB share: 6 × 1 MiB does not fit
    assert ray.get(board.bytes_by_value.remote()) == 0
    for r, (published, payload) in enumerate(answers):
        assert published == r and torch.equal(payload["layer.bias"], weights["layer.bias"] + r)
    used_after, spilled = object_store_bytes()
    assert used_after - used_before < size and spilled == 0  # not one round's copy in the object store
    time.sleep(0.5)  # the board deletes dropped snapshots off its event loop
    files = storage.list(f"{ROUNDS_DIR}/peer0")
    assert len(files) == keep + 1 and all(f.startswith("round_") for f in files), files  # the rest deleted
    assert not storage.exists(f"{ROUNDS_DIR}/peer1")  # peer 1 published nothing
    ray.kill(board)


def test_round_board_memory_of_weights_rounds_apart_stays_within_its_bound_over_a_run_with_a_restart(
        ray_local, tmp_path):
    """Codistillation with weights, each peer its own Ray Train run, peer 0 killed after a
    checkpoint and restarted by Ray (`ray.max_failures: 1`). Each round is a ~1.1 MB state dict;
    the board keeps 10 rounds per peer (2·0 + 2 + 2·⌈40/10⌉), 22 MB held by value before this
    change, against a bound of 2 MiB here. The object store's own accounting, sampled through the
    run, stays within the bound; and the killed run ends exactly as an uninterrupted one: the
    restarted peer read again the rounds it had read (at max_staleness 0 the others wait for it)."""
    overrides = ["train.steps=200", "train.checkpoint_every=40", "train.eval_every=100",
                 "peers=[{model: mnist1d_mlp, model_args: {hidden: 500}}, {model: mnist1d_mlp, model_args: {hidden: 500}}]",
                 "peers.*.optimizer.schedule=constant", "method.burn_in=0", "method.period=10",
                 "method.max_staleness=0", "method.publish=weights", "exchange.round_board_mb=2"]
    base = "configs/codistill_mnist1d.yaml"
    used_before, spilled_before = object_store_bytes()
    peak, done = [0], threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], object_store_bytes()[0] - used_before)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    killed = {}

    def kill_after_a_checkpoint(step, metrics):
        if not killed and "pid" in metrics and committed_step(tmp_path / "bounded" / "peer0") >= 40:
            killed["at"] = step
            os.kill(metrics["pid"], signal.SIGKILL)

    try:
        result = train(small_config(tmp_path, "name=bounded", *overrides, "ray.max_failures=1", base=base), "ray",
                       on_progress=kill_after_a_checkpoint)
    finally:
        done.set()
        sampler.join()
    assert killed and killed["at"] < 200, "the peer was not killed mid-run"
    rows = result.records.to_pylist()
    assert [r["peer"] for r in rows if r.get("resumed")] == [0]  # peer 0 alone restarted
    for peer in (0, 1):
        assert [r["step"] for r in rows if r["split"] == "train" and r["peer"] == peer] == list(range(1, 201))
    assert object_store_bytes()[1] == spilled_before  # nothing was spilled out of the count
    assert 0 <= peak[0] <= 2 * 2**20, f"the object store held {peak[0]:,} bytes more during the run"
    print(f"\nthe object store's peak during the run: {peak[0]:,} bytes above its start (bound {2 * 2**20:,})")
    assert not result.storage.exists("rounds")  # the snapshots go with the run's end
    reference = train(small_config(tmp_path, *overrides, "name=uninterrupted", base=base), "local")
    assert flat(result.final) == pytest.approx(flat(reference.final))


def test_a_negative_round_board_bound_is_refused_in_one_line_naming_the_key(tmp_path):
    from codistill.config import ConfigError

    with pytest.raises(ConfigError, match=r"exchange\.round_board_mb: must be >= 0 \(0: every round on storage\)"):
        small_config(tmp_path, "exchange.round_board_mb=-1", base="configs/codistill_mnist1d.yaml")
    assert small_config(tmp_path, base="configs/codistill_mnist1d.yaml").exchange.round_board_mb == 256
