"""A run's folder on any filesystem pyarrow knows: a local directory, NFS, or s3://bucket/prefix.

Checkpoints of the local runner, the Parquet records and the resolved config all go
through here, so a run behaves the same on a laptop and on a cluster with object storage."""

from __future__ import annotations

import os
import posixpath

import pyarrow.fs as pafs


def resolve_storage_path(path: str) -> str:
    """URIs stay as they are; local paths become absolute (workers run elsewhere)."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def read_uri(uri: str) -> bytes:
    """One file's bytes from a local path or any URI pyarrow knows (s3://, gs://)."""
    fs, path = pafs.FileSystem.from_uri(resolve_storage_path(uri))
    with fs.open_input_stream(path) as stream:
        return stream.read()


class RunStorage:
    @classmethod
    def at(cls, run: str) -> "RunStorage":
        """The storage of the run folder `run` (a path or URI ending in the run's name)."""
        run = resolve_storage_path(run).rstrip("/")
        parent, name = run.rsplit("/", 1)
        return cls(parent or "/", name)

    def __init__(self, storage_path: str, name: str):
        self.storage_path = resolve_storage_path(storage_path)
        self.fs, base = pafs.FileSystem.from_uri(self.storage_path)
        self.run_dir = posixpath.join(base, name)
        self.uri = self.storage_path.rstrip("/") + "/" + name

    def path(self, relative: str) -> str:
        return posixpath.join(self.run_dir, relative)

    def write_bytes(self, relative: str, data: bytes) -> None:
        # Write aside then move, so a reader never sees half a file (a crash leaves only the .tmp).
        target = self.path(relative)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        with self.fs.open_output_stream(target + ".tmp") as out:
            out.write(data)
        self.fs.move(target + ".tmp", target)

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def list(self, relative: str) -> list[str]:
        """Names directly inside `relative` (empty when it does not exist)."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        return sorted(posixpath.basename(info.path) for info in self.fs.get_file_info(selector))

    def delete(self, relative: str) -> None:
        info = self.fs.get_file_info(self.path(relative))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(relative))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(relative))
