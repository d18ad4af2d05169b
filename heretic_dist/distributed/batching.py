"""TrialBatcher: a worker's run_trial calls scored together (`trials_per_worker = K`).

The worker actor takes K calls at once (Ray runs each on a thread of its own); every call puts its
trial in a queue and waits. One engine thread takes up to K queued trials and scores them in one
batched pass. It waits a short moment for the queue to fill: the trials of one worker finish together,
and their successors arrive one after another (the driver's turn-around), so without the wait every
pass would find a single trial queued and never batch. The wait counts from the end of the last pass,
not from the oldest trial's arrival: a trial that queued behind a pass is already old when the pass
ends, and counting from its arrival would run it alone every time, the trials of the worker's slots
taking turns forever. Counting from the pass's end lets the successors of the finished trials join
it, and once a pass holds K trials they finish together and stay in step. The wait ends as soon as K
trials are there.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Callable, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# How long a pass waits for more trials, counted from when the engine became free or the first trial
# came, whichever is later: Tune turns finished trials around one at a time, tens of milliseconds to
# over a second apart on a loaded driver (bench_overhead, bench_scale), so the wait grows with the pass.
MIN_WAIT_S = 0.2
MAX_WAIT_S = 2.0
WAIT_SHARE = 0.1  # of the last pass's time: waiting this long to score up to K trials in one pass


class TrialBatcher(Generic[Item, Result]):
    def __init__(self, score: Callable[[list[Item]], list[Result]], max_items: int):
        if max_items < 2:
            raise ValueError("a batcher is for trials_per_worker >= 2")
        self._score = score
        self.max_items = max_items
        self._cond = threading.Condition()
        self._queue: list[tuple[Item, Future, float]] = []  # (trial, its caller's future, queued at)
        self._last_pass_s = 0.0
        self._free_since = time.monotonic()  # when the engine thread last finished a pass
        self.sizes: Counter[int] = Counter()  # passes run, by number of trials in them
        threading.Thread(target=self._loop, name="heretic-engine", daemon=True).start()

    def submit(self, item: Item) -> Result:
        """Score `item` in the next pass; blocks the calling thread until its result is there."""
        future: Future = Future()
        with self._cond:
            self._queue.append((item, future, time.monotonic()))
            self._cond.notify_all()
        return future.result()

    def _wait_s(self) -> float:
        return min(MAX_WAIT_S, max(MIN_WAIT_S, WAIT_SHARE * self._last_pass_s))

    def _next_batch(self) -> list[tuple[Item, Future, float]]:
        with self._cond:
            while True:
                if len(self._queue) >= self.max_items:
                    break
                if self._queue:
                    left = max(self._queue[0][2], self._free_since) + self._wait_s() - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                else:
                    self._cond.wait()
            batch, self._queue = self._queue[: self.max_items], self._queue[self.max_items :]
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            start = time.monotonic()
            self._run(batch)
            self._free_since = time.monotonic()
            self._last_pass_s = self._free_since - start
            self.sizes[len(batch)] += 1

    def _run(self, batch: list[tuple[Item, Future, float]]) -> None:
        try:
            results = self._score([item for item, _, _ in batch])
            if len(results) != len(batch):  # a caller left without a result would wait forever
                raise RuntimeError(f"{len(results)} results for a pass of {len(batch)} trials")
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting callers
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            # one trial's error must not fail the others: score each alone, so each gets its own outcome
            for item, future, _ in batch:
                try:
                    future.set_result(self._score([item])[0])
                except BaseException as single:  # noqa: BLE001
                    future.set_exception(single)
            return
        for (_, future, _), result in zip(batch, results):
            future.set_result(result)
