"""The collective transport's packing, tested directly (no Ray): a payload of named tensors of
mixed dtypes and shapes becomes one header and one byte buffer, and comes back bit for bit —
also through a real gloo all_gather between two processes whose payloads differ in shape."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codistill.exchange.collective import CollectiveExchange, described, pack, unpack


def mixed_payload(rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    return {
        "logits": torch.randn(rows, 10, generator=g),
        "ids": torch.randint(0, 50_000, (rows, 8), generator=g, dtype=torch.int64).to(torch.int32),
        "mask": torch.rand(rows, generator=g) > 0.5,                       # 1 byte each: odd offsets follow
        "bytes": torch.randint(0, 255, (3,), generator=g, dtype=torch.int64).to(torch.uint8),
        "half": torch.randn(rows, 3, generator=g).to(torch.float16),
        "brain": torch.randn(2, rows, 1, 2, generator=g).to(torch.bfloat16),
        "double": torch.randn(rows, generator=g, dtype=torch.float64),
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 4),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert b[name].dtype == a[name].dtype and b[name].shape == a[name].shape, name
        assert torch.equal(b[name], a[name]), name


def test_pack_and_unpack_give_back_every_dtype_and_shape_bit_for_bit():
    payload = mixed_payload(5)
    header, data = pack(payload, torch.device("cpu"))
    assert header.dtype == torch.int64 and data.dtype == torch.uint8
    sizes = [size for _, _, size in described(header)]
    assert sum(sizes) == data.numel() == sum(t.numel() * t.element_size() for t in payload.values())
    assert_same(payload, unpack(sorted(payload), header, data))
    # Padded to a longer buffer (as all_gather pads to the longest peer's): the tail is ignored.
    padded = torch.cat([data, torch.full((37,), 255, dtype=torch.uint8)])
    assert_same(payload, unpack(sorted(payload), header, padded))


def test_a_non_contiguous_tensor_is_packed_as_its_values():
    t = torch.arange(24.0).view(4, 6).t()  # a transposed view
    header, data = pack({"x": t}, torch.device("cpu"))
    assert torch.equal(unpack(["x"], header, data)["x"], t)


def test_a_tensor_of_too_many_dims_is_refused_by_name():
    with pytest.raises(ValueError, match="'deep' has 7 dims"):
        pack({"deep": torch.zeros([1] * 7)}, torch.device("cpu"))


# Rows of each rank's payload at each call: the same sizes (the steady state), rank 1's outgrowing
# the capacity alone, both shrinking.
CALLS = [(4, 5), (4, 5), (4, 9), (4, 9), (2, 3)]


def _gather_in_process(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        exchange = CollectiveExchange(rank, 2)
        rounds = []
        gather = exchange._gather
        exchange._gather = lambda buffer: rounds.append(1) or gather(buffer)
        results = []
        for rows in CALLS:
            before = len(rounds)
            results.append((exchange.all_gather(mixed_payload(rows=rows[rank])), len(rounds) - before))
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # > 1.5 s: the full tier
def test_two_processes_with_payloads_of_different_shapes_gather_each_others_exactly(tmp_path):
    init_file, out_file = str(tmp_path / "init"), str(tmp_path / "out")
    mp.start_processes(_gather_in_process, args=(init_file, out_file), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        results = torch.load(f"{out_file}.{rank}", weights_only=True)
        for rows, (gathered, collectives) in zip(CALLS, results):
            assert len(gathered) == 2
            for peer in range(2):  # shapes differ by peer
                assert_same(mixed_payload(rows=rows[peer]), gathered[peer])
        # One collective once the capacity is known; two when a payload outgrows it (the first
        # call; rank 1's alone at the third, which both ranks must take part in).
        assert [c for _, c in results] == [2, 1, 2, 1, 1]
