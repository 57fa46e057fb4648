"""A run's folder on any filesystem pyarrow knows: a local directory, NFS, or s3://bucket/prefix.

Checkpoints of the local runner, the Parquet records and the resolved config all go
through here, so a run behaves the same on a laptop and on a cluster with object storage."""

from __future__ import annotations

import os
import posixpath
import uuid
import threading
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs

from codistill.errors import ConfigError, RunError, first_line

# How long the first call to a run's storage may take before the run gives up with a one-line
# error: an unreachable bucket otherwise hangs in the filesystem's own retries for minutes.
STORAGE_TIMEOUT_S = 30.0


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


class StorageError(RunError):
    """A write to a run's storage failed (a full disk, no permission, a file where a folder
    should be): one line naming the path and the cause."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message)
        self.cause = cause or message


@contextmanager
def storage_errors(key: str, uri: str):
    """Filesystem failures (no permission, a file where a folder should be, …) as one-line
    ConfigErrors naming the setting: for what is done before a run starts."""
    try:
        yield
    except StorageError as err:
        raise ConfigError(key, f"cannot use {uri}: {err.cause}") from None
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(key, f"cannot use {uri}: {first_line(err)}") from None


def within_time(fn, seconds: float, key: str, uri: str):
    """`fn()` in a helper thread, waited for at most `seconds` (interruptible with Ctrl-C)."""
    result: dict = {}

    def call():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 — handed to the caller below
            result["error"] = err

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise ConfigError(key, f"{uri} did not answer within {seconds:.0f} s (no network, or storage that is "
                               "not reachable from here)")
    if "error" in result:
        err = result["error"]
        if isinstance(err, (OSError, pa.ArrowException)):
            raise ConfigError(key, f"cannot use {uri}: {first_line(err)}") from None
        raise err
    return result.get("value")


def open_run_storage(storage_path: str, name: str, key: str = "ray.storage_path") -> "RunStorage":
    """A run's storage, checked before anything is written: a known scheme, and an answer
    within STORAGE_TIMEOUT_S. Every failure is one ConfigError line naming `key`."""
    uri = resolve_storage_path(storage_path)
    try:
        storage = RunStorage(uri, name)
    except (pa.ArrowException, ValueError) as err:
        scheme = uri.split("://", 1)[0]
        raise ConfigError(key, f"{uri!r}: unknown storage scheme {scheme!r} ({first_line(err)}); use a local "
                               "path, s3://bucket/prefix, gs://bucket/prefix or hdfs://…") from None
    within_time(lambda: storage.exists("."), STORAGE_TIMEOUT_S, key, storage.uri)
    return storage


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
        # The aside name is this writer's own: two processes writing one file at once (two
        # starts racing for a run's lease) must each move their own file, not one the other moved.
        target = self.path(relative)
        aside = f"{target}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
            with self.fs.open_output_stream(aside) as out:
                out.write(data)
            self.fs.move(aside, target)
        except (OSError, pa.ArrowException) as err:
            # A full disk or a lost permission: the half-written aside file is not left behind.
            try:
                self.fs.delete_file(aside)
            except (OSError, pa.ArrowException):
                pass  # it was never created
            raise StorageError(f"cannot write {self.uri}/{relative}: {first_line(err)}", first_line(err)) from None

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def list(self, relative: str) -> list[str]:
        """Names directly inside `relative` (empty when it does not exist)."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        return sorted(posixpath.basename(info.path) for info in self.fs.get_file_info(selector))

    def move(self, relative: str, to: str) -> None:
        """Move a file or folder within the run. Object stores cannot rename a folder: there it
        is copied, then the original deleted (nothing is deleted before its copy exists)."""
        source, target = self.path(relative), self.path(to)
        try:
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
            try:
                self.fs.move(source, target)
            except (OSError, pa.ArrowException):
                if self.fs.get_file_info(source).type != pafs.FileType.Directory:
                    raise
                self._copy_folder(source, target)
                self.fs.delete_dir(source)
        except (OSError, pa.ArrowException) as err:
            raise StorageError(f"cannot move {self.uri}/{relative} to {to}: {first_line(err)}", first_line(err)) from None

    def copy(self, relative: str, to: str) -> None:
        """Copy a folder within the run (for one whose original another owner deletes: Ray Train)."""
        try:
            self._copy_folder(self.path(relative), self.path(to))
        except (OSError, pa.ArrowException) as err:
            raise StorageError(f"cannot copy {self.uri}/{relative} to {to}: {first_line(err)}", first_line(err)) from None

    def _copy_folder(self, source: str, target: str) -> None:
        self.fs.create_dir(target, recursive=True)  # copy_files makes no folder on a local disk
        pafs.copy_files(source, target, source_filesystem=self.fs, destination_filesystem=self.fs)

    def delete(self, relative: str) -> None:
        try:
            info = self.fs.get_file_info(self.path(relative))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(relative))
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.path(relative))
        except (OSError, pa.ArrowException) as err:
            raise StorageError(f"cannot delete {self.uri}/{relative}: {first_line(err)}", first_line(err)) from None
