"""WorkerBroker: the Ray actor that owns the model workers, their free list and their setup log.

It runs on the driver's node (a lost spot node must not take it along) as an async actor: all methods
run on one event loop, so its plain Python state needs no locks. Clients (`pool.WorkerPool`, in the
driver and in Tune trial processes) lease workers from it and talk to the workers directly; the broker
never sits on the data path. A replacement worker replays the setup log (response prefix, directions,
evaluation prompts) before it is put on the free list, so it serves exactly like the one it replaces.

Elastic start: `start()` returns once `min_workers` workers are loaded; the others stay pending Ray
actors (their node may not exist yet) and join the free list the same way as a replacement, once they
have loaded and replayed the setup log. A start that dies (its node is lost while it loads) is tried
again a few times with a short backoff; a start that waits for a node with room waits as long as it
takes, without holding up the workers that are there, and the user is told so in one line (`notices`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING, Any

import ray
import tenacity

from heretic_dist.config import cluster_count

from . import nodes, replica
from .pool_types import LOST_WORKER_ERRORS, PoolError, StartError, WorkerRef, id_order, short_error
from .slots import WorkerSlots
from .worker import ModelWorker

if TYPE_CHECKING:
    from heretic_dist.config import Settings

log = logging.getLogger(__name__)

START_ATTEMPTS = 5  # tries of one worker start whose actor died (e.g. placed on a node that was dying)
START_BACKOFF_S = 1.0  # the first wait before trying again; doubled each time, at most START_BACKOFF_MAX_S
START_BACKOFF_MAX_S = 8.0
WAIT_CHECK_S = 2.0  # how often a start that has not loaded yet looks whether it waits for a node


class WorkerBroker:
    """Async actor. All methods run on one event loop, so plain Python state needs no locks."""

    def __init__(
        self,
        engine: str,
        settings: Settings,
        n_workers: int,
        worker_options: dict[str, Any],
        health_timeout_s: float = 30.0,
        min_workers: int | None = None,
    ):
        self.engine = engine
        self.settings = settings
        self.n_workers = n_workers
        self.min_workers = n_workers if min_workers is None else max(1, min(int(min_workers), n_workers))
        self.worker_options = worker_options
        self.health_timeout_s = health_timeout_s
        self.actor_cls = ray.remote(concurrency_groups={"status": 1})(ModelWorker)
        self.remote_cls = self.actor_cls.options(**worker_options)
        self.tensor_parallel = cluster_count(settings, "tensor_parallel")
        self.groups: dict[str, replica.ReplicaGroup] = {}  # tensor-parallel replicas: all their ranks
        self.ids = itertools.count()
        self.workers: dict[str, Any] = {}  # alive (or believed alive) workers
        self.per_worker = cluster_count(settings, "trials_per_worker")  # leases one worker takes at once
        self.slots = WorkerSlots(self.per_worker)
        self.setup_log: list[tuple[str, tuple]] = []
        self.unsettled: list[tuple[str, tuple]] = []  # entries whose broadcast has no verdict yet
        self.rejections: dict[int, BaseException] = {}  # id(entry) -> the engine's error on a joining worker
        self.loads: dict[str, int] = {}  # every worker ever started, dead ones included
        self.load_seconds: dict[str, float] = {}
        self.hosts: dict[str, str] = {}
        self.nodes: dict[str, str] = {}  # worker id -> Ray node id
        self.replacements = 0
        self.pending: dict[str, Any] = {}  # starts under way (elastic or replacements): id -> actor or None
        self.replacing: dict[str, str] = {}  # replacement id -> the lost worker's id
        self.waiting: set[str] = set()  # pending starts told to wait for a node with room
        self.notices: list[str] = []  # one line each for the user; the driver prints the new ones
        self.lost: list[dict[str, Any]] = []
        self.replacement_errors: list[str] = []
        self.tasks: set[asyncio.Task] = set()  # background starts (kept referenced until done)
        self.node_view = nodes.NodeView(worker_options, self.tensor_parallel)
        self.retiring: set[str] = set()  # workers on a drained node: no new leases, leave once idle
        self.drained: list[dict[str, Any]] = []  # workers that left a drained node
        self.cond = asyncio.Condition()
        self.closed = False

    @property
    def starting(self) -> int:
        """Workers being started: elastic ones not loaded yet, and replacements."""
        return len(self.pending)

    # -- starting workers ---------------------------------------------------------------------------

    async def _spawn(self, worker_id: str) -> Any:
        """Start one worker and wait for its model load; its actor. Raises StartError on failure."""
        actor = None
        try:
            actor = await self._start_actor(worker_id)
            self.pending[worker_id] = actor
            health = await self._loaded(worker_id, actor)
        except StartError:
            self._kill(worker_id, actor)
            raise
        except Exception as exc:  # the actor died while loading (out of memory, its node lost)
            self._kill(worker_id, actor)
            raise StartError(f"worker {worker_id} died while loading: {short_error(exc)}", retry=True) from None
        if health.get("error"):
            self._kill(worker_id, actor)
            raise StartError(f"worker {worker_id} on {health.get('host')}: {health['error']}")
        self.loads[worker_id] = int(health["loads"])
        self.load_seconds[worker_id] = float(health["load_seconds"])
        self.hosts[worker_id] = str(health["host"])
        self.nodes[worker_id] = str(health.get("node_id", ""))
        if self.nodes[worker_id] in self.node_view.draining:  # placed before the drain began
            self._kill(worker_id, actor)
            raise StartError(f"worker {worker_id} loaded on a node that is being drained", retry=True)
        return actor

    async def _loaded(self, worker_id: str, actor: Any) -> dict[str, Any]:
        """The worker's first health() (it answers once its model is loaded). Until then, every few
        seconds: has the pool been shut down, and does this start wait for a node with room?"""
        answer = asyncio.wrap_future(actor.health.remote().future())
        while True:
            done, _ = await asyncio.wait({answer}, timeout=WAIT_CHECK_S)
            if done:
                return answer.result()
            if self.closed:
                answer.cancel()
                raise StartError(f"worker {worker_id}: the pool was shut down while it started")
            self._note_waiting(worker_id)

    async def _start_actor(self, worker_id: str) -> Any:
        """One model worker, or rank 0 of a tensor-parallel replica whose ranks are all loaded."""
        if self.tensor_parallel <= 1:
            return self.remote_cls.remote(self.engine, self.settings, worker_id)
        self.groups[worker_id] = group = replica.new_group(self.worker_options, self.tensor_parallel)
        try:
            return await replica.start_replica(
                group, self.actor_cls, self.worker_options, self.engine, self.settings, worker_id,
                on_wait=lambda: self._note_waiting(worker_id) or self.closed, check_s=WAIT_CHECK_S)
        except RuntimeError as exc:
            self.groups.pop(worker_id, None)
            raise StartError(f"worker {worker_id} (tensor-parallel replica) failed to load: {exc}") from None

    def _kill(self, worker_id: str, actor: Any) -> None:
        """End a worker, with every rank and the placement group of its replica."""
        if actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        group = self.groups.pop(worker_id, None)
        if group is not None:
            group.kill()

    async def _join(self, worker_id: str, actor: Any) -> None:
        """Replay the setup log on a loaded worker, then put it on the free list. The last look at the
        log and the join are one step under the lock, so a broadcast started meanwhile cannot miss it."""
        replayed: list[tuple[str, tuple]] = []
        while True:
            todo = [e for e in self.setup_log if not any(e is r for r in replayed)]
            for entry in todo:
                method, args = entry
                try:
                    await getattr(actor, method).remote(*args)
                except Exception as exc:  # noqa: BLE001 - lost: try again; the engine's error: give up
                    if not isinstance(exc, LOST_WORKER_ERRORS) and await self._rejected(entry, exc):
                        replayed.append(entry)  # the engine rejects it: dropped from the log
                        continue
                    self._kill(worker_id, actor)
                    raise StartError(f"worker {worker_id} failed {method} while joining: {short_error(exc)}",
                                     retry=isinstance(exc, LOST_WORKER_ERRORS)) from None
                replayed.append(entry)
            async with self.cond:
                if any(not any(e is r for r in replayed) for e in self.setup_log):
                    continue  # the log grew while this worker replayed it
                self.pending.pop(worker_id, None)
                if self.closed:
                    self._kill(worker_id, actor)
                    return
                if worker_id in self.replacing:
                    self.replacements += 1
                if worker_id in self.waiting:
                    self.waiting.discard(worker_id)
                    self.notices.append(f"worker {worker_id} is ready on node {self.nodes[worker_id][:12]}: "
                                        f"the run goes on with {len(self.workers) + 1} workers")
                self.workers[worker_id] = actor
                self.slots.add(worker_id)
                self.cond.notify_all()
                return

    async def _bring_up(self, worker_id: str, attempts: int) -> BaseException | None:
        """Start a worker in slot `worker_id` until it joins the free list: a start whose actor died is
        tried again (at most `attempts` tries, exponential backoff). Returns the error it gave up on."""
        self.pending.setdefault(worker_id, None)
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_exponential(multiplier=START_BACKOFF_S, max=START_BACKOFF_MAX_S),
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, StartError) and e.retry and not self.closed),
            before_sleep=lambda state: log.warning("worker %s: start failed, trying again: %s", worker_id,
                                                   state.outcome.exception() if state.outcome else ""),
            reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    await self._join(worker_id, await self._spawn(worker_id))
        except Exception as exc:  # noqa: BLE001 - recorded; a lease that can never be served says it
            async with self.cond:
                self.pending.pop(worker_id, None)
                self.waiting.discard(worker_id)
                if not self.closed:
                    self.replacement_errors.append(short_error(exc))
                    log.warning("worker %s failed to start: %s", worker_id, short_error(exc))
                self.cond.notify_all()
            return exc
        return None

    def _background(self, worker_id: str, attempts: int = START_ATTEMPTS) -> asyncio.Task:
        self.tasks.add(task := asyncio.get_running_loop().create_task(self._bring_up(worker_id, attempts)))
        task.add_done_callback(self.tasks.discard)
        return task

    async def start(self) -> list[dict[str, Any]]:
        """Start all n_workers; return once min_workers have loaded (the others join when they have)."""
        attempts = 1 if self.min_workers >= self.n_workers else START_ATTEMPTS
        self.tasks.add(watch := asyncio.get_running_loop().create_task(self._watch_drains()))
        watch.add_done_callback(self.tasks.discard)
        tasks = {self._background(f"w{next(self.ids)}", attempts) for _ in range(self.n_workers)}
        errors: list[BaseException] = []
        while len(self.workers) < self.min_workers:
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            errors += [e for e in (t.result() for t in done) if e is not None]
            if len(errors) > self.n_workers - self.min_workers or (not tasks and len(self.workers) < self.min_workers):
                await self.shutdown()
                raise PoolError(str(errors[0]) if errors else "no worker started")
        return await self.health()

    # -- leasing --------------------------------------------------------------------------------------

    async def acquire(self, k: int, timeout_s: float | None = None) -> list[WorkerRef]:
        """Wait until k worker slots are free (a worker has trials_per_worker of them); take them all at
        once, so partial leases cannot deadlock."""

        def ready() -> bool:
            if self.closed:
                return True
            if k > (len(self.workers) + self.starting) * self.per_worker:
                return True  # cannot ever be served: raise below
            return self.slots.available() >= k

        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(ready), timeout_s)
            except asyncio.TimeoutError:
                raise PoolError(f"no {k} free workers within {timeout_s:.0f} s") from None
            if self.closed:
                raise PoolError("the worker pool is shut down")
            if k > (len(self.workers) + self.starting) * self.per_worker:
                detail = f"; last start error: {self.replacement_errors[-1]}" if self.replacement_errors else ""
                raise PoolError(
                    f"a lease of {k} workers cannot be served: {len(self.workers)} workers are alive{detail}"
                )
            return [WorkerRef(w, self.workers[w]) for w in self.slots.take(k)]

    async def release(self, worker_ids: list[str]) -> None:
        async with self.cond:
            for w in worker_ids:
                if w in self.workers:
                    self.slots.put(w)  # a retiring worker's slots count back, but are not leased
            self.cond.notify_all()
        for w in dict.fromkeys(worker_ids):
            if w in self.retiring and self.slots.idle(w):  # its node is being drained: it leaves once idle
                await self._retire(w)

    async def report_lost(self, worker_id: str, reason: str = "", slots: int = 1) -> bool:
        """A caller holding `slots` of this worker saw a lost-worker error: True if it was dropped. It is
        pinged first (an ActorUnavailableError can be transient): one that answers gets the slots back
        and keeps its other trials; a drained one was replaced already and leaves once idle."""
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
                for _ in range(slots):
                    self.slots.put(worker_id)
                self.cond.notify_all()
            elif worker_id not in self.retiring:
                del self.workers[worker_id]
                self.slots.drop(worker_id)
                self.lost.append({"worker_id": worker_id, "host": self.hosts.get(worker_id, ""),
                                  "node_id": self.nodes.get(worker_id, ""), "reason": reason})
                self._start_successor(worker_id)
        if worker_id in self.retiring and (not alive or self.slots.idle(worker_id)):
            await self._retire(worker_id)  # drained: it leaves once idle, or now that its node is gone
            return not alive
        if not alive:
            self._kill(worker_id, actor)
        return not alive

    # -- setup and introspection --------------------------------------------------------------------

    async def broadcast(self, method: str, args: tuple) -> list[Any]:
        """Call `method(*args)` on every loaded worker while none is leased; log it for the others.

        Workers still starting are not waited for (one may wait long for a node): they replay the log,
        this entry included, before they join. A loaded worker that answers gives the engine's verdict;
        when every one called was lost, the call goes to the workers there are next."""
        entry = (method, tuple(args))
        errors: list[BaseException] = []
        try:
            while True:
                async with self.cond:
                    await self.cond.wait_for(lambda: self.closed or id(entry) in self.rejections or (
                        (self.workers or not self.pending) and all(self.slots.idle(w) for w in self.workers)))
                    if id(entry) in self.rejections:
                        errors = [self.rejections.pop(id(entry))]
                        break
                    if self.closed:
                        raise PoolError("the worker pool is shut down")
                    if not self.workers:
                        raise PoolError(f"no worker is alive for {method}")
                    if not any(e is entry for e in self.unsettled):  # logged before the calls, so a
                        self.setup_log.append(entry)  # worker that joins meanwhile replays it
                        self.unsettled.append(entry)
                    ids = list(self.workers)
                    for w in ids:
                        self.slots.take_all(w)
                try:
                    results = await asyncio.gather(
                        *(getattr(self.workers[w], method).remote(*args) for w in ids), return_exceptions=True)
                except BaseException:
                    await self.release([w for w in ids for _ in range(self.per_worker)])
                    raise
                errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, LOST_WORKER_ERRORS)]
                errors += [self.rejections.pop(id(entry))] if id(entry) in self.rejections else []
                lost = [(w, r) for w, r in zip(ids, results) if isinstance(r, LOST_WORKER_ERRORS)]
                await self.release([w for w in ids if w not in dict(lost) for _ in range(self.per_worker)])
                for w, r in lost:  # their slots go back only if they still answer; a replacement replays the log
                    await self.report_lost(w, short_error(r), slots=self.per_worker)
                if errors or len(lost) < len(ids):
                    break
        finally:
            async with self.cond:
                if errors:  # the engine rejected the call: it must not be replayed on other workers
                    self.setup_log = [e for e in self.setup_log if e is not entry]
                self.unsettled = [e for e in self.unsettled if e is not entry]
                self.cond.notify_all()
        if errors:
            raise errors[0]
        return [r for r in results if not isinstance(r, BaseException)]

    async def _rejected(self, entry: tuple[str, tuple], error: BaseException) -> bool:
        """A joining worker's engine raised on a setup entry. Its broadcast still under way: that is
        the engine's verdict (the broadcast raises it). True if the entry is (now) rejected."""
        async with self.cond:
            if any(e is entry for e in self.unsettled):
                self.rejections[id(entry)] = error
                self.setup_log = [e for e in self.setup_log if e is not entry]
                self.cond.notify_all()
            return not any(e is entry for e in self.setup_log)

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
            "free": self.slots.available(),
            "leased": self.slots.leased(list(self.workers)),
            "leased_slots": {w: self.slots.in_use(w) for w in self.workers},
            "starting": self.starting,
            "pending": sorted(self.pending, key=id_order),
            "waiting": sorted(self.waiting, key=id_order),
            "nodes": {w: self.nodes.get(w, "") for w in self.workers},
            "notices": list(self.notices),
            "replacements": self.replacements,
            "loads_total": sum(self.loads.values()),
            "loads": dict(self.loads),
            "load_seconds": dict(self.load_seconds),
            "lost": list(self.lost),
            "draining": sorted(self.retiring, key=id_order),
            "drained": list(self.drained),
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
            actors = list(self.workers.items()) + list(self.pending.items())  # pending: not loaded yet
            self.workers.clear()
            self.slots.clear()
            self.cond.notify_all()
        for worker_id, actor in actors:
            self._kill(worker_id, actor)

    # -- nodes: starts that wait for one, nodes being drained -----------------------------------------

    def _note_waiting(self, worker_id: str) -> None:
        """A replacement that has not loaded yet while the live nodes hold fewer workers than the pool
        has (loaded or starting) waits for a node: say so once, in one line."""
        if worker_id in self.waiting or worker_id not in self.replacing:
            return
        staying = [w for w in self.workers if w not in self.retiring]  # room() leaves drained nodes out
        if self.node_view.room() >= len(staying) + len(self.pending):
            return  # there is room for it: it is loading
        self.waiting.add(worker_id)
        lost = self.replacing[worker_id]
        if lost in self.retiring or any(d["worker_id"] == lost for d in self.drained):
            what = "leaves its drained node"
        else:
            gone = self.nodes.get(lost) and not self.node_view.is_alive(self.nodes[lost])
            what = "lost with its node" if gone else "lost"
        n = len(self.workers)
        self.notices.append(f"worker {lost} {what}; its replacement {worker_id} waits for a node with "
                            f"{self.node_view.shape()} (the run goes on with {n} worker{'s' if n != 1 else ''})")

    async def _watch_drains(self) -> None:
        """Every DRAIN_POLL_S: workers on nodes being drained get no new leases and leave once idle
        (at once if idle now); each one's replacement starts at once, on another node."""
        while not self.closed:
            with contextlib.suppress(Exception):  # a failed poll: the next one
                self.node_view.draining = await asyncio.to_thread(nodes.draining_node_ids)
                async with self.cond:
                    drained = [w for w in self.workers if self.nodes.get(w) in self.node_view.draining
                               and w not in self.retiring]
                    idle = [w for w in drained if self.slots.idle(w)]
                    for w in drained:
                        self._start_successor(w, drained=True)
                        self.slots.close(w)  # leased by nobody from now on
                for w in idle:
                    await self._retire(w)
            await asyncio.sleep(nodes.DRAIN_POLL_S)

    def _start_successor(self, worker_id: str, drained: bool = False) -> str:
        """Under the lock: a new worker in `worker_id`'s place, counted as starting at once (so a lease
        of k stays servable). A drained worker stays until it is idle (`retiring`)."""
        new_id = f"w{next(self.ids)}"
        self.replacing[new_id] = worker_id
        self.pending[new_id] = None
        if drained:
            self.retiring.add(worker_id)
            node = self.nodes.get(worker_id, "")[:12]
            when = "now (idle)" if self.slots.idle(worker_id) else "once its shard is done"
            self.notices.append(f"node {node} is being drained: worker {worker_id} leaves {when}; "
                                f"its replacement {new_id} starts on another node")
        self._background(new_id)
        return new_id

    async def _retire(self, worker_id: str) -> None:
        """A drained worker that is idle (or whose node died under it) leaves the pool and ends: its
        node then has nothing running and Ray ends it before the deadline."""
        async with self.cond:
            actor = self.workers.pop(worker_id, None)
            self.retiring.discard(worker_id)
            self.slots.drop(worker_id)
            self.drained.append({"worker_id": worker_id, "host": self.hosts.get(worker_id, ""),
                                 "node_id": self.nodes.get(worker_id, "")})
            self.cond.notify_all()
        self._kill(worker_id, actor)
