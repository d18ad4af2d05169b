"""Tensor-parallel replicas on Ray: T ModelWorker actors in one placement group (STRICT_PACK: one node)
forming one torch.distributed group; rank 0 is the worker the pool sees and drives the others.

Every engine call on rank 0 is mirrored to ranks 1..T-1 (same method, same arguments, same order), so
every rank runs the same forward passes and collectives. A replica lives and dies whole: when a peer
fails while rank 0 works, rank 0 would wait forever in its next collective, so a watcher thread ends
rank 0's process instead; its callers then see a lost worker, and the broker replaces the whole group
(engine/parallel.py has the sharding and the edit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any, Callable

import ray
from ray.exceptions import RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)

PEER_GRACE_S = 5.0  # a peer failed: how long rank 0 may still finish its own call (the same error)
PEER_FINISH_S = 300.0  # rank 0 finished: how long its peers may take to finish the same call


def rendezvous_address() -> tuple[str, int]:
    """This node's address and a free port for the group's store (called on rank 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def rank_environment(rank: int, world: int, address: tuple[str, int]) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": address[0],
            "MASTER_PORT": str(address[1]), "LOCAL_SIZE": str(world)}


def _exit_replica(why: str) -> None:
    log.error("tensor-parallel replica broken (%s): ending rank 0 so the pool replaces the group", why)
    os._exit(1)


class PeerCall:
    """One engine call mirrored to the peers, watched while rank 0 runs its own part."""

    def __init__(self, peers: list[Any], method: str, args: tuple, kwargs: dict):
        self.refs = [getattr(p, method).remote(*args, **kwargs) for p in peers]
        self.method = method
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name=f"peers-{method}", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        pending = list(self.refs)
        while pending and not self.done.is_set():
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - any failure of a peer breaks the replica
                    if not self.done.wait(PEER_GRACE_S):
                        _exit_replica(f"a peer failed during {self.method}: {type(exc).__name__}")
                    return

    def finish(self, own_error: BaseException | None) -> None:
        """Rank 0's part is over: wait for the peers; a replica whose ranks disagree is ended."""
        self.done.set()
        ready, pending = ray.wait(self.refs, num_returns=len(self.refs),
                                  timeout=PEER_FINISH_S if own_error is None else PEER_GRACE_S)
        if pending:
            _exit_replica(f"peers did not finish {self.method}")
        for ref in ready:
            try:
                ray.get(ref)
            except RayTaskError:  # the peer's engine raised
                if own_error is None:  # where rank 0's did not: the ranks diverged
                    _exit_replica(f"a peer failed during {self.method} where rank 0 did not")
                # both raised (the same bad input): rank 0's own error is the call's result
            except Exception as exc:  # noqa: BLE001 - the peer is gone: so is the group
                _exit_replica(f"a peer was lost during {self.method}: {type(exc).__name__}")


@contextlib.contextmanager
def lockstep(peers: list[Any], method: str, *args: Any, **kwargs: Any):
    """Run the body (rank 0's part of `method`) while the peers run theirs."""
    if not peers:
        yield
        return
    call = PeerCall(peers, method, args, kwargs)
    try:
        yield
    except BaseException as exc:
        call.finish(exc)
        raise
    call.finish(None)


class ReplicaGroup:
    """The actors and placement group of one replica (the broker keeps one per worker id)."""

    def __init__(self, pg: Any, ranks: list[Any], world: int = 0):
        self.pg = pg
        self.ranks = ranks
        self.world = world or len(ranks)  # ranks it has once started

    def kill(self) -> None:
        for actor in self.ranks:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)


def new_group(worker_options: dict[str, Any], world: int) -> ReplicaGroup:
    """The placement group of one replica: T bundles of one rank's resources, all on one node. The
    broker keeps it from here on, so that a shutdown while it waits for room removes it too."""
    bundle = {"CPU": worker_options.get("num_cpus", 1.0), "GPU": worker_options.get("num_gpus", 0.0),
              **worker_options.get("resources", {})}
    bundle = {k: v for k, v in bundle.items() if v}
    return ReplicaGroup(placement_group([dict(bundle) for _ in range(world)], strategy="STRICT_PACK"), [], world)


async def start_replica(group: ReplicaGroup, actor_cls: Any, worker_options: dict[str, Any], engine: str,
                        settings: Any, worker_id: str, on_wait: Callable[[], bool] | None = None,
                        check_s: float = 2.0) -> Any:
    """Place the group's T ranks, join them into one collective group, load the model on each, wire
    rank 0 to the others. Returns rank 0's handle; raises on failure after ending the group. While no
    node has room for the T ranks, `on_wait()` is called every `check_s` (it says so to the user);
    when it returns True (the pool was shut down) the start gives up."""
    pg, world = group.pg, group.world
    try:
        ready = asyncio.wrap_future(pg.ready().future())
        while not (await asyncio.wait({ready}, timeout=check_s))[0]:
            if on_wait is not None and on_wait():
                ready.cancel()
                raise RuntimeError("the pool was shut down while the replica waited for a node")
        ready.result()
        for rank in range(world):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
            options = {**worker_options, "scheduling_strategy": strategy}
            group.ranks.append(actor_cls.options(**options).remote(
                engine, settings, f"{worker_id}" if rank == 0 else f"{worker_id}.r{rank}", rank=rank, world_size=world))
        address = await group.ranks[0].rendezvous.remote()
        t0 = time.perf_counter()
        await _load_all(group.ranks, address)
        await group.ranks[0].attach_peers.remote(group.ranks[1:], time.perf_counter() - t0)
    except BaseException:
        group.kill()
        raise
    return group.ranks[0]


async def _load_all(ranks: list[Any], address: tuple[str, int]) -> None:
    """Load every rank; the first rank that fails ends the start (the others would wait for it in a
    collective forever). A failed load raises RuntimeError with that rank's error."""
    tasks = {asyncio.ensure_future(r.load.remote(address)): i for i, r in enumerate(ranks)}
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            error = task.exception() or task.result()
            if error:
                for other in pending:
                    other.cancel()
                raise RuntimeError(f"rank {tasks[task]}: {error}")
