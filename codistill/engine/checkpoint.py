"""Self-describing checkpoints: a folder per checkpoint with one file per peer and `meta.pt`
(step and the resolved config, enough to rebuild every peer). Loaded with `weights_only=True`:
plain tensors and containers only, never pickled code.

A peer file (`peer{k}.pt`, written by `peer_state`) holds:
  peer, step, model_name, model_args   which registered model, built how (nanoGPT's habit:
                                       the file alone rebuilds the model)
  model                                the state dict of the network the method trained (the
                                       registered model, possibly wrapped: a gate, a regressor)
  base_prefix                          where the registered model's own tensors sit in `model`
                                       ("" when unwrapped; None when the network is not one
                                       model, e.g. a trunk with branches)
  optimizer, torch_rng, [data], and the precision's state ([grad_scaler] for fp16)

A peer split over its workers (FSDP) writes its weights and optimizer state as a
`torch.distributed.checkpoint` folder beside its file instead (`peer{k}.dcp/`, each worker its
own shards: `sharding.save_shards`); its file then holds no `model` nor `optimizer` but `shards`:
{"folder": "peer{k}.dcp", "files": {name: [bytes, sha256]}} — every file of the folder as
written, so a shard truncated, garbled or missing makes the checkpoint as damaged as a bad peer
file does. Reading them: `engine/shard_files.py`."""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import time

import torch

from codistill.data.task import Fingerprint
from codistill.engine.shard_files import check_shards, shards_folder, shards_on_disk, whole, with_shards
from codistill.engine.sharding import is_sharded, load_full_state, load_shards, save_shards
from codistill.errors import RunError, first_line
from codistill.storage import RunStorage

META_FILE = "meta.pt"
LOCAL_CHECKPOINT_DIR = "checkpoints"
# `step_00000120`, or `step_00000120.retrained1` for a step trained again after its checkpoint was
# found damaged on Ray: Ray Train deletes the checkpoints it prunes by folder, so a retrained step
# written into the damaged one's folder would be deleted as the damaged one's old entry.
CHECKPOINT_DIR = re.compile(r"step_(\d{8})(?:\.retrained(\d+))?")
# Where checkpoints that are thrown away go: moved aside, never deleted — on object storage a
# read can fail for a moment, and a good checkpoint must never be lost to a passing error.
SET_ASIDE_DIR = "set_aside"
# A read that fails is tried again before the checkpoint counts as damaged (waits in seconds).
READ_RETRY_WAITS = (0.2, 1.0)
logger = logging.getLogger(__name__)


def checkpoint_name(step: int, retrained: int = 0) -> str:
    return f"step_{step:08d}" + (f".retrained{retrained}" if retrained else "")


def retrained_of(folder: str) -> int:
    """How many times the step of checkpoint `folder` (a name or a path) was trained again (0: never)."""
    match = CHECKPOINT_DIR.fullmatch(folder.rsplit("/", 1)[-1])
    return int(match.group(2) or 0) if match else 0


def peer_file(peer: int) -> str:
    return f"peer{peer}.pt"


def to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


CHECKPOINT_FORMAT = 2
"""The format of a peer's checkpoint file, written into it (`format`). Format 1 (no `format`
written) is every file from before: some without `base_prefix` (a wrapped model sat under
"model."), the model's name and args, or a data fingerprint of today's fields. `upgrade` reads
any older file as today's, so no other reader guesses what an old file meant."""


def from_bytes(data: bytes) -> dict:
    """A checkpoint file (a peer's, a run's `meta.pt`, or a plain state dict), peer files
    upgraded to `CHECKPOINT_FORMAT`: the one reader every loader goes through."""
    return upgrade(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def is_peer_file(state: dict) -> bool:
    """A peer's checkpoint file (`peer_state`'s), not a plain state dict or a run's meta file."""
    return (isinstance(state.get("model"), dict) and "optimizer" in state or "shards" in state) and "step" in state


def upgrade(state: dict) -> dict:
    """A peer file of any earlier format as one of `CHECKPOINT_FORMAT` (other files as they are).
    What format 1 left unsaid is said here, once: a missing `base_prefix` is "model." when every
    weight sits under it (a wrapped model) and "" otherwise; an unrecorded model is None (the
    reader's config names it, `saved_model`); a fingerprint gets its fields' defaults
    (`Fingerprint.from_dict`). A file of a newer format than this codistill's is refused."""
    if not is_peer_file(state):
        return state
    version = state.get("format", 1)
    if version > CHECKPOINT_FORMAT:
        raise RunError(f"a checkpoint of format {version} was written by a newer codistill than this one (which "
                       f"reads up to format {CHECKPOINT_FORMAT}): upgrade codistill to resume it")
    if version == CHECKPOINT_FORMAT:
        return state
    state = dict(state)
    weights = state["model"]
    if "base_prefix" not in state:
        state["base_prefix"] = "model." if weights and all(k.startswith("model.") for k in weights) else ""
    state.setdefault("model_name", None)
    state.setdefault("model_args", None)
    if state.get("data"):
        state["data"] = Fingerprint.from_dict(state["data"]).as_dict()
    state["format"] = CHECKPOINT_FORMAT
    return state


def base_prefix(network: torch.nn.Module, base: torch.nn.Module) -> str | None:
    """The state-dict prefix of the registered model `base` inside the trained `network`."""
    for name, module in network.named_modules():
        if module is base:
            return f"{name}." if name else ""
    return None


def peer_state(job, step: int) -> dict:
    """What a checkpoint holds of a peer (`job`: its `PeerJob`): its network (never a teacher),
    optimizer and RNG, and what rebuilds its model. A split peer's weights and optimizer state
    are not in it but written by `write_peer` on every replica (`write_shards`)."""
    peer = job.peer
    sharded = is_sharded(peer.network)
    weights = ({"write_shards": lambda folder: save_shards(peer.network, peer.optimizer, folder)} if sharded
               else {"model": peer.network.state_dict(), "optimizer": peer.optimizer.state_dict()})
    return {"format": CHECKPOINT_FORMAT, "peer": peer.index, "model_name": peer.spec.model, "model_args": dict(peer.spec.model_args),
            "base_prefix": base_prefix(peer.network, peer.base), "step": step, **weights,
            "torch_rng": torch.get_rng_state(),
            **({"data": job.data.fingerprint.as_dict()} if job.data.fingerprint else {}),
            **job.precision.state_dict()}


def write_peer(folder: str, peer: int, state: dict, leader: bool) -> None:
    """A peer's checkpoint into the local `folder`: a split peer's shards by every replica (a
    collective), then its file by its leader (`leader`)."""
    state = dict(state)
    write_shards = state.pop("write_shards", None)
    if write_shards is not None:
        state["shards"] = {"folder": shards_folder(peer), "files": write_shards(os.path.join(folder, shards_folder(peer)))}
    if leader:
        with open(os.path.join(folder, peer_file(peer)), "wb") as f:
            f.write(to_bytes(state))


class DataChanged(RunError):
    pass


class NotOneModel(ValueError):
    """A checkpoint file that cannot be read as one registered model: no model named, or another
    model than the one asked for (the model is what is wrong)."""


class BranchedNetwork(NotOneModel):
    """A checkpoint of a network of branches (`method.branches >= 2`): the file itself is what
    is wrong, whatever model is asked for."""


def registered_model(state: dict, model: str | None = None, model_args: dict | None = None) -> tuple[str, dict, dict]:
    """(model name, model args, weights) of the registered model a checkpoint file holds. A peer
    file (`peer_state`'s) names its model and how it was built — the file alone rebuilds it — and
    of its network's weights the registered model's own are kept (a gate head or a regressor a
    method put around it are left out). A plain state dict is `model`'s, built with `model_args`.
    `NotOneModel` when the file cannot be one model: no model named, or a model named other than
    the one the file holds; `BranchedNetwork` (one of them) for a network of branches."""
    state = whole(state)
    if not (isinstance(state.get("model"), dict) and "step" in state):  # a plain state dict
        if model is None:
            raise NotOneModel("a plain state dict does not say which model it holds: name the model")
        return model, dict(model_args or {}), state
    state = upgrade(state)  # a file held in memory may not have come through `from_bytes`
    weights, prefix = state["model"], state["base_prefix"]
    if prefix is None:
        raise BranchedNetwork("it holds a network of branches, not one model's weights")
    if prefix:
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    name, args = saved_model(state, model, model_args)
    if name is None:
        raise NotOneModel("the file does not say which model it holds: name the model")
    if model is not None and (model, dict(model_args or {})) != (name, args):
        raise NotOneModel(f"it holds model {name!r} built with {args}, not {model!r} with {dict(model_args or {})}")
    return name, args, weights


def saved_model(state: dict, model: str | None, model_args: dict | None) -> tuple[str | None, dict]:
    """(model name, model args) a peer file says it holds; a file of format 1 that did not record
    them (None after `upgrade`) is taken to hold `model` built with `model_args`, the config's."""
    state = upgrade(state)
    name = state["model_name"] if state["model_name"] is not None else model
    args = state["model_args"] if state["model_args"] is not None else (model_args or {})
    return name, dict(args)


def load_peer_state(job, state: dict) -> int:
    """Put a checkpoint's peer state (`peer_state`'s) back into the peer of `job`; returns its
    step. Refused when the data the peer was trained on is not the data it would resume on."""
    peer = job.peer
    saved = saved_model(state, peer.spec.model, peer.spec.model_args)
    if saved != (peer.spec.model, dict(peer.spec.model_args)):
        raise RunError(f"peer {peer.index}'s checkpoint holds model {saved[0]!r} built with {saved[1]}, but the "
                       f"config asks for {peer.spec.model!r} with {dict(peer.spec.model_args)}: a run resumes only "
                       "with the models it trained; start a new run (another name) for other models.")
    saw, sees = state.get("data"), job.data.fingerprint
    difference = sees.difference(Fingerprint.from_dict(saw)) if saw and sees else None
    if difference:  # the whole fingerprint: corpus, split, packing, tokenizer, token counts
        raise DataChanged(f"peer {peer.index}'s checkpoint {difference}. Resume refused; start a new run (another "
                          "name) to train on this data.")
    if "shards" in state and is_sharded(peer.network):  # each replica reads its own shards, in any split
        with shards_on_disk(state) as folder:
            load_shards(peer.network, peer.optimizer, folder)
    else:  # a whole file, or shards read whole (a replicated peer, or one resuming on one worker)
        state = whole(state)
        load_full_state(peer.network, peer.optimizer, state["model"], state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    job.precision.load_state_dict(state)
    return state["step"]


def meta_state(step: int, config: dict) -> dict:
    return {"step": step, "config": config}


class LocalCheckpoints:
    """The local runner's checkpoints under `<run>/checkpoints/step_XXXXXXXX/`. A checkpoint
    counts only once its `meta.pt` exists, which is written after every peer's file."""

    def __init__(self, storage: RunStorage, keep: int):
        self.storage = storage
        self.keep = keep

    def _dir(self, step: int) -> str:
        return f"{LOCAL_CHECKPOINT_DIR}/{checkpoint_name(step)}"

    def complete_steps(self) -> list[int]:
        return [step for step, _ in checkpoint_folders(self.storage, [LOCAL_CHECKPOINT_DIR])]

    def write_peer(self, step: int, peer: int, state: dict) -> None:
        self.storage.write_bytes(f"{self._dir(step)}/{peer_file(peer)}", to_bytes(state))

    def load_peer(self, step: int, peer: int) -> dict:
        return from_bytes(self.storage.read_bytes(f"{self._dir(step)}/{peer_file(peer)}"))

    def commit(self, step: int, meta: dict) -> None:
        self.storage.write_bytes(f"{self._dir(step)}/{META_FILE}", to_bytes(meta))
        for old in self.complete_steps()[:-self.keep] if self.keep > 0 else []:
            self.storage.delete(self._dir(old))

    def discard_after(self, step: int, why: str) -> None:
        """Take the checkpoint folders after `step` (0: all) out of the way, saying `why`. They hold
        a training that is thrown away — they did not load, or were never committed — and left in
        place they would count as the newest: pruning would delete every good checkpoint as soon
        as it is written, and a retrained step would land in their folder. A committed one (its
        meta.pt written: it did not load) is moved to `set_aside/`, never deleted; one never
        committed is a partial write and is deleted."""
        for name in self.storage.list(LOCAL_CHECKPOINT_DIR):
            match = CHECKPOINT_DIR.fullmatch(name)
            if match is None or int(match.group(1)) <= step:
                continue
            folder = f"{LOCAL_CHECKPOINT_DIR}/{name}"
            if self.storage.exists(f"{folder}/{META_FILE}"):
                aside = set_aside_name(name)
                logger.warning("moving %s/%s to %s/%s: %s", self.storage.uri, folder, self.storage.uri, aside, why)
                self.storage.move(folder, aside)
            else:
                logger.warning("deleting %s/%s (never committed): %s", self.storage.uri, folder, why)
                self.storage.delete(folder)


def set_aside_name(folder: str) -> str:
    """Where a checkpoint folder that is thrown away goes (never deleted: see SET_ASIDE_DIR)."""
    return f"{SET_ASIDE_DIR}/{folder.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def past_damaged(storage: RunStorage, folders: list[tuple[int, str]], restored: int, copy_aside: bool) -> int:
    """Before a Ray run retrains the steps after `restored` (its newer `folders` did not load):
    the mark the retrained checkpoints' folder names take (`checkpoint_name`), the same in every
    worker; with `copy_aside` (one worker), those folders are copied aside first — Ray Train
    still lists them, and its pruning deletes them."""
    for step, folder in folders:
        if copy_aside and step > restored:
            logger.warning("copying %s/%s to %s: it did not load; the run retrains its steps", storage.uri, folder,
                           SET_ASIDE_DIR)
            storage.copy(folder, set_aside_name(folder))
    return 1 + max((retrained_of(folder) for _, folder in folders), default=0)


PEER_RUN_DIR = re.compile(r"peer(\d+)")


def peer_run_dir(peer: int) -> str:
    """Where the Ray Train run of one peer keeps its checkpoints, when peers run apart."""
    return f"peer{peer}"


def checkpoint_folders(storage: RunStorage, parents=None) -> list[tuple[int, str]]:
    """(step, folder relative to the run) of every complete checkpoint (its `meta.pt` written
    last), oldest first: the local runner's under `checkpoints/`, Ray Train's at the run's top
    level, and, when peers run apart, each peer's Ray Train run's under `peer<k>/` (default: all
    of them). Folders that are not ours (`step_latest`, a copy) are left alone, with a warning."""
    if parents is None:
        parents = [LOCAL_CHECKPOINT_DIR, "", *sorted(n for n in storage.list(".") if PEER_RUN_DIR.fullmatch(n))]
    found = []
    for parent in parents:
        for name in storage.list(parent or "."):
            folder = f"{parent}/{name}" if parent else name
            match = CHECKPOINT_DIR.fullmatch(name)
            if match is None:
                if name.startswith("step_"):
                    logger.warning("ignoring %s/%s: not a checkpoint folder name (step_NNNNNNNN)", storage.uri, folder)
                continue
            if storage.exists(f"{folder}/{META_FILE}"):
                found.append((int(match.group(1)), folder))
    return sorted(found, key=lambda item: (item[0], retrained_of(item[1])))


def newest_complete(storage: RunStorage, peer: int) -> str | None:
    """The folder of the run's newest complete checkpoint that holds `peer`'s file."""
    found = [folder for _, folder in checkpoint_folders(storage) if storage.exists(f"{folder}/{peer_file(peer)}")]
    return found[-1] if found else None


def newest_loadable(storage: RunStorage, folders: list[tuple[int, str]], peers: int | list[int]) -> tuple[int, list[dict]] | None:
    """The newest of `folders` ((step, folder), oldest first) whose every peer file loads, with
    the peers' states — `peers`: a number K (peers 0..K-1: in one group each worker asks for all
    peers', so all agree on one step) or a list (a peer running apart asks for its own). A damaged
    checkpoint (truncated, not a checkpoint, a peer's file missing) is skipped with a warning
    that says which and why; a run then resumes from the one before."""
    peers = list(range(peers)) if isinstance(peers, int) else peers
    for step, folder in reversed(folders):
        try:
            states = [_load_with_retries(storage, f"{folder}/{peer_file(k)}") for k in peers]
        except Exception as err:  # noqa: BLE001 — any unreadable file disqualifies the checkpoint
            logger.warning("skipping the checkpoint at step %d (%s/%s): %s", step, storage.uri, folder,
                           first_line(err, 200))
            continue
        return step, states
    return None


def _load_with_retries(storage: RunStorage, relative: str) -> dict:
    """A peer file's state, read again after a short wait when it fails (a passing error of an
    object store or a network filesystem must not cost a good checkpoint); a split peer's shards
    checked with it (`check_shards`), not read."""

    def read() -> dict:
        state = with_shards(from_bytes(storage.read_bytes(relative)), f"{storage.uri}/{posixpath.dirname(relative)}")
        check_shards(state)
        return state

    for wait in READ_RETRY_WAITS:
        try:
            return read()
        except Exception as err:  # noqa: BLE001 — tried again; the last try's error is the one raised
            logger.info("reading %s/%s failed (%s); trying again in %.1f s", storage.uri, relative,
                        first_line(err, 200), wait)
            time.sleep(wait)
    return read()
