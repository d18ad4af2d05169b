"""WorkerSlots: the broker's free list when a worker scores several trials at once.

With `trials_per_worker = K` each worker has K slots; a lease takes slots, not workers. A trial's shards
take slots on distinct workers where it can (its shards then run in parallel); a worker with free slots
is handed out before a second slot of a worker that is busy, so trials spread over the pool before they
pile onto one worker. With K = 1 this is the plain free list: a worker is free or leased.
"""

from __future__ import annotations

from collections import Counter


class WorkerSlots:
    def __init__(self, per_worker: int = 1):
        if per_worker < 1:
            raise ValueError("a worker needs at least one slot")
        self.per_worker = per_worker
        self._free: Counter[str] = Counter()  # worker id -> free slots (absent: none free)
        self._order: list[str] = []  # least recently leased first, so work rotates over the pool
        self._closed: set[str] = set()  # counted, but not leased (their node is being drained)

    def add(self, worker_id: str) -> None:
        """A worker that joined (or came back): all its slots are free."""
        if worker_id not in self._order:
            self._order.append(worker_id)
        self._free[worker_id] = self.per_worker

    def put(self, worker_id: str) -> None:
        """One slot of a known worker is free again (never more than per_worker)."""
        if worker_id not in self._order:
            self._order.append(worker_id)
        self._free[worker_id] = min(self.per_worker, self._free[worker_id] + 1)

    def drop(self, worker_id: str) -> None:
        """The worker is gone: forget it."""
        self._free.pop(worker_id, None)
        self._closed.discard(worker_id)
        if worker_id in self._order:
            self._order.remove(worker_id)

    def close(self, worker_id: str) -> None:
        """No new leases of this worker; its slots still come back (so idle() tells when it is done)."""
        self._closed.add(worker_id)

    def available(self) -> int:
        """Slots a lease could take now."""
        return sum(n for w, n in self._free.items() if w not in self._closed)

    def idle(self, worker_id: str) -> bool:
        """No slot of this worker is leased."""
        return self.in_use(worker_id) == 0

    def in_use(self, worker_id: str) -> int:
        """Slots of this worker that are leased."""
        return self.per_worker - self._free[worker_id]

    def leased(self, worker_ids: list[str]) -> list[str]:
        """Those of `worker_ids` with at least one slot leased."""
        return [w for w in worker_ids if self.in_use(w)]

    def take(self, k: int) -> list[str]:
        """k slots: most free slots first, then least recently leased; one slot per worker per round.
        The caller checks available() first."""
        if k > self.available():
            raise ValueError(f"{k} slots asked, {self.available()} free")
        taken: list[str] = []
        while len(taken) < k:
            ranked = sorted((w for w in self._order if self._free[w] > 0 and w not in self._closed),
                            key=lambda w: -self._free[w])
            for w in ranked[: k - len(taken)]:
                self._free[w] -= 1
                taken.append(w)
                self._order.remove(w)
                self._order.append(w)
        return taken

    def take_all(self, worker_id: str) -> None:
        """Every slot of an idle worker (a setup call goes to the whole worker); put() each back."""
        self._free[worker_id] = 0

    def clear(self) -> None:
        self._free.clear()
        self._order.clear()
        self._closed.clear()
