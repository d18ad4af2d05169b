"""What the worker broker knows of the cluster's nodes: which are alive, which are being drained, and
how many workers the live ones have room for.

A drained node is one the cluster was told will go away: `ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds S`, which is what KubeRay and Ray's
autoscaler send for a spot preemption or an idle node. Ray then leases nothing new on it (a new actor
goes to another node), but actors already there keep running until the node is killed; the node ends
by itself once nothing runs on it. So the broker must stop handing out workers on such a node itself,
and let them go once they are idle.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import ray

from .sizing import ranks_fit

NODES_TTL_S = 1.0  # ray.nodes() is asked at most this often (one GCS round trip, on the event loop)
DRAIN_POLL_S = 2.0  # how often the broker asks which nodes are being drained


def draining_node_ids() -> set[str]:
    """Ids of the live nodes that the GCS reports as DRAINING. Ray reports a drain outside its private
    modules only in the autoscaler SDK's cluster status (what `ray status` shows); it answers on any
    cluster, with or without an autoscaler. Blocking (one GCS call): run it off the event loop."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    return {n.node_id for n in [*status.active_nodes, *status.idle_nodes]
            if n.node_id and n.node_status == "DRAINING"}


class NodeView:
    """The live nodes (cached), what one worker needs, and how many workers fit on the nodes that
    are neither dead nor drained."""

    def __init__(self, worker_options: dict[str, Any], tensor_parallel: int = 1):
        self.worker_options = worker_options
        self.tensor_parallel = max(1, int(tensor_parallel))
        self.draining: set[str] = set()  # node ids, as last polled
        self._seen: tuple[float, list[dict[str, Any]]] = (0.0, [])

    def alive(self) -> list[dict[str, Any]]:
        """ray.nodes() of the live nodes, at most once a NODES_TTL_S (many pending starts ask)."""
        seen, nodes = self._seen
        if time.monotonic() - seen > NODES_TTL_S:
            with contextlib.suppress(Exception):
                nodes = [n for n in ray.nodes() if n.get("Alive")]
                self._seen = (time.monotonic(), nodes)
        return nodes

    def need(self) -> dict[str, float]:
        """What one rank takes (a replica takes it tensor_parallel times, on one node)."""
        o = self.worker_options
        need = {"CPU": float(o.get("num_cpus") or 0), "GPU": float(o.get("num_gpus") or 0),
                **{k: float(v) for k, v in (o.get("resources") or {}).items()}}
        return {k: v for k, v in need.items() if v > 0}

    def room(self) -> int:
        """Workers (replicas) the live nodes that are not being drained can hold in all."""
        return sum(ranks_fit(n.get("Resources", {}), self.need()) // self.tensor_parallel
                   for n in self.alive() if n.get("NodeID") not in self.draining)

    def is_alive(self, node_id: str) -> bool:
        return node_id in {n.get("NodeID") for n in self.alive()}

    def shape(self) -> str:
        """What a worker needs, as the user reads it: "1 CPU", "2 x (1 CPU, 1 GPU)"."""
        shape = ", ".join(f"{v:g} {k}" for k, v in self.need().items()) or "no resources"
        return f"{self.tensor_parallel} x ({shape})" if self.tensor_parallel > 1 else shape
