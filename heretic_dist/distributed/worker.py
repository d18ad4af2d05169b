"""ModelWorker: a Ray actor that holds one engine (one model load) for its whole life.

The class is plain Python (testable without Ray); `heretic_dist.distributed.pool` applies `ray.remote` with the
resources of the run. A worker never writes run state; it answers calls and reports its own health.
"""

from __future__ import annotations

import importlib
import os
import socket
import threading
import time
import traceback
import uuid
from typing import Any

import ray

from heretic_dist.engine.types import PartialResult, Prompt, Shard, TrialParams

SETTINGS_CLASS_KEY = "__settings_class__"


def load_object(path: str) -> Any:
    """Import "package.module:Name" (or "package.module.Name")."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"not an import path of the form 'package.module:Name': {path!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def settings_payload(settings: Any) -> Any:
    """What travels to a worker: a plain dict (pydantic models are dumped with their class path)."""
    if settings is None or isinstance(settings, dict):
        return settings
    if hasattr(settings, "model_dump"):
        cls = type(settings)
        payload = settings.model_dump(mode="python")
        payload[SETTINGS_CLASS_KEY] = f"{cls.__module__}:{cls.__qualname__}"
        return payload
    return settings


def rebuild_settings(payload: Any) -> Any:
    if isinstance(payload, dict) and SETTINGS_CLASS_KEY in payload:
        data = dict(payload)
        cls = load_object(data.pop(SETTINGS_CLASS_KEY))
        return cls.model_validate(data)
    return payload


class ModelWorker:
    """Holds one engine. Constructed with an engine factory import path and a settings payload."""

    def __init__(self, engine_factory: str, settings: Any, worker_id: str | None = None):
        self.worker_id = worker_id or uuid.uuid4().hex[:8]
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.loads = 0
        self.load_seconds = 0.0
        self.trials_run = 0
        self._lock = threading.Lock()  # engine calls are serialized (health() runs on its own thread)
        self.engine: Any = None
        self._info: dict[str, Any] = {}
        # A load error is kept and reported by health() instead of raised: a constructor exception would
        # surface as a bare ActorDiedError with the real cause buried in a log.
        self.load_error: str | None = None
        start = time.perf_counter()
        try:
            factory = load_object(engine_factory)
            self.engine = factory(rebuild_settings(settings))
            self._info = dict(self.engine.info())
        except Exception as exc:  # noqa: BLE001 - reported to the pool, which kills this actor
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.load_traceback = traceback.format_exc()
        else:
            self.loads += 1
        self.load_seconds = time.perf_counter() - start

    @ray.method(concurrency_group="status")
    def health(self) -> dict[str, Any]:
        return {
            "error": self.load_error,
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "device": str(self._info.get("device", "cpu")),
            "load_seconds": self.load_seconds,
            "loads": self.loads,
            "trials_run": self.trials_run,
        }

    @ray.method(concurrency_group="status")
    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def _engine(self) -> Any:
        if self.engine is None:
            raise RuntimeError(f"worker {self.worker_id} has no engine: {self.load_error}")
        return self.engine

    def responses(self, prompts: list[Prompt], skip_special_tokens: bool = False) -> list[str]:
        with self._lock:
            return self._engine().responses(prompts, skip_special_tokens)

    def prefix_replies(self, prompts: list[Prompt]) -> list[str]:
        with self._lock:
            return self._engine().prefix_replies(prompts)

    def set_response_prefix(self, prefix: str) -> None:
        with self._lock:
            self._engine().set_response_prefix(prefix)

    def residual_sums(self, prompts: list[Prompt]):
        """(float64 sums, count). Sums are a CPU torch tensor (Ray ships it zero-copy as numpy)."""
        with self._lock:
            sums, count = self._engine().residual_sums(prompts)
        return sums.detach().to("cpu").double(), int(count)

    def set_directions(self, directions) -> None:
        """Called with an ObjectRef from ray.put: Ray resolves it once per worker."""
        import torch

        if not isinstance(directions, torch.Tensor):
            directions = torch.as_tensor(directions)
        with self._lock:
            self._engine().set_directions(directions)

    def set_eval_prompts(self, good: list[Prompt], bad: list[Prompt]) -> None:
        with self._lock:
            self._engine().set_eval_prompts(good, bad)

    def warm_baselines(self, shards: list[Shard]) -> None:
        """Compute the unedited log-probs of the shards trials will use, once, before any trial."""
        with self._lock:
            baseline = getattr(self._engine(), "baseline", None)  # the FakeEngine has none
            for shard in shards if baseline else []:
                baseline(shard)

    def run_trial(self, params: dict[str, Any] | TrialParams | None, shard: Shard) -> PartialResult:
        if isinstance(params, dict):
            params = TrialParams.from_dict(params)
        with self._lock:
            result = self._engine().run_trial(params, shard)
            self.trials_run += 1
        result.worker_id = self.worker_id
        result.host = self.host
        return result
