"""One writer per run name: a lease file in the run's folder, taken before anything is
written and renewed while the run lives, so a second start of the same name — a scheduler
retrying a job whose first attempt still runs — fails at once instead of interleaving its
records and checkpoints with the first one's.

It works on any storage the run can write (a shared file system or an object store): the
lease is taken by writing it, waiting a moment and reading it back, so of two starts that race,
the one whose write landed last keeps it and the other sees a token not its own. A lease is
stale — and is taken over, with a warning — when it was not renewed for `TTL_S`, or when its
holder is a process on this host that no longer exists (a run killed with kill -9).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from codistill.errors import RunError, first_line
from codistill.storage import RunStorage

LEASE_FILE = "lease.json"
TTL_S = 60.0
RENEW_S = 15.0
SETTLE_S = 0.5
logger = logging.getLogger(__name__)


HELD_ELSEWHERE = "is being written by another process"
"""The words of every refusal on a live lease: how a sweep recognises a trial that erred only
because another driver held its run (`experiments/tune.py` retries those on a resume)."""


class RunLocked(RunError):
    pass


class RunLease:
    def __init__(self, storage: RunStorage):
        self.storage = storage
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.stop = threading.Event()
        self.renewer: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes(LEASE_FILE))
        except (FileNotFoundError, ValueError):
            return None

    def _write(self) -> None:
        self.storage.write_bytes(LEASE_FILE, json.dumps({**self.holder, "renewed": time.time()}).encode())

    def _stale(self, held: dict) -> bool:
        if time.time() - held.get("renewed", 0) > TTL_S:
            return True
        if held.get("host") == self.holder["host"]:
            try:
                os.kill(int(held["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, KeyError):
                return False
        return False

    def _refuse(self, held: dict) -> RunLocked:
        return RunLocked(f"run {self.storage.uri} {HELD_ELSEWHERE} (host {held.get('host')}, "
                         f"pid {held.get('pid')}, started {held.get('started')}, lease renewed "
                         f"{time.time() - held.get('renewed', 0):.0f} s ago); wait for it to end, or choose another name")

    def acquire(self) -> "RunLease":
        held = self._read()
        if held is not None and held.get("token") != self.holder["token"]:
            if not self._stale(held):
                raise self._refuse(held)
            logger.warning("taking over the stale lease of run %s (host %s, pid %s, started %s)", self.storage.uri,
                           held.get("host"), held.get("pid"), held.get("started"))
        self._write()
        time.sleep(SETTLE_S)  # a start that raced with this one has written by now
        held = self._read()
        if held is None or held.get("token") != self.holder["token"]:
            raise self._refuse(held or {})
        self.renewer = threading.Thread(target=self._renew, daemon=True, name="lease")
        self.renewer.start()
        return self

    def _renew(self) -> None:
        while not self.stop.wait(RENEW_S):
            try:
                self._write()
            except Exception as err:  # noqa: BLE001 — a missed renewal is retried; the run goes on
                logger.warning("could not renew the lease of %s: %s", self.storage.uri, err)

    def release(self) -> None:
        self.stop.set()
        if self.renewer is not None:
            self.renewer.join()
        try:
            held = self._read()
            if held is not None and held.get("token") == self.holder["token"]:
                self.storage.delete(LEASE_FILE)
        except Exception as err:  # noqa: BLE001 — must not hide the run's own error; the lease goes stale
            logger.warning("could not release the lease of %s (%s); it goes stale in %.0f s", self.storage.uri,
                           first_line(err), TTL_S)

    def renew(self) -> None:
        """Write the lease again now (after its folder was moved away with the lease in it)."""
        self._write()

    def refuse_if_held(self) -> None:
        """RunLocked when a live process holds the lease: a cheap early check (taking the lease
        is what guards)."""
        held = self.live_holder()
        if held is not None and held.get("token") != self.holder["token"]:
            raise self._refuse(held)

    def live_holder(self) -> dict | None:
        """Who holds the run's lease now (host, pid, started), or None: no live process writes it."""
        held = self._read()
        return held if held is not None and not self._stale(held) else None

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
