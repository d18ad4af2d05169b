"""gpus_per_worker = "auto": the fewest GPUs that hold one replica, and how many replicas the cluster holds.

The need of one rank comes from the engine (engine/protocol.py `memory_need`: weights, KV cache,
overhead). Memory per GPU is `cluster.gpu_memory_gib`, or else read on one GPU node (nvidia-smi, or
torch.cuda there) by a small Ray task; GPUs and CPUs per node come from `ray.nodes()`. A cluster with
GPUs of several sizes is planned for the GPUs of its first GPU node (set gpu_memory_gib to the smallest).

The rule (`choose_gpus`): with usable = memory x (1 - memory_headroom), a rank that fits one GPU gets
1/k of it, k = how many fit (at most 8: the densest packing); else the smallest G in 2, 4, 8 with
need <= G x usable. A replica is tensor_parallel ranks on one node, so a node must have G x T GPUs.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from ..engine.protocol import memory_need
from ..errors import UserError

if TYPE_CHECKING:
    from ..config import ClusterSettings, Settings
    from ..engine.types import MemoryNeed, Prompt

GIB = 1024**3
MAX_PACKING = 8  # replicas per GPU at most
SPREADS = (2, 4, 8)  # GPUs per replica (per rank with tensor parallelism) beyond one
DEFAULT_PROMPT_TOKENS = 256  # when no prompts are at hand (chat template included)
CHARS_PER_TOKEN = 3  # a conservative rate for English text (tokenizers average ~4)
TEMPLATE_TOKENS = 32  # the chat template around a prompt
PROBE_TIMEOUT_S = 60.0
NO_GPUS = ('cluster.gpus_per_worker = "auto" sizes replicas on GPUs, and the Ray cluster has none: '
           "set cluster.gpus_per_worker = 0 to run on CPUs, or join a cluster with GPUs (--address)")


@dataclass(frozen=True)
class NodeGpus:
    node_id: str
    gpus: float
    cpus: float = math.inf


@dataclass(frozen=True)
class ReplicaPlan:
    """What "auto" chose: GPUs per worker (per rank), and what that gives on the cluster now."""

    gpus_per_worker: float  # what each Ray actor of a replica reserves
    tensor_parallel: int
    replicas: int  # replicas that fit on the cluster as it is now
    need_bytes: int  # per rank
    gpu_bytes: int
    headroom: float
    line: str  # one line for people: the model, the choice, the replicas

    @property
    def gpus_per_replica(self) -> float:
        return self.gpus_per_worker * self.tensor_parallel


def packed(k: int) -> float:
    """1/k of a GPU, rounded down to Ray's resource precision (1e-4) so that k of them fit one GPU."""
    return math.floor(10_000 / k) / 10_000


def choose_gpus(need: int, gpu_bytes: int, headroom: float) -> float | None:
    """GPUs per rank for `need` bytes on GPUs of `gpu_bytes`; None when even 8 GPUs are too few."""
    usable = gpu_bytes * (1 - headroom)
    if need <= usable:
        return packed(min(MAX_PACKING, max(1, int(usable // max(need, 1)))))
    return next((float(g) for g in SPREADS if need <= g * usable), None)


def replicas_on(nodes: Iterable[NodeGpus], gpus_per_worker: float, tensor_parallel: int = 1,
                cpus_per_worker: float = 0.0) -> int:
    """Replicas of `tensor_parallel` ranks (all of a replica on one node) that the nodes hold."""
    total = 0
    for node in nodes:
        if gpus_per_worker >= 1:
            ranks = int(node.gpus // gpus_per_worker)
        else:
            ranks = int(node.gpus + 1e-9) * int(1 / gpus_per_worker + 1e-9)
        if cpus_per_worker > 0 and math.isfinite(node.cpus):
            ranks = min(ranks, int(node.cpus / cpus_per_worker + 1e-9))
        total += ranks // tensor_parallel
    return total


def ranks_fit(have: dict[str, float], need: dict[str, float]) -> int:
    """How many actors needing `need` (resource -> amount) one node with resources `have` holds."""
    if not need:
        return 1 << 30
    return min(int(have.get(k, 0) / v + 1e-9) for k, v in need.items())


def _gpus_text(g: float, t: int) -> str:
    """ "2 GPUs per replica", "0.25 GPU per replica (4 per GPU)", "2 ranks x 1 GPU per replica" """
    one = f"{g:g} GPU{'s' if g > 1 else ''}"
    return (one if t == 1 else f"{t} ranks x {one}") + " per replica" + (f" ({int(1 / g + 1e-9)} per GPU)" if g < 1 else "")


def plan_replicas(need: MemoryNeed, gpu_bytes: int, nodes: list[NodeGpus], cluster: ClusterSettings,
                  quantized: bool = False) -> ReplicaPlan:
    """The plan for one rank's `need` on `nodes` with GPUs of `gpu_bytes`; UserError when none fits."""
    t, headroom = cluster.tensor_parallel, cluster.memory_headroom
    gpu_nodes = [n for n in nodes if n.gpus >= 1]
    if not gpu_nodes:
        raise UserError(NO_GPUS)
    per = "rank" if t > 1 else "replica"
    need_gib, gpu_gib = need.total / GIB, gpu_bytes / GIB
    g = choose_gpus(need.total, gpu_bytes, headroom)
    fixes = ("" if quantized else 'quantization = "bnb_4bit", ') + "more cluster.tensor_parallel ranks, or bigger GPUs"
    if g is None:
        raise UserError(f"{need.label} needs {need_gib:.1f} GiB per {per}, more than {SPREADS[-1]} GPUs of "
                        f"{gpu_gib:g} GiB hold with {headroom:.0%} kept free: use {fixes}")
    biggest = max(n.gpus for n in gpu_nodes)
    if replicas_on([NodeGpus("", biggest)], g, t) == 0:
        raise UserError(f"{need.label} needs {math.ceil(g * t):g} GPUs on one node ({_gpus_text(g, t)}), "
                        f"and the largest node has {biggest:g}: use nodes with more GPUs, or {fixes}")
    replicas = replicas_on(gpu_nodes, g, t, cluster.cpus_per_worker)
    line = (f"{need.label}, {need_gib:.1f} GiB per {per}: {_gpus_text(g, t)}, {replicas} "
            f"replica{'s' if replicas != 1 else ''} on this cluster (GPUs of {gpu_gib:g} GiB, {headroom:.0%} kept free)")
    if cluster.workers > replicas:
        line += f"; cluster.workers = {cluster.workers}: {cluster.workers - replicas} wait for room"
    return ReplicaPlan(g, t, replicas, need.total, gpu_bytes, headroom, line)


def prompt_tokens(prompts: Iterable[Prompt] | None) -> int:
    """A generous token count of the longest prompt (system + user + chat template)."""
    longest = max((len(p.system or "") + len(p.user) for p in prompts or []), default=None)
    return DEFAULT_PROMPT_TOKENS if longest is None else longest // CHARS_PER_TOKEN + TEMPLATE_TOKENS


def plan_for(settings: Settings, nodes: list[NodeGpus], gpu_bytes: int, prompts: Iterable[Prompt] | None = None,
             response_tokens: int | None = None) -> ReplicaPlan:
    """The plan for `settings.model` (sized by its engine) on `nodes`."""
    if not any(n.gpus >= 1 for n in nodes):
        raise UserError(NO_GPUS)
    need = memory_need(settings, prompt_tokens(prompts), response_tokens or settings.max_response_length)
    return plan_replicas(need, gpu_bytes, nodes, settings.cluster, settings.quantization == "bnb_4bit")


def with_gpus(settings: Settings, gpus_per_worker: float) -> Settings:
    cluster = settings.cluster.model_copy(update={"gpus_per_worker": gpus_per_worker})
    return settings.model_copy(update={"cluster": cluster})


def reserved(cluster: ClusterSettings) -> tuple[float, float]:
    """(CPUs, GPUs) that all workers take: workers x tensor_parallel ranks x the per-rank resources."""
    ranks = cluster.workers * cluster.tensor_parallel
    gpus = 0.0 if cluster.gpus_per_worker == "auto" else ranks * float(cluster.gpus_per_worker)
    return ranks * cluster.cpus_per_worker, gpus


# -- the Ray side -------------------------------------------------------------------------------------


def resolve_cluster(settings: Settings, prompts: Iterable[Prompt] | None = None,
                    response_tokens: int | None = None) -> tuple[Settings, ReplicaPlan | None]:
    """Settings whose gpus_per_worker is a number (after ray.init); the plan when it was "auto"."""
    if settings.cluster.gpus_per_worker != "auto":
        return settings, None
    nodes = cluster_nodes()
    if not any(n.gpus >= 1 for n in nodes):
        raise UserError(NO_GPUS)
    plan = plan_for(settings, nodes, gpu_memory_bytes(settings.cluster, nodes), prompts, response_tokens)
    return with_gpus(settings, plan.gpus_per_worker), plan


def cluster_nodes() -> list[NodeGpus]:
    """The alive nodes of the Ray cluster this process is connected to, with their GPUs and CPUs."""
    import ray

    return [NodeGpus(n["NodeID"], float(n["Resources"].get("GPU", 0.0)), float(n["Resources"].get("CPU", 0.0)))
            for n in ray.nodes() if n.get("Alive")]


def gpu_memory_bytes(cluster: ClusterSettings, nodes: list[NodeGpus]) -> int:
    """cluster.gpu_memory_gib, or the memory of one GPU of the first GPU node, read there."""
    if cluster.gpu_memory_gib:
        return int(cluster.gpu_memory_gib * GIB)
    node = next(n for n in nodes if n.gpus >= 1)
    found = probe_node(node.node_id)
    if found is None:
        raise UserError(f"cannot read the memory of the GPUs of node {node.node_id[:12]} (neither nvidia-smi "
                        "nor CUDA answers there): set cluster.gpu_memory_gib, e.g. 80")
    return found


def probe_node(node_id: str, timeout_s: float = PROBE_TIMEOUT_S) -> int | None:
    """Bytes of the smallest GPU of a node, read by a task there that reserves no resources."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, num_gpus=0, max_retries=0)(_memory_here).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False))
    try:
        return ray.get(task.remote(), timeout=timeout_s)[1]
    except (GetTimeoutError, RayError):
        return None


def _memory_here() -> tuple[int, int | None]:
    return gpu_memory_here()


def gpu_memory_here() -> tuple[int, int | None]:
    """(GPUs, bytes of the smallest) on this machine: nvidia-smi sees all, whatever CUDA_VISIBLE_DEVICES
    says; torch.cuda where there is no nvidia-smi. (0, None) without GPUs."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            mib = [int(float(x)) for x in out.split() if x.strip()]
            if mib:
                return len(mib), min(mib) * 1024**2
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    try:
        import torch
    except ImportError:
        return 0, None
    if not torch.cuda.is_available():
        return 0, None
    sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    return len(sizes), min(sizes)


def check_plan(settings: Settings, gpus: int | None, prompts: Iterable[Prompt] | None = None) -> str:
    """`heretic-dist check`: the plan line for gpus_per_worker = "auto". On the cluster at
    cluster.address when one is set (joined for the check); else, without Ray, on one node of `gpus`
    GPUs (--gpus; default: this machine's) of cluster.gpu_memory_gib each (default: this machine's)."""
    if settings.cluster.address:
        from .driver import start_ray

        started = start_ray(settings.cluster, 0, 0)
        try:
            return resolve_cluster(settings, prompts)[1].line
        finally:
            if started:
                import ray

                ray.shutdown()
    count, here = gpu_memory_here()
    n = count if gpus is None else gpus
    memory = int(settings.cluster.gpu_memory_gib * GIB) if settings.cluster.gpu_memory_gib else here
    if gpus is None and not count:
        raise UserError('gpus_per_worker = "auto": this machine has no GPU to plan for; give --gpus N (with '
                        "cluster.gpu_memory_gib) or the --address of a cluster with GPUs")
    if n and memory is None:
        raise UserError(f"--gpus {n}: this machine has no GPU to read the memory of; set cluster.gpu_memory_gib")
    return plan_for(settings, [NodeGpus("this machine", float(n))], memory or 0, prompts).line
