"""WorkerBroker: the Ray actor that owns the model workers, their free list and their setup log.

It runs on the driver's node (a lost spot node must not take it along) as an async actor: all methods
run on one event loop, so its plain Python state needs no locks. Clients (`pool.WorkerPool`, in the
driver and in Tune trial processes) lease workers from it and talk to the workers directly; the broker
never sits on the data path. A replacement worker replays the setup log (response prefix, directions,
evaluation prompts) before it is put on the free list, so it serves exactly like the one it replaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError

from . import replica
from .worker import ModelWorker

if TYPE_CHECKING:
    from heretic_dist.config import Settings

log = logging.getLogger(__name__)

# Errors that mean "the worker (or its node, or the owner of an argument) is gone", not "the engine
# raised". ActorDiedError, ActorUnavailableError (RayActorError) and OwnerDiedError (ObjectLostError)
# are subclasses of these.
LOST_WORKER_ERRORS: tuple[type[BaseException], ...] = (
    RayActorError,
    ObjectLostError,
    WorkerCrashedError,
    NodeDiedError,
)


class PoolError(RuntimeError):
    """The pool cannot serve a request (no workers left, a lease timed out, too many losses)."""


@dataclass(frozen=True)
class WorkerRef:
    """A leased worker: its stable id (w0, w1, ...; replacements get new ids) and its actor handle."""

    worker_id: str
    actor: Any = field(compare=False, repr=False)


class WorkerBroker:
    """Async actor. All methods run on one event loop, so plain Python state needs no locks."""

    def __init__(
        self,
        engine: str,
        settings: Settings,
        n_workers: int,
        worker_options: dict[str, Any],
        health_timeout_s: float = 30.0,
    ):
        self.engine = engine
        self.settings = settings
        self.n_workers = n_workers
        self.worker_options = worker_options
        self.health_timeout_s = health_timeout_s
        self.actor_cls = ray.remote(concurrency_groups={"status": 1})(ModelWorker)
        self.remote_cls = self.actor_cls.options(**worker_options)
        self.tensor_parallel = int(settings.cluster.tensor_parallel) if hasattr(settings, "cluster") else 1
        self.groups: dict[str, replica.ReplicaGroup] = {}  # tensor-parallel replicas: all their ranks
        self.ids = itertools.count()
        self.workers: dict[str, Any] = {}  # alive (or believed alive) workers
        self.free: list[str] = []
        self.setup_log: list[tuple[str, tuple]] = []
        self.loads: dict[str, int] = {}  # every worker ever started, dead ones included
        self.load_seconds: dict[str, float] = {}
        self.hosts: dict[str, str] = {}
        self.replacements = 0
        self.starting = 0  # replacements being started
        self.lost: list[dict[str, Any]] = []
        self.replacement_errors: list[str] = []
        self.cond = asyncio.Condition()
        self.closed = False

    # -- starting workers ---------------------------------------------------------------------------

    async def _spawn(self) -> tuple[str, Any]:
        """Start one worker, wait for its model load, replay the setup log. Raises PoolError on failure."""
        worker_id = f"w{next(self.ids)}"
        actor = None
        try:
            actor = await self._start_actor(worker_id)
            health = await actor.health.remote()
        except PoolError:
            raise
        except Exception as exc:  # the actor died while loading (e.g. out of memory)
            self._kill(worker_id, actor)
            raise PoolError(f"worker {worker_id} died while loading: {short_error(exc)}") from None
        if health.get("error"):
            self._kill(worker_id, actor)
            raise PoolError(f"worker {worker_id} on {health.get('host')}: {health['error']}")
        self.loads[worker_id] = int(health["loads"])
        self.load_seconds[worker_id] = float(health["load_seconds"])
        self.hosts[worker_id] = str(health["host"])
        i = 0
        while i < len(self.setup_log):  # the log may grow while we replay it
            method, args = self.setup_log[i]
            await getattr(actor, method).remote(*args)
            i += 1
        return worker_id, actor

    async def _start_actor(self, worker_id: str) -> Any:
        """One model worker, or rank 0 of a tensor-parallel replica whose ranks are all loaded."""
        if self.tensor_parallel <= 1:
            return self.remote_cls.remote(self.engine, self.settings, worker_id)
        try:
            actor, group = await replica.start_replica(self.actor_cls, self.worker_options, self.tensor_parallel,
                                                       self.engine, self.settings, worker_id)
        except RuntimeError as exc:
            raise PoolError(f"worker {worker_id} (tensor-parallel replica) failed to load: {exc}") from None
        self.groups[worker_id] = group
        return actor

    def _kill(self, worker_id: str, actor: Any) -> None:
        """End a worker, with every rank and the placement group of its replica."""
        if actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        group = self.groups.pop(worker_id, None)
        if group is not None:
            group.kill()

    async def start(self) -> list[dict[str, Any]]:
        results = await asyncio.gather(*(self._spawn() for _ in range(self.n_workers)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for r in results:
            if not isinstance(r, BaseException):
                self.workers[r[0]] = r[1]
        if errors:
            for worker_id, actor in self.workers.items():
                self._kill(worker_id, actor)
            self.workers.clear()
            raise PoolError(str(errors[0]))
        self.free = list(self.workers)
        return await self.health()

    async def _replace(self) -> None:
        try:
            worker_id, actor = await self._spawn()
        except Exception as exc:
            self.replacement_errors.append(short_error(exc))
            log.warning("replacement worker failed to start: %s", short_error(exc))
            async with self.cond:
                self.starting -= 1
                self.cond.notify_all()
            return
        async with self.cond:
            self.starting -= 1
            self.replacements += 1
            if self.closed:
                self._kill(worker_id, actor)
                return
            self.workers[worker_id] = actor
            self.free.append(worker_id)
            self.cond.notify_all()

    # -- leasing --------------------------------------------------------------------------------------

    async def acquire(self, k: int, timeout_s: float | None = None) -> list[WorkerRef]:
        """Wait until k workers are free; take them all at once (so partial leases cannot deadlock)."""

        def ready() -> bool:
            if self.closed:
                return True
            if k > len(self.workers) + self.starting:
                return True  # cannot ever be served: raise below
            return len(self.free) >= k

        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(ready), timeout_s)
            except asyncio.TimeoutError:
                raise PoolError(f"no {k} free workers within {timeout_s:.0f} s") from None
            if self.closed:
                raise PoolError("the worker pool is shut down")
            if k > len(self.workers) + self.starting:
                detail = f"; last start error: {self.replacement_errors[-1]}" if self.replacement_errors else ""
                raise PoolError(
                    f"a lease of {k} workers cannot be served: {len(self.workers)} workers are alive{detail}"
                )
            taken, self.free = self.free[:k], self.free[k:]
            return [WorkerRef(w, self.workers[w]) for w in taken]

    async def release(self, worker_ids: list[str]) -> None:
        async with self.cond:
            for w in worker_ids:
                if w in self.workers and w not in self.free:
                    self.free.append(w)
            self.cond.notify_all()

    async def report_lost(self, worker_id: str, reason: str = "") -> bool:
        """A caller saw a lost-worker error. Returns True if the worker was dropped and is being replaced.

        The worker is pinged first: an ActorUnavailableError can be transient, and a worker that still
        answers goes back to the free list instead of being replaced.
        """
        actor = self.workers.get(worker_id)
        if actor is None:
            return True  # already handled (reported by another caller)
        try:
            health = await asyncio.wait_for(actor.health.remote(), self.health_timeout_s)
            alive = not health.get("error")  # a replica that lost a rank answers, but cannot serve
        except Exception:
            alive = False
        async with self.cond:
            if worker_id not in self.workers:
                return True
            if alive:
                if worker_id not in self.free:
                    self.free.append(worker_id)
                self.cond.notify_all()
                return False
            del self.workers[worker_id]
            if worker_id in self.free:
                self.free.remove(worker_id)
            self.lost.append({"worker_id": worker_id, "host": self.hosts.get(worker_id, ""), "reason": reason})
            self.starting += 1
        self._kill(worker_id, actor)
        asyncio.get_running_loop().create_task(self._replace())
        return True

    # -- setup and introspection --------------------------------------------------------------------

    async def broadcast(self, method: str, args: tuple) -> list[Any]:
        """Call `method(*args)` on every worker while none is leased; log it for replacements."""
        async with self.cond:
            await self.cond.wait_for(lambda: self.closed or (self.starting == 0 and len(self.free) == len(self.workers)))
            if self.closed:
                raise PoolError("the worker pool is shut down")
            entry = (method, tuple(args))
            self.setup_log.append(entry)  # before the calls, so a replacement started meanwhile gets it
            ids = list(self.workers)
            self.free = [w for w in self.free if w not in ids]
        try:
            results = await asyncio.gather(
                *(getattr(self.workers[w], method).remote(*args) for w in ids), return_exceptions=True
            )
        finally:
            await self.release(ids)
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, LOST_WORKER_ERRORS)]
        if errors:
            # the engine rejected the call: it must not be replayed on replacements
            self.setup_log = [e for e in self.setup_log if e is not entry]
            raise errors[0]
        for w, r in zip(ids, results):
            if isinstance(r, LOST_WORKER_ERRORS):
                await self.report_lost(w, short_error(r))  # its replacement replays the log
        return [r for r in results if not isinstance(r, BaseException)]

    async def call_one(self, method: str, args: tuple = ()) -> Any:
        """Call a read-only method (e.g. info) on any free worker."""
        (ref,) = await self.acquire(1)
        try:
            return await getattr(ref.actor, method).remote(*args)
        finally:
            await self.release([ref.worker_id])

    async def health(self) -> list[dict[str, Any]]:
        ids = list(self.workers)
        results = await asyncio.gather(
            *(asyncio.wait_for(self.workers[w].health.remote(), self.health_timeout_s) for w in ids),
            return_exceptions=True,
        )
        out = []
        for w, r in zip(ids, results):
            if isinstance(r, BaseException):
                out.append({"worker_id": w, "host": self.hosts.get(w, ""), "error": short_error(r)})
            else:
                self.loads[w] = int(r["loads"])
                out.append(r)
        return out

    async def stats(self) -> dict[str, Any]:
        return {
            "workers": len(self.workers),
            "free": len(self.free),
            "leased": [w for w in self.workers if w not in self.free],
            "starting": self.starting,
            "replacements": self.replacements,
            "loads_total": sum(self.loads.values()),
            "loads": dict(self.loads),
            "load_seconds": dict(self.load_seconds),
            "lost": list(self.lost),
            "replacement_errors": list(self.replacement_errors),
            "setup_calls": [m for m, _ in self.setup_log],
        }

    async def handles(self) -> dict[str, Any]:
        """worker id -> actor handle of the alive workers (for tests and diagnostics)."""
        return dict(self.workers)

    async def rank_handles(self) -> dict[str, list[Any]]:
        """worker id -> the handles of every rank of its tensor-parallel replica (tests, diagnostics)."""
        return {w: list(g.ranks) for w, g in self.groups.items() if w in self.workers}

    async def shutdown(self) -> None:
        async with self.cond:
            self.closed = True
            actors = list(self.workers.items())
            self.workers.clear()
            self.free.clear()
            self.cond.notify_all()
        for worker_id, actor in actors:
            self._kill(worker_id, actor)


def short_error(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
