"""One thread for all of a worker's engine work.

torch's CPU kernels run on OpenMP (libgomp in the torch wheels). Every thread that opens a parallel
region gets a thread team of its own, and once a process holds more OpenMP threads than it has CPUs,
libgomp cuts its busy-wait from 300,000 spins to 100 (GOMP_SPINCOUNT's documented throttle; no
environment variable raises it again). The team's threads then sleep between the thousands of small
parallel regions of a decode step, and each region pays a wake-up. A Ray actor runs `__init__` on its
main thread and its methods on a concurrency group's thread (the trial batcher adds a third): loading the
model on one and scoring trials on another made two teams on 2 CPUs, and a trial about 25% slower than
in a plain process (docs/benchmarks.md, "The same trials in a plain process and in a Ray actor").
Running the load and every engine call on this one thread keeps one team.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class EngineThread:
    """Runs callables on one long-lived thread; a call made on that thread runs in place."""

    def __init__(self, name: str = "heretic-engine") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None
        self._executor.submit(self._note_ident).result()

    def _note_ident(self) -> None:
        self._ident = threading.get_ident()

    @property
    def ident(self) -> int | None:
        return self._ident

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def on_engine_thread(method: Callable[..., T]) -> Callable[..., T]:
    """Run a method of an object with an `engine_thread` attribute (an EngineThread) on that thread."""

    @functools.wraps(method)
    def call(self, *args: Any, **kwargs: Any) -> T:
        return self.engine_thread.run(method, self, *args, **kwargs)

    return call
