"""Where a split peer's checkpoint keeps its shards, and reading them back from a run's storage.

A split (FSDP) peer's file names its `torch.distributed.checkpoint` folder (`shards`, written
by `checkpoint.write_peer`) instead of holding its weights. Here: where that folder is once the
file is read (`with_shards`), whether every file of it is still the one written (`check_shards`:
its bytes and sha256, so a damaged shard counts as a damaged checkpoint), and the weights whole
for a reader without a process group (`whole`: export, teachers, a replicated peer resuming).

DCP's reader reads a local path. A run's storage may be an object store (s3://, gs://): there
the shard folder is first copied to a temporary local folder (`shards_on_disk`); on a local
disk or a network filesystem it is read where it is. (Ray Train itself uploads what each worker
wrote locally, so writing never needs more than a local folder.)"""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from contextlib import contextmanager

import pyarrow.fs as pafs

from codistill.engine.sharding import file_digest, whole_from_shards


def shards_folder(peer: int) -> str:
    return f"peer{peer}.dcp"


def with_shards(state: dict, folder_uri: str) -> dict:
    """A peer file read from the checkpoint folder at `folder_uri`, told where its shards are."""
    if "shards" in state:
        state = {**state, "shards_at": f"{folder_uri.rstrip('/')}/{state['shards']['folder']}"}
    return state


def check_shards(state: dict) -> None:
    """Every file of a split peer's checkpoint folder is there as written (its bytes and sha256):
    raises naming the first that is not. Nothing to check for a whole file."""
    if "shards" not in state:
        return
    fs, path = pafs.FileSystem.from_uri(state["shards_at"])
    for name, (size, sha256) in sorted(state["shards"]["files"].items()):
        where = posixpath.join(path, name)
        if fs.get_file_info(where).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"shard {name} of {state['shards']['folder']} is missing")
        if file_digest(where, fs.open_input_stream(where)) != (size, sha256):
            raise ValueError(f"shard {name} of {state['shards']['folder']} is not the file written "
                             f"({size} bytes, sha256 {sha256[:12]})")


@contextmanager
def shards_on_disk(state: dict):
    """The local folder of a split peer's shards: where they are on a local disk, else a copy in a
    temporary folder (DCP's reader reads local paths; objects stores are copied from)."""
    fs, path = pafs.FileSystem.from_uri(state["shards_at"])
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    local = tempfile.mkdtemp(prefix="codistill-shards-")
    try:
        pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def whole(state: dict) -> dict:
    """A peer file with its weights and optimizer state whole in it (`model`, `optimizer`): as
    read for a replicated peer; a split peer's shards read into whole tensors, no process group."""
    if "shards" not in state or "model" in state:
        return state
    with shards_on_disk(state) as folder:
        model, optimizer = whole_from_shards(folder)
    return {**state, "model": model, "optimizer": optimizer}
