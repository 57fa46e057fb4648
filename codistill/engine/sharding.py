"""A peer split over its M workers with FSDP2 (`train.sharding: fsdp`), and what the rest of the
engine needs to know of a split peer, in one place.

- `fully_sharded`: `fully_shard` (torch.distributed.fsdp, FSDP2) on each transformer block the
  model registry declares (`ModelEntry.blocks`: hf_causal_lm's decoder layers, gpt's blocks) —
  else on each top-level child of the network — then on the root, over the peer's replica
  dimension of the `PeerMesh`. Each worker then holds 1/M of the parameters, of their gradients
  and of the optimizer's state (its moments are shaped like the shards it is built over: the
  optimizer is built after sharding, since FSDP2 replaces the parameters with their shards).
  Parameters are all-gathered block by block in forward and backward; gradients are
  reduce-scattered, averaged over the replicas as DDP's all-reduce averages them.
- `checkpoint_activations`: each block's forward under `torch.utils.checkpoint` (non-reentrant,
  the form that composes with FSDP2): only a block's input is kept for backward.
- A split peer's checkpoint (`save_shards`, `load_shards`): written with
  `torch.distributed.checkpoint` (DCP), each worker its own shards of the weights and of the
  optimizer's state (no worker gathers the model to write it), into one folder whose metadata
  says where every piece of every tensor lies — so it loads into whatever split the reader has
  (resharding: written by 2 workers, read by 1 or 4), or whole without a process group
  (`whole_from_shards`: `codistill export`, teachers, a replicated peer resuming it).
- A weights round of a split peer (`local_shards`, `load_weights`): each worker's own shards,
  loaded into a stale copy sharded alike as they are, else made whole from every piece.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from codistill.models import MODELS

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

# FSDP2, DTensor and DCP are imported where a sharded peer first needs them, not here: the stack
# costs ~0.75 s of import in every process that loads the engine (every CLI call, the driver of
# every run), and a replicated peer never uses DCP. (A training process loads FSDP2 and DTensor
# anyway: torch's optimizer imports torch._dynamo at its first step, which imports them.) Until
# something has imported it nothing can be a DTensor, which is how the every-step checks below
# (`_local`, `is_sharded`) answer without importing it.


def _loaded_class(module: str, name: str):
    """Class `name` of `module` if something has imported the module, else None."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name) if loaded is not None else None


def _is_dtensor(t) -> bool:
    cls = _loaded_class("torch.distributed.tensor", "DTensor")
    return cls is not None and isinstance(t, cls)


def _local(t):
    """A DTensor's own shard on this worker; any other tensor as it is."""
    return t.to_local() if _is_dtensor(t) else t


def blocks_of(model: str, base: nn.Module) -> list[nn.Module]:
    """The transformer blocks of registered model `model` built as `base` ([]: it declares none)."""
    find = MODELS[model].blocks
    return find(base) if find is not None else []


def checkpoint_activations(blocks: list[nn.Module]) -> None:
    """Each of `blocks` recomputes its forward in backward instead of keeping its activations.
    The instance's `forward` is replaced, not the module: the state dict's keys, the feature taps'
    paths and the checkpoints stay what they were."""
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def fully_sharded(network: nn.Module, blocks: list[nn.Module], mesh, policy: MixedPrecisionPolicy,
                  frozen: bool = False) -> nn.Module:
    """`network` sharded in place over the 1-D device mesh `mesh`: `blocks` one by one (or else
    its top-level children that hold parameters), then the root, which takes what is left (the
    embeddings, the last norm and the head, a method's own modules). The root casts its output
    to fp32 under a bf16 policy, so every loss is computed in fp32 as under autocast. `frozen` (a
    teacher): the root is resharded after each forward too — FSDP keeps a root's parameters
    gathered after forward for the backward that follows, which a frozen network never runs, so
    each worker would hold the teacher's embeddings and head whole from its first step on."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    units = blocks or [child for child in network.children() if any(True for _ in child.parameters())]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    root = MixedPrecisionPolicy(policy.param_dtype, policy.reduce_dtype,
                                torch.float32 if policy.param_dtype is not None else None)
    fully_shard(network, mesh=mesh, mp_policy=root)
    if frozen:
        network.register_forward_hook(lambda module, args, output: module.reshard())
    return network


def is_sharded(network: nn.Module) -> bool:
    cls = _loaded_class("torch.distributed.fsdp", "FSDPModule")
    return cls is not None and isinstance(network, cls)


def _group(network: nn.Module):
    """The process group a split peer's shards are over (its replicas; not the whole Ray group)."""
    return next(p for p in network.parameters() if _is_dtensor(p)).device_mesh.get_group()


def file_digest(path: str, stream=None) -> tuple[int, str]:
    """(bytes, sha256) of a file, read in pieces (a shard may be gigabytes)."""
    digest, size = hashlib.sha256(), 0
    with (stream if stream is not None else open(path, "rb")) as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
            size += len(piece)
    return size, digest.hexdigest()


def save_shards(network: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> dict[str, list]:
    """Every replica of a split peer writes its own shards of the weights and of the optimizer's
    state into its local `folder` (a collective: all of them call it; the first also writes the
    metadata). The folders of all replicas together are the checkpoint: what DCP's metadata
    names are file names relative to it. Returns {file: [bytes, sha256]} of every replica's
    files, gathered (a few bytes each), for the peer file: a shard damaged later is found."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(network, optimizer)  # the local shards (DTensors), keyed by name
    group = _group(network)
    dcp.save({"model": model, "optimizer": optim}, storage_writer=FileSystemWriter(folder), process_group=group)
    own = {name: list(file_digest(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, own, group=group)
    return {name: value for files in everyone for name, value in files.items()}


def load_shards(network: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    """A DCP checkpoint (`save_shards`', from any number of workers) read into a split peer, each
    replica reading only the pieces of its own shards (a collective over the peer's replicas)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optim = get_state_dict(network, optimizer)  # the shapes to read into; initialises Adam's moments
    state = {"model": model, "optimizer": optim}
    dcp.load(state, storage_reader=FileSystemReader(folder), process_group=_group(network))
    set_state_dict(network, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    optimizer.zero_grad(set_to_none=True)  # get_state_dict stepped once over zero gradients to shape the moments


def whole_from_shards(folder: str) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of a DCP checkpoint, whole, as a replicated peer's (the
    optimizer's keyed by parameter number in its groups' order, as `Optimizer.state_dict()`),
    read in this process alone: no process group, whatever the caller's."""
    from torch.distributed.checkpoint import FileSystemReader
    # DCP's own conversion to one torch.save file (format_utils.dcp_to_torch_save) reads this way.
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner, _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    optim = state["optimizer"]
    number = {name: i for i, name in enumerate(n for group in optim["param_groups"] for n in group["params"])}
    groups = [{**group, "params": [number[n] for n in group["params"]]} for group in optim["param_groups"]]
    return state["model"], {"state": {number[n]: s for n, s in optim["state"].items()}, "param_groups": groups}


def _shard_like(whole: torch.Tensor, like):
    """This rank's shard of `whole` laid out as `like` (every rank holds `whole`: no communication)."""
    if not _is_dtensor(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def load_full_state(network: nn.Module, optimizer: torch.optim.Optimizer, model: dict, optimizer_state: dict) -> None:
    """Put a replicated peer's state dicts (a `.pt` checkpoint file, or `whole_from_shards`') into
    `network` and `optimizer`, each rank of a split peer keeping its own shards."""
    if not is_sharded(network):
        network.load_state_dict(model)
        optimizer.load_state_dict(optimizer_state)
        return
    network.load_state_dict({k: _shard_like(model[k], v) for k, v in network.state_dict().items()})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {int(i): {k: _shard_like(v, params[int(i)]) if isinstance(v, torch.Tensor) and v.dim() else v
                      for k, v in s.items()} for i, s in optimizer_state["state"].items()}
    optimizer.load_state_dict({**optimizer_state, "state": state})


def local_shards(network: nn.Module) -> dict[str, torch.Tensor]:
    """This worker's own shard of each tensor of `network`'s state dict (a tensor FSDP leaves whole,
    a buffer, whole), copied to the CPU: its piece of a weights round — nothing is gathered."""
    return {k: _local(v).detach().cpu().clone()
            for k, v in network.state_dict().items()}


def whole_from_pieces(pieces: list[dict], like: dict) -> dict:
    """The whole tensors of every worker's `local_shards`, in worker order. FSDP2 cuts each
    parameter in dim 0 as `torch.chunk` does (the last shards shorter, or empty), so the whole is
    their concatenation; a tensor whose first piece already has the whole shape (`like`'s: a
    buffer, or a parameter too short to cut) is that piece."""
    return {k: pieces[0][k] if pieces[0][k].shape == v.shape else torch.cat([p[k] for p in pieces])
            for k, v in like.items()}


def load_weights(network: nn.Module, pieces: list[dict], own: bool) -> None:
    """A weights round into `network`. `own`: `pieces` is this worker's shard alone, published by
    the same worker of a peer sharded as `network` is — each tensor becomes this worker's local
    shard and nothing whole exists here. Otherwise (the publisher was replicated, or sharded over
    another number of workers) the whole state is made from all its pieces — this worker holds
    the whole model for a moment — and each worker keeps its own shard of it."""
    state = network.state_dict()
    if own:
        piece, dtensor = pieces[0], _loaded_class("torch.distributed.tensor", "DTensor")
        network.load_state_dict({k: dtensor.from_local(piece[k].to(v.device, v.dtype), v.device_mesh, v.placements,
                                                       run_check=False, shape=v.shape, stride=v.stride())
                                 if _is_dtensor(v) else piece[k] for k, v in state.items()})
        return
    whole = pieces[0] if len(pieces) == 1 else whole_from_pieces(pieces, state)
    network.load_state_dict({k: _shard_like(whole[k], v) for k, v in state.items()})


def all_finite(network: nn.Module) -> bool:
    """Whether every weight of `network` is finite, agreed by all the replicas of a split peer (each
    checks its own shards), so all of them stop or none does."""
    local = [_local(p) for p in network.parameters()]
    finite = torch.stack([p.isfinite().all() for p in local]).all()
    if is_sharded(network):
        flag = finite.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_group(network))
        finite = flag.bool()
    return bool(finite)


def local_state_bytes(network: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The bytes of a peer's parameters, gradients and optimizer state this worker holds itself
    (its shards under FSDP; everything under DDP): what sharding divides by M."""

    def nbytes(t) -> int:
        t = _local(t)
        return t.numel() * t.element_size()

    params = list(network.parameters())
    return {"parameters": sum(nbytes(p) for p in params),
            "gradients": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(nbytes(v) for s in optimizer.state.values() for v in s.values()
                             if isinstance(v, torch.Tensor))}
