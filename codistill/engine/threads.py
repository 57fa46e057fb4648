"""One peer per thread, for the local runner, the Ray driver's peers apart and the benchmarks:
start them, wait for all, hand back what each returned or raised (a thread's exception is
re-raised where the caller decides, never lost in `threading.excepthook`)."""

from __future__ import annotations

import threading
from typing import Callable

import torch


def run_in_threads(target: Callable[[int], object], count: int, *, name: str = "peer{}", daemon: bool = False,
                   torch_threads: int | None = None, on_interrupt: Callable[[], None] | None = None) -> list:
    """`target(k)` for k in 0..count-1, one thread each; returns, in order, each call's result or
    the exception it raised. `torch_threads`: PyTorch's intra-op threads while they run (restored
    after). Ctrl-C reaches the caller's thread only: `on_interrupt` then stops the threads, they are
    joined, and the interruption goes on."""
    results: list = [None] * count

    def call(k: int) -> None:
        try:
            results[k] = target(k)
        except BaseException as err:  # noqa: BLE001 — handed to the caller, in its thread
            results[k] = err

    threads_before = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(max(1, torch_threads))
    threads = [threading.Thread(target=call, args=(k,), name=name.format(k), daemon=daemon) for k in range(count)]
    try:
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except KeyboardInterrupt:
            if on_interrupt is not None:
                on_interrupt()
            for t in threads:
                t.join()
            raise
    finally:
        torch.set_num_threads(threads_before)
    return results


def raise_first_error(results: list) -> list:
    """`results` of `run_in_threads`, or the first exception among them raised."""
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
