"""ModelWorker: a Ray actor that holds one engine (one model load) for its whole life.

The class is plain Python (testable without Ray); `heretic_dist.distributed.pool` applies `ray.remote` with the
resources of the run. A worker never writes run state; it answers calls and reports its own health.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterator

import ray

from heretic_dist.config import cluster_count
from heretic_dist.engine.protocol import TrialEngine, engine_class
from heretic_dist.engine.types import EvaluationRequest, EvaluationResult, PartialResult, Prompt, Shard, TrialParams

from . import replica
from .batching import TrialBatcher
from .engine_thread import EngineThread, on_engine_thread

if TYPE_CHECKING:
    from heretic_dist.config import Settings


def describe_error(exc: BaseException) -> str:
    """`Type: message`, with the root cause appended when the error wraps another one."""
    text = f"{type(exc).__name__}: {exc}"
    seen, cause = {id(exc)}, exc.__cause__ or exc.__context__
    root = None
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        root, cause = cause, cause.__cause__ or cause.__context__
    if root is not None and str(root) and str(root) not in text:
        text += f" (caused by {type(root).__name__}: {root})"
    return " ".join(text.split())


class ModelWorker:
    """Holds one engine, chosen by its registered name (engine/protocol.py), built from the settings.

    With world_size > 1 it is one rank of a tensor-parallel replica (distributed/replica.py): the model
    loads in `load()`, once every rank knows the group's address, and rank 0 mirrors each engine call to
    the other ranks (`replica.lockstep`).
    """

    def __init__(self, engine: str, settings: Settings, worker_id: str | None = None, *, rank: int = 0,
                 world_size: int = 1):
        self.worker_id = worker_id or uuid.uuid4().hex[:8]
        self.rank, self.world_size = rank, world_size
        self._peers: list[Any] = []
        self._peer_pids: list[int] = []
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.loads = 0
        self.load_seconds = 0.0
        self.trials_run = 0
        self._lock = threading.Lock()  # engine calls are serialized (health() runs on its own thread)
        self.engine: TrialEngine | None = None
        self._info: dict[str, Any] = {}
        self._settings = settings
        self._prefix = ""  # the response prefix, which the refusal judge strips from replies
        self._judge: Any = None  # settings.refusal_judge, built at its first use
        # A load error is kept and reported by health() instead of raised: a constructor exception would
        # surface as a bare ActorDiedError with the real cause buried in a log.
        self.load_error: str | None = None
        self._engine_name = engine
        # the model loads and every engine call runs on this one thread (engine_thread.py says why)
        self.engine_thread = EngineThread()
        # trials_per_worker = K > 1: the actor takes K run_trial calls at once, scored K to a pass
        k = cluster_count(settings, "trials_per_worker")
        self._batcher: TrialBatcher | None = TrialBatcher(self._score, k) if k > 1 else None
        if world_size == 1:
            self._load()

    @on_engine_thread
    def _load(self) -> None:
        start = time.perf_counter()
        try:
            self.engine = engine_class(self._engine_name)(self._settings)
            self._info = dict(self.engine.info())
        except Exception as exc:  # noqa: BLE001 - reported to the pool, which kills this actor
            self.load_error = describe_error(exc)
        else:
            self.loads += 1
        self.load_seconds = time.perf_counter() - start

    # -- one rank of a tensor-parallel replica ------------------------------------------------------

    def rendezvous(self) -> tuple[str, int]:
        return replica.rendezvous_address()

    def load(self, address: tuple[str, int]) -> str | None:
        """Join the group at `address` and load this rank's shards. Returns the load error, if any."""
        os.environ.update(replica.rank_environment(self.rank, self.world_size, address))
        self._load()
        return self.load_error

    def attach_peers(self, peers: list[Any], load_seconds: float) -> None:
        """Rank 0: the other ranks of the replica, driven in lockstep from now on."""
        self._peers = list(peers)
        self._peer_pids = [h["pid"] for h in ray.get([p.health.remote() for p in self._peers])]
        self.load_seconds = load_seconds

    @contextlib.contextmanager
    def _lockstep(self, method: str, *args: Any) -> Iterator[None]:
        """Serialize engine calls (health() runs on its own thread) and mirror them to the peers."""
        with self._lock, replica.lockstep(self._peers, method, *args):
            yield

    @ray.method(concurrency_group="status")
    def health(self) -> dict[str, Any]:
        error = self.load_error
        if self._peers and error is None:
            ready, _ = ray.wait([p.health.remote() for p in self._peers], num_returns=len(self._peers), timeout=10)
            if len(ready) < len(self._peers) or any(r.get("error") for r in ray.get(ready)):
                error = "a rank of this tensor-parallel replica is lost"
        return {
            "error": error,
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "device": str(self._info.get("device", "cpu")),
            "load_seconds": self.load_seconds,
            "loads": self.loads,
            "trials_run": self.trials_run,
            # (is_initialized first: get_runtime_context() would start a Ray of its own in a plain process)
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
            "rank": self.rank,
            "ranks": self.world_size,
            "peer_pids": list(self._peer_pids),
            "trial_batches": dict(self._batcher.sizes) if self._batcher else {},  # pass size -> passes
        }

    @ray.method(concurrency_group="status")
    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def _engine(self) -> TrialEngine:
        if self.engine is None:
            raise RuntimeError(f"worker {self.worker_id} has no engine: {self.load_error}")
        return self.engine

    @on_engine_thread
    def responses(self, prompts: list[Prompt], skip_special_tokens: bool = False) -> list[str]:
        with self._lockstep("responses", prompts, skip_special_tokens):
            return self._engine().responses(prompts, skip_special_tokens)

    @on_engine_thread
    def prefix_replies(self, prompts: list[Prompt]) -> list[str]:
        with self._lockstep("prefix_replies", prompts):
            return self._engine().prefix_replies(prompts)

    @on_engine_thread
    def set_response_prefix(self, prefix: str) -> None:
        with self._lockstep("set_response_prefix", prefix):
            self._engine().set_response_prefix(prefix)
            if prefix != self._prefix and self._judge is not None:
                self._judge.close()
                self._judge = None
            self._prefix = prefix

    @on_engine_thread
    def residual_sums(self, prompts: list[Prompt]):
        """(float64 sums, count). Sums are a CPU torch tensor (Ray ships it zero-copy as numpy)."""
        with self._lockstep("residual_sums", prompts):
            sums, count = self._engine().residual_sums(prompts)
        return sums.detach().to("cpu").double(), int(count)

    @on_engine_thread
    def residuals(self, prompts: list[Prompt]):
        """First-token residuals per prompt, (n, L+2, d) float32 CPU tensor (research mode)."""
        with self._lockstep("residuals", prompts):
            return self._engine().residuals(prompts).detach().to("cpu").float()

    @on_engine_thread
    def set_directions(self, directions) -> None:
        """Called with an ObjectRef from ray.put: Ray resolves it once per worker."""
        import torch

        if not isinstance(directions, torch.Tensor):
            directions = torch.as_tensor(directions)
        with self._lockstep("set_directions", directions):
            self._engine().set_directions(directions)

    @on_engine_thread
    def set_eval_prompts(self, good: list[Prompt], bad: list[Prompt]) -> None:
        with self._lockstep("set_eval_prompts", good, bad):
            self._engine().set_eval_prompts(good, bad)

    @on_engine_thread
    def warm_baselines(self, shards: list[Shard]) -> None:
        """Compute the unedited log-probs of the shards trials will use, once, before any trial."""
        with self._lockstep("warm_baselines", shards):
            self._engine().warm_baselines(shards)

    def run_trial(self, params: dict[str, Any] | TrialParams | None, shard: Shard) -> PartialResult:
        if isinstance(params, dict):
            params = TrialParams.from_dict(params)
        item = (params, shard)
        result = self._batcher.submit(item) if self._batcher else self._score([item])[0]
        result.worker_id = self.worker_id
        result.host = self.host
        return result

    @on_engine_thread
    def _score(self, items: list[tuple[TrialParams | None, Shard]]) -> list[PartialResult]:
        """One trial through the engine's run_trial; several (trials_per_worker > 1, never with
        tensor parallelism) in one batched pass of its run_trials."""
        if len(items) == 1:
            with self._lockstep("run_trial", *items[0]):
                results = [self._engine().run_trial(*items[0])]
        else:
            with self._lock:
                results = self._engine().run_trials(items)
        for result in results:
            if result.replies_to_judge is not None and self.rank == 0:
                self._judge_refusals(result)
        self.trials_run += len(items)
        return results

    def _judge_refusals(self, result: PartialResult) -> None:
        """`refusal_judge` in the search: this worker judges its own shard's replies (a classifier judge
        gets one Ray actor per worker), so only the count travels back."""
        t = time.perf_counter()
        if self._judge is None:
            from heretic_dist.evaluation.judges import make_judge

            self._judge = make_judge(self._settings.refusal_judge, self._settings.refusal_markers, self._prefix)
            self._judge.start()
        verdicts = self._judge.judge(result.replies_to_judge or [])
        result.refusals = sum(v.refusal for v in verdicts)
        result.replies_to_judge = None
        result.timings["judge_s"] = time.perf_counter() - t

    @on_engine_thread
    def evaluate(self, params: dict[str, Any] | TrialParams | None, request: EvaluationRequest) -> EvaluationResult:
        """evaluate-front's measures of one candidate (None = the unedited model)."""
        if isinstance(params, dict):
            params = TrialParams.from_dict(params)
        with self._lockstep("evaluate", params, request):
            result = self._engine().evaluate(params, request)
        result.host = self.host
        return result
