"""torch.distributed all_gather over the peers' group: gloo on CPU, NCCL on GPU.

The fast path for every-step exchange. With several data-parallel workers per peer, worker m
of every peer forms one exchange group (they hold the same slice of the batch).

`all_gather` needs one tensor of one shape on every rank, while a payload is named tensors
whose shapes may differ between peers (e.g. attention maps of two architectures). So each
call packs the payload into one byte buffer and first gathers a small header (each tensor's
dtype and shape), then the buffers padded to the longest: two collectives, the second the
size of the data.
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

    def all_gather(self, payload: Payload) -> list[Payload]:
        names = sorted(payload)
        header, data = pack(payload, self.device)
        headers = [torch.empty_like(header) for _ in range(self.num_peers)]
        dist.all_gather(headers, header, group=self.group)
        sizes = [sum(size for _, _, size in described(h)) for h in headers]
        padded = torch.zeros(max(sizes), dtype=torch.uint8, device=self.device)
        padded[:data.numel()] = data
        buffers = [torch.empty_like(padded) for _ in range(self.num_peers)]
        dist.all_gather(buffers, padded, group=self.group)
        return [unpack(names, h, b) for h, b in zip(headers, buffers)]
