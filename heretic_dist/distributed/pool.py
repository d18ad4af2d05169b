"""WorkerPool: the client side of the WorkerBroker: leases, sharded calls with retry, setup broadcasts.

The driver creates the pool (which creates the broker and waits until `min_workers` workers, by default
all of them, have loaded their model; the others join as they load); Tune trial functions, which run in other processes, re-attach to the same broker by name
(`WorkerPool.attach`, or simply unpickle a pool). Work goes straight from the caller to the leased
workers (`run_sharded`).

Death and retry: a call that fails with a lost-worker error (actor died or unreachable, node died,
object owner died) is reported to the broker, which checks the worker (a health ping), drops and kills
it if it does not answer, and starts a replacement. The caller takes the next free worker from the
broker and runs the same shard again. A shard is tried at most `max_attempts` times.
Errors raised by the engine itself (RayTaskError) are not retried: they are the trial's result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, RayTaskError

from heretic_dist.config import cluster_count
from heretic_dist.engine.types import Shard
from heretic_dist.errors import UserError

from .broker import WorkerBroker
from .pool_types import LOST_WORKER_ERRORS, PoolError, WorkerRef, short_error
from .sizing import ranks_fit

if TYPE_CHECKING:
    from heretic_dist.config import Settings

log = logging.getLogger(__name__)


class WorkerStartError(UserError):
    """Model workers could not be started (the model does not load, or resources are missing)."""


def quiet_ray_env() -> None:
    """Keep Ray and Tune quiet. Call in the driver before ray.init().

    - The token-authentication notice that every local ray.init() prints ("Token authentication is
      enabled ... Set RAY_AUTH_MODE=disabled to opt out"): silenced through its logger. Setting
      RAY_AUTH_MODE here would not work: Ray reads it when `ray` is imported, and a value set later
      makes the new GCS expect a token that the already-configured client does not send.
    - Tune: no per-trial CSV/JSON/TensorBoard logger files (the study is our record), and the classic
      output path (RAY_AIR_NEW_OUTPUT=0), which prints nothing at verbose=0; the new one prints a boxed
      "Configuration for experiment" table even when silent. Without the logger files Tune's result
      grid warns that it cannot fetch metrics: that logger is quieted too.
    """
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@dataclass
class ShardedRun:
    """What `run_sharded` returns: results in shard order plus what it took to get them."""

    results: list[Any]
    attempts: list[int]  # tries per shard (1 = no loss)
    losses: list[dict[str, str]]  # {"shard", "worker_id", "error"} per lost call
    worker_ids: list[str]  # the worker that produced each shard's result
    lease_s: float = 0.0  # waiting for free workers (first lease)
    run_s: float = 0.0  # from the first call to the last result


class Lease:
    """Workers taken from the pool; given back on exit (lost ones are not given back)."""

    def __init__(self, pool: WorkerPool, workers: list[WorkerRef]):
        self.pool = pool
        self.workers = list(workers)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.workers:
            ids = [w.worker_id for w in self.workers]
            self.workers = []
            with contextlib.suppress(Exception):
                ray.get(self.pool.broker.release.remote(ids))

    def swap(self, lost: WorkerRef, reason: str, timeout_s: float | None = None) -> WorkerRef:
        """Report `lost`, take another free worker in its place (blocks until one is free)."""
        # one entry: with trials_per_worker > 1 a lease may hold two slots of one worker
        index = next(i for i, w in enumerate(self.workers) if w.worker_id == lost.worker_id)
        del self.workers[index]
        self.pool.report_lost(lost, reason)
        (new,) = self.pool._acquire(1, timeout_s)
        self.workers.append(new)
        return new


_ATTACHED: dict[tuple[str, str], WorkerPool] = {}


class WorkerPool:
    """Client of a WorkerBroker. Create it in the driver; it pickles to an attachment by name."""

    def __init__(
        self,
        engine: str,
        settings: Settings,
        n_workers: int,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        resources: dict[str, float] | None = None,
        *,
        scheduling_strategy: str | None = None,
        check_resources: bool = True,
        start_timeout_s: float | None = None,
        min_workers: int | None = None,
    ):
        """`min_workers` (default n_workers): the pool is ready, and trials may start, once that many
        workers have loaded; the others are pending actors that join when their node and model are up."""
        if n_workers < 1:
            raise WorkerStartError("the pool needs at least one worker")
        if not ray.is_initialized():
            raise RuntimeError("ray.init() must run before a WorkerPool is created")
        min_workers = n_workers if min_workers is None else max(1, min(min_workers, n_workers))
        ranks = cluster_count(settings, "tensor_parallel")
        if check_resources:  # a tensor-parallel replica takes its per-worker resources once per rank
            _check_resources(min_workers * ranks, cpus_per_worker, gpus_per_worker, resources or {},
                             elastic=min_workers < n_workers)
            if ranks > 1 or gpus_per_worker > 1:
                _check_one_node_holds_a_replica(ranks, cpus_per_worker, gpus_per_worker, resources or {})
        if ranks > 1 and scheduling_strategy:
            raise WorkerStartError("tensor_parallel > 1 places each replica in its own placement group: "
                                   "it cannot take a scheduling strategy")
        worker_options: dict[str, Any] = {
            "num_cpus": cpus_per_worker,
            "num_gpus": gpus_per_worker,
            "max_restarts": 0,
            "max_task_retries": 0,
            # engine calls run one at a time on one thread: calls that alternate between threads
            # made torch's thread pools (OpenMP, oneDNN) ~30% slower; health() and info() have a
            # thread of their own so they answer while a trial runs. With trials_per_worker = K, K
            # run_trial calls wait at once and the worker's batcher runs them on its one engine thread.
            "max_concurrency": cluster_count(settings, "trials_per_worker"),
        }
        if resources:
            worker_options["resources"] = dict(resources)
        if scheduling_strategy:
            worker_options["scheduling_strategy"] = scheduling_strategy
        ctx = ray.get_runtime_context()
        self.name = f"heretic-pool-{uuid.uuid4().hex[:8]}"
        self.namespace = ctx.namespace
        self.n_workers = n_workers
        self.min_workers = min_workers
        self.owner = True
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.broker = (
            ray.remote(WorkerBroker)
            .options(
                name=self.name,
                namespace=self.namespace,
                num_cpus=0,
                max_restarts=0,
                max_concurrency=1000,
                # the broker lives beside the driver: a lost spot node must not take it along
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=ctx.get_node_id(), soft=False),
            )
            .remote(engine, settings, n_workers, worker_options, min_workers=min_workers)
        )
        self._keep: list[Any] = []  # ObjectRefs this driver put for the setup log (kept alive here)
        t0 = time.perf_counter()
        try:
            self.started = ray.get(self.broker.start.remote(), timeout=start_timeout_s)
        except GetTimeoutError:
            self.shutdown()
            raise WorkerStartError(
                f"{min_workers} model workers did not start within {start_timeout_s:.0f} s "
                f"(each needs {cpus_per_worker} CPU, {gpus_per_worker} GPU): is the cluster big enough?"
            ) from None
        except RayTaskError as exc:
            self.shutdown()
            raise WorkerStartError(f"model workers failed to start: {cause_text(exc)}") from None
        self.start_seconds = time.perf_counter() - t0

    # -- attach from another process ----------------------------------------------------------------

    @classmethod
    def attach(cls, name: str, namespace: str | None = None) -> WorkerPool:
        key = (name, namespace or "")
        pool = _ATTACHED.get(key)
        if pool is None:
            pool = cls.__new__(cls)
            pool.name, pool.namespace, pool.owner = name, namespace, False
            pool.broker = ray.get_actor(name, namespace=namespace)
            pool._keep = []
            pool.n_workers = 0
            _ATTACHED[key] = pool
        return pool

    def __reduce__(self):
        return (WorkerPool.attach, (self.name, self.namespace))

    # -- leasing and sharded work -------------------------------------------------------------------

    def _acquire(self, k: int, timeout_s: float | None = None) -> list[WorkerRef]:
        try:
            return ray.get(self.broker.acquire.remote(k, timeout_s))
        except RayTaskError as exc:
            raise PoolError(cause_text(exc)) from None

    def lease(self, k: int, timeout_s: float | None = None) -> Lease:
        """Block until k workers are free; use as a context manager (`with pool.lease(2) as lease`)."""
        return Lease(self, self._acquire(k, timeout_s))

    def report_lost(self, worker: WorkerRef | str, reason: str = "") -> bool:
        worker_id = worker if isinstance(worker, str) else worker.worker_id
        return ray.get(self.broker.report_lost.remote(worker_id, reason))

    def run_sharded(
        self,
        method: str,
        shard_args: list[tuple],
        max_attempts: int = 3,
        lease_timeout_s: float | None = None,
    ) -> ShardedRun:
        """Call `method(*shard_args[i])` on K = len(shard_args) leased workers, one shard each.

        A lost worker is reported and its shard runs again on another worker, up to `max_attempts`
        tries per shard; then PoolError. Engine errors propagate (as RayTaskError) without retry.
        """
        k = len(shard_args)
        results: list[Any] = [None] * k
        attempts = [0] * k
        losses: list[dict[str, str]] = []
        producers = [""] * k
        t0 = time.perf_counter()
        with self.lease(k, lease_timeout_s) as lease:
            t1 = time.perf_counter()
            inflight: dict[Any, tuple[int, WorkerRef]] = {}

            def submit(i: int, worker: WorkerRef) -> None:
                attempts[i] += 1
                inflight[getattr(worker.actor, method).remote(*shard_args[i])] = (i, worker)

            for i, worker in enumerate(lease.workers):
                submit(i, worker)
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    i, worker = inflight.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                        producers[i] = worker.worker_id
                    except LOST_WORKER_ERRORS as exc:
                        losses.append({"shard": str(i), "worker_id": worker.worker_id, "error": short_error(exc, 300)})
                        if attempts[i] >= max_attempts:
                            raise PoolError(
                                f"shard {i} of {k} lost its worker {attempts[i]} times "
                                f"(last: {worker.worker_id}: {short_error(exc, 300)})"
                            ) from None
                        submit(i, lease.swap(worker, short_error(exc, 300), lease_timeout_s))
            t2 = time.perf_counter()
        return ShardedRun(results, attempts, losses, producers, lease_s=t1 - t0, run_s=t2 - t1)

    def map(self, method: str, items: list, *extra_args: Any, max_attempts: int = 3) -> list[Any]:
        """Split `items` into one contiguous slice per worker, call `method(slice, *extra_args)` on each.

        Returns the per-slice results in order (concatenate or sum them). Used for residual sums and
        for response generation over the direction prompts.
        """
        if not items:
            return []
        k = max(1, min(self.stats()["workers"], len(items)))  # the loaded workers, not the pending ones
        shard_args = [(Shard(i, k).take(items), *extra_args) for i in range(k)]
        return self.run_sharded(method, shard_args, max_attempts).results

    # -- setup ---------------------------------------------------------------------------------------

    def broadcast_setup(self, method: str, *args: Any) -> list[Any]:
        """Call a setup method on every worker (waits until none is leased) and log it for replacements.

        ObjectRefs are passed as they are (top-level arguments of the worker call), so Ray resolves a
        ray.put() object once per worker and never copies it through the broker.
        """
        try:
            return ray.get(self.broker.broadcast.remote(method, args))
        except RayTaskError as exc:
            raise PoolError(f"{method} failed on a worker: {cause_text(exc)}") from None

    def set_response_prefix(self, prefix: str) -> None:
        self.broadcast_setup("set_response_prefix", prefix)

    def set_directions(self, directions: Any) -> None:
        """`directions`: a tensor (put into the object store here) or an ObjectRef of one."""
        ref = directions if isinstance(directions, ray.ObjectRef) else ray.put(directions)
        self._keep.append(ref)
        # Nested in the args tuple, the ref reaches the broker unresolved; the broker passes it to each
        # worker as a top-level argument, which Ray resolves on the worker's node.
        self.broadcast_setup("set_directions", ref)

    def set_eval_prompts(self, good: list, bad: list) -> None:
        self.broadcast_setup("set_eval_prompts", good, bad)

    # -- introspection --------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The engine's info() (n_layers, components, ...) from one worker."""
        return ray.get(self.broker.call_one.remote("info"))

    def health(self) -> list[dict[str, Any]]:
        return ray.get(self.broker.health.remote())

    def stats(self) -> dict[str, Any]:
        return ray.get(self.broker.stats.remote())

    def size(self) -> int:
        s = self.stats()
        return s["workers"] + s["starting"]

    @property
    def replacements(self) -> int:
        return self.stats()["replacements"]

    def loads_total(self) -> int:
        return self.stats()["loads_total"]

    def shutdown(self) -> None:
        if not getattr(self, "owner", False):
            return
        with contextlib.suppress(Exception):
            ray.get(self.broker.shutdown.remote(), timeout=30)
        with contextlib.suppress(Exception):
            ray.kill(self.broker)
        self.owner = False

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def cause_text(exc: RayTaskError) -> str:
    """The one line of an error raised on a worker (its cause, not Ray's traceback)."""
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return str(cause) if isinstance(cause, (PoolError, WorkerStartError)) else short_error(cause)
    return str(exc).strip().splitlines()[-1]


def _check_resources(n: int, cpus: float, gpus: float, resources: dict[str, float], elastic: bool = False) -> None:
    """Fail fast when the cluster, as it is now, cannot hold the `n` workers the pool waits for (all of
    them, or cluster.min_workers with an elastic start; the others may wait for nodes to come)."""
    total = ray.cluster_resources()
    need = {"CPU": n * cpus, "GPU": n * gpus, **{k: n * v for k, v in resources.items()}}
    missing = [f"{k}: need {v:g}, cluster has {total.get(k, 0):g}" for k, v in need.items() if v > total.get(k, 0) + 1e-9]
    if missing:
        raise WorkerStartError(
            f"the cluster cannot hold {n} model workers ({'; '.join(missing)}); "
            f"lower {'cluster.min_workers' if elastic else 'cluster.workers'} or the per-worker resources"
        )


def _check_one_node_holds_a_replica(ranks: int, cpus: float, gpus: float, resources: dict[str, float]) -> None:
    """All ranks of a replica (and all GPUs of one worker) sit on one node: fail fast when no node can."""
    need = {k: v for k, v in {"CPU": cpus, "GPU": gpus, **resources}.items() if v > 0}
    best = 0
    for node in ray.nodes():
        if node.get("Alive"):
            have = node.get("Resources", {})
            best = max(best, ranks_fit(have, need) if need else ranks)
    if best < ranks:
        shape = ", ".join(f"{v:g} {k}" for k, v in need.items())
        raise WorkerStartError(
            f"no node of the cluster holds one replica of {ranks} ranks x ({shape}): the largest holds {best} "
            "ranks; use nodes with more GPUs/CPUs, or lower cluster.tensor_parallel or the per-worker resources"
        )
