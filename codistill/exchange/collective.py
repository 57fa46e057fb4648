"""torch.distributed all_gather over the peers' group: gloo on CPU, NCCL on GPU.

The fast path for every-step exchange. With several data-parallel workers per peer, worker m
of every peer forms one exchange group (they hold the same slice of the batch).

`all_gather` needs one tensor of one shape on every rank, while a payload is named tensors
whose shapes may differ between peers (e.g. attention maps of two architectures). So each
call packs the payload into one byte buffer behind a small header (each tensor's dtype and
shape) and gathers the buffers padded to one agreed capacity.

The capacity is what every peer learnt from the previous call with the same names (every peer
makes the same calls in the same order, so all agree on it without asking): one collective
per call once the payloads' sizes are known — the steady state of training. A call whose
payload outgrows it (the first call, an evaluation's test logits the first time, a top-k
payload that grew) says so in its buffer's first field, and the call gathers once more at the
new capacity: two collectives, as every call needed before.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from codistill.exchange.base import Exchange, Payload

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool]
MAX_DIMS = 6
FIELDS = 2 + MAX_DIMS  # dtype code, number of dims, the dims


def pack(payload: Payload, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(header: int64 (len(payload)·FIELDS,), data: uint8 bytes of every tensor, in name order)."""
    header, chunks = [], []
    for name in sorted(payload):
        t = payload[name].detach().contiguous()
        if t.dim() > MAX_DIMS:
            raise ValueError(f"payload {name!r} has {t.dim()} dims; the collective transport packs at most {MAX_DIMS}")
        header += [DTYPES.index(t.dtype), t.dim(), *t.shape, *[0] * (MAX_DIMS - t.dim())]
        chunks.append(t.reshape(-1).view(torch.uint8).to(device))
    data = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=device)
    return torch.tensor(header, dtype=torch.int64, device=device), data


def described(header: torch.Tensor) -> list[tuple[torch.dtype, list[int], int]]:
    """(dtype, shape, bytes) of each tensor a header describes."""
    out = []
    for row in header.view(-1, FIELDS).tolist():
        dtype, shape = DTYPES[row[0]], row[2:2 + row[1]]
        out.append((dtype, shape, math.prod(shape) * torch.empty((), dtype=dtype).element_size()))
    return out


def unpack(names: list[str], header: torch.Tensor, data: torch.Tensor) -> Payload:
    out, offset = {}, 0
    for name, (dtype, shape, size) in zip(names, described(header)):
        # clone: a view at an odd byte offset cannot be reinterpreted as a wider dtype
        out[name] = data[offset:offset + size].clone().view(dtype).view(shape)
        offset += size
    return out


class CollectiveExchange(Exchange):
    def __init__(self, peer: int, num_peers: int, group=None, device: torch.device | None = None):
        self.peer = peer
        self.num_peers = num_peers
        self.group = group
        self.device = device or torch.device("cpu")
        self.capacity: dict[tuple[str, ...], int] = {}  # names → data bytes every peer's buffer holds

    def _gather(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        gathered = [torch.empty_like(buffer) for _ in range(self.num_peers)]
        dist.all_gather(gathered, buffer, group=self.group)
        return gathered

    def all_gather(self, payload: Payload) -> list[Payload]:
        names = sorted(payload)
        header, data = pack(payload, self.device)
        capacity = self.capacity.get(tuple(names), 0)
        # [data bytes (int64) | header (int64s) | data padded to the capacity], as bytes. A payload
        # larger than the capacity sends its size and header only; the data follow in a second round.
        fits = data.numel() <= capacity
        head = torch.cat([torch.tensor([data.numel()], dtype=torch.int64, device=self.device), header])
        buffer = torch.zeros(head.numel() * 8 + capacity, dtype=torch.uint8, device=self.device)
        buffer[:head.numel() * 8] = head.view(torch.uint8)
        if fits:
            buffer[head.numel() * 8:head.numel() * 8 + data.numel()] = data
        gathered = self._gather(buffer)
        heads = [b[:head.numel() * 8].clone().view(torch.int64) for b in gathered]
        sizes = [int(h[0]) for h in heads]
        if max(sizes) <= capacity:
            datas = [b[head.numel() * 8:] for b in gathered]
        else:  # someone outgrew the capacity: every peer sends its data again at the new one
            capacity = max(sizes)
            padded = torch.zeros(capacity, dtype=torch.uint8, device=self.device)
            padded[:data.numel()] = data
            datas = self._gather(padded)
        self.capacity[tuple(names)] = capacity
        return [unpack(names, h[1:], d) for h, d in zip(heads, datas)]
