"""Files checked against a known checksum before they are read (CIFAR's pickles: a planted one
would run code when unpickled), each hashed once and then remembered, per user, by its identity."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from codistill.errors import ConfigError


def verified_cache_path() -> str:
    """Where this user remembers the files it verified: its own cache folder, never the data
    folder — whoever can plant a pickle there could plant its "verified" entry beside it."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "codistill", "verified-files.json")


def _md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(path: str, expected: str) -> list:
    """What a file must still be to skip hashing it again. The change time is in it because no
    one but root can set it: a file rewritten with its size and modification time put back
    (os.utime) has a new change time, so it is hashed again."""
    stat = os.stat(path)
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, expected]


def verify_checksums(folder: str, files: list[tuple[str, str]]) -> None:
    """Each (name, md5) in `folder` must have that checksum; a file this user verified before and
    that is unchanged since (see `_identity`) is not hashed again. A mismatch is a ConfigError
    naming `data.root`, raised before the file is read."""
    cache_path = verified_cache_path()
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    changed = False
    for name, expected in files:
        path = os.path.realpath(os.path.join(folder, name))
        key = _identity(path, expected)
        if cache.get(path) == key:
            continue
        if _md5(path) != expected:
            raise ConfigError("data.root", f"{path} does not match torchvision's checksum, so it is not read (the "
                              "files are pickles, and a planted one would run code): remove it and set "
                              "data.download: true, or put the original file there")
        cache[path] = key
        changed = True
    if changed:
        cache = {p: k for p, k in cache.items() if os.path.exists(p)}  # forget files gone since (a test's)
        try:  # best effort: without a writable cache folder the files are hashed again next time
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            _save_json_atomically(cache_path, cache)
        except OSError:
            pass


def _save_json_atomically(path: str, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
