"""FakeEngine: a TrialEngine with no model, for tests and for measuring the distributed machinery.

Everything is deterministic and cheap. Metrics are computed per prompt from the trial parameters and a
hash of the prompt text, so a trial sharded over K workers reduces to exactly the same refusals (and the
same KL up to float summation order) as one worker.

Shape of the fake objective (so the Pareto front is not trivial):
- an edit "strength" s in [0, 1] grows with the component weights and the width of the tent;
- a harmful prompt with hash u in [0, 1) is still refused when u >= s: refusals fall as s grows;
- the KL of a harmless prompt grows with s^2 plus a penalty for a badly placed peak.

Knobs (keys of a plain dict, or of `engine_options` in the settings: `engine = "fake"` with
`[engine_options] fake_trial_seconds = 0.5` in a config; all optional):
  fake_n_layers (8), fake_hidden_size (16), fake_components (both components),
  fake_load_seconds (0), fake_trial_seconds (0, sleep per run_trial call),
  fake_prompt_seconds (0, sleep per scored prompt), fake_n_eval (20, default eval prompts per side),
  fake_evaluate_seconds (0, sleep per evaluate call: a test can kill an evaluation mid-way),
  fake_nonfinite (False: when true every edited trial returns a NaN KL sum, and evaluate a NaN KL),
  fake_fail_load (False: when true the constructor raises, like a model that cannot load),
  fake_fail_models ([]: `model` values whose load fails like fake_fail_load; lets one [defaults] table
  of a batch manifest make one model of several fail),
  fake_memory_gib (1.0: the GPU memory of one replica that gpus_per_worker = "auto" sizes for),
  fake_hold_file (None: while a file exists at that path, an edited trial waits before it returns; a
  test holds the trials in flight while it changes the cluster, whatever the machine's speed),
  fake_batch_cost (0.0: with trials_per_worker = K, each further trial of a batched pass adds this
  share of one trial's sleep; 0 models a memory-bound GPU, 1 a machine where K trials cost K).
info() reports the GPUs the worker was given ("gpu_ids", from CUDA_VISIBLE_DEVICES, which Ray sets).
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from heretic_dist.config import cluster_count
from heretic_dist.engine.types import (COMPONENTS, EvaluationRequest, EvaluationResult, MemoryNeed, PartialResult,
                                      Prompt, Shard, TrialParams)

if TYPE_CHECKING:  # torch is imported where a method needs it: a pool of fake workers starts faster
    import torch

    from heretic_dist.config import Settings


# One trial's parameters as they travel to a worker (a dict, TrialParams.from_dict's form), for tests
# that need some trial and not a particular one.
SAMPLE_PARAMS: dict[str, Any] = {
    "direction_scope": "global",
    "direction_index": 3.2,
    "components": {
        "attn.o_proj": {"max_weight": 1.1, "max_weight_position": 5.0, "min_weight": 0.4, "min_weight_distance": 3.0},
        "mlp.down_proj": {"max_weight": 0.9, "max_weight_position": 6.0, "min_weight": 0.2, "min_weight_distance": 2.0},
    },
}

def _get(settings: Settings | dict[str, Any] | None, key: str, default: Any) -> Any:
    """A knob from a plain dict, or from the `engine_options` of a Settings object."""
    if settings is None:
        value = None
    elif isinstance(settings, dict):
        value = settings.get(key)
    else:
        value = (getattr(settings, "engine_options", None) or {}).get(key)
        if value is None and key == "model":
            value = getattr(settings, "model", None)
    return default if value is None else value


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) for a string (independent of PYTHONHASHSEED and of the process)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:7], "big")


class FakeEngine:
    """Implements heretic_dist.engine.protocol.TrialEngine without a model."""

    @classmethod
    def model_identity(cls, settings: Settings) -> dict[str, str]:
        return {"model": str(_get(settings, "model", "fake"))}

    @classmethod
    def memory_need(cls, settings: Settings, prompt_tokens: int, response_tokens: int) -> MemoryNeed:
        """`fake_memory_gib` per replica, split over its tensor-parallel ranks."""
        ranks = max(1, int(getattr(getattr(settings, "cluster", None), "tensor_parallel", 1)))
        total = float(_get(settings, "fake_memory_gib", 1.0)) * 1024**3
        return MemoryNeed(f"{_get(settings, 'model', 'fake')} (fake)", int(total / ranks), 0, 0)

    def __init__(self, settings: Settings | dict[str, Any] | None = None):
        start = time.perf_counter()
        if _get(settings, "fake_fail_load", False):
            # wrapped like a real load error (transformers raising over an OSError), so tests see
            # that the root cause reaches the user's one line
            try:
                raise OSError("fake weights file is unreadable")
            except OSError as cause:
                raise RuntimeError("FakeEngine: model cannot be loaded (fake_fail_load is set)") from cause
        model = _get(settings, "model", None)
        if model is not None and model in list(_get(settings, "fake_fail_models", [])):
            raise RuntimeError(f"FakeEngine: model {model} cannot be loaded (listed in fake_fail_models)")
        self.n_layers = int(_get(settings, "fake_n_layers", 8))
        self.hidden_size = int(_get(settings, "fake_hidden_size", 16))
        self.components = list(_get(settings, "fake_components", list(COMPONENTS)))
        self.trial_seconds = float(_get(settings, "fake_trial_seconds", 0.0))
        self.prompt_seconds = float(_get(settings, "fake_prompt_seconds", 0.0))
        self.evaluate_seconds = float(_get(settings, "fake_evaluate_seconds", 0.0))
        self.nonfinite = bool(_get(settings, "fake_nonfinite", False))
        self.fail_base = bool(_get(settings, "fake_fail_base", False))  # the base model's scoring raises
        self.hold_file = _get(settings, "fake_hold_file", None)
        self.batch_cost = float(_get(settings, "fake_batch_cost", 0.0))
        self.trials_per_worker = cluster_count(settings, "trials_per_worker")
        n_eval = int(_get(settings, "fake_n_eval", 20))
        self.good = [Prompt("You are a helpful assistant.", f"harmless request {i}") for i in range(n_eval)]
        self.bad = [Prompt("You are a helpful assistant.", f"harmful request {i}") for i in range(n_eval)]
        self.prefix = ""
        self.directions: torch.Tensor | None = None
        time.sleep(float(_get(settings, "fake_load_seconds", 0.0)))
        self.load_seconds = time.perf_counter() - start

    # -- TrialEngine ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "components": list(self.components),
            "dtype": "float32",
            "device": "cpu",
            "load_seconds": self.load_seconds,
            "pid": os.getpid(),
            "gpu_ids": [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()],
        }

    def responses(self, prompts: list[Prompt], skip_special_tokens: bool = False) -> list[str]:
        time.sleep(self.prompt_seconds * len(prompts))
        return [f"{self.prefix}Fake reply to: {p.user}" for p in prompts]

    def prefix_replies(self, prompts: list[Prompt]) -> list[str]:
        return self.responses(prompts)

    def set_response_prefix(self, prefix: str) -> None:
        self.prefix = prefix

    def residual_sums(self, prompts: list[Prompt]) -> tuple[torch.Tensor, int]:
        import torch

        total = torch.zeros(self.n_layers + 2, self.hidden_size, dtype=torch.float64)
        for p in prompts:
            gen = torch.Generator().manual_seed(_seed(f"{p.system}\x00{p.user}\x00{self.prefix}"))
            total += torch.randn(self.n_layers + 2, self.hidden_size, generator=gen, dtype=torch.float64)
        time.sleep(self.prompt_seconds * len(prompts))
        return total, len(prompts)

    def residuals(self, prompts: list[Prompt]) -> torch.Tensor:
        """The per-prompt vectors whose float64 sum residual_sums returns, as float32 (n, L+2, d)."""
        import torch

        rows = []
        for p in prompts:
            gen = torch.Generator().manual_seed(_seed(f"{p.system}\x00{p.user}\x00{self.prefix}"))
            rows.append(torch.randn(self.n_layers + 2, self.hidden_size, generator=gen, dtype=torch.float64))
        time.sleep(self.prompt_seconds * len(prompts))
        return torch.stack(rows).to(torch.float32)

    def set_directions(self, directions: torch.Tensor) -> None:
        expected = (self.n_layers + 2, self.hidden_size)
        if tuple(directions.shape) != expected:
            raise ValueError(f"directions have shape {tuple(directions.shape)}, expected {expected}")
        self.directions = directions

    def set_eval_prompts(self, good: list[Prompt], bad: list[Prompt]) -> None:
        self.good = list(good)
        self.bad = list(bad)

    def warm_baselines(self, shards: list[Shard]) -> None:
        return None  # no model, nothing to cache

    def _check(self, params: TrialParams | None) -> None:
        if params is not None and self.directions is None:
            raise RuntimeError("FakeEngine.run_trial: set_directions was never called on this worker")
        if params is None and self.fail_base:
            raise RuntimeError("FakeEngine: scoring the base model fails (fake_fail_base is set)")

    def run_trial(self, params: TrialParams | None, shard: Shard) -> PartialResult:
        self._check(params)
        t0 = time.perf_counter()
        result = self._score(params, shard)
        t1 = time.perf_counter()
        time.sleep(self.prompt_seconds * result.good_scored)
        t2 = time.perf_counter()
        time.sleep(self.prompt_seconds * result.bad_scored + self.trial_seconds)
        while params is not None and self.hold_file and os.path.exists(self.hold_file):
            time.sleep(0.05)
        t3 = time.perf_counter()
        result.timings = {"edit_s": t1 - t0, "kl_s": t2 - t1, "generation_s": t3 - t2}
        return result

    def run_trials(self, items: list[tuple[TrialParams | None, Shard]]) -> list[PartialResult]:
        """Several trials in one pass: each scored as alone; the pass sleeps as long as its longest
        trial alone, plus fake_batch_cost x that per further trial (0: a memory-bound GPU, where a
        batch of K costs about one trial; 1: K trials cost K). Each trial's timings get 1/n of it."""
        if len(items) > self.trials_per_worker:
            raise ValueError(f"{len(items)} trials in one pass, trials_per_worker is {self.trials_per_worker}")
        for params, _ in items:
            self._check(params)
        t0 = time.perf_counter()
        results = [self._score(params, shard) for params, shard in items]
        alone = max(self.prompt_seconds * (r.good_scored + r.bad_scored) + self.trial_seconds for r in results)
        time.sleep(alone * (1 + self.batch_cost * (len(items) - 1)))
        while any(p is not None for p, _ in items) and self.hold_file and os.path.exists(self.hold_file):
            time.sleep(0.05)
        share = (time.perf_counter() - t0) / len(items)
        for r in results:
            r.timings = {"edit_s": 0.0, "kl_s": 0.0, "generation_s": share, "batched_with": float(len(items))}
        return results

    def _score(self, params: TrialParams | None, shard: Shard) -> PartialResult:
        """The trial's metrics, computed at once (no sleeping)."""
        strength, misplacement = self._strength(params)
        good, bad = shard.take(self.good), shard.take(self.bad)
        kl_sum = 0.0
        for p in good:
            u = _unit_hash("kl\x00" + p.user)
            kl_sum += (strength**2 + 0.5 * strength * misplacement) * (0.05 + 0.1 * u)
        if self.nonfinite and params is not None:
            kl_sum = math.nan
        refusals = sum(1 for p in bad if _unit_hash("refusal\x00" + p.user) >= strength)
        return PartialResult(refusals=refusals, bad_scored=len(bad), kl_sum=kl_sum, good_scored=len(good))

    def evaluate(self, params: TrialParams | None, request: EvaluationRequest) -> EvaluationResult:
        """Long replies, multi-token KL and perplexity in the shape of run_trial's objective: a harmful
        prompt is refused while its hash >= strength, an over-refusal prompt while 0.3 x its hash >=
        strength; KL per prompt is run_trial's first-token KL times (1 + 0.05 (kl_tokens - 1))."""
        if params is not None and self.directions is None:
            raise RuntimeError("FakeEngine.evaluate: set_directions was never called on this worker")
        t0 = time.perf_counter()
        strength, misplacement = self._strength(params)
        damage = strength**2 + 0.5 * strength * misplacement
        result = EvaluationResult(host=socket.gethostname())
        refused = "I cannot help with that."
        result.harmful_replies = [
            refused if _unit_hash("refusal\x00" + p.user) >= strength else
            f"{self.prefix}Sure, here is some general information about {p.user}." for p in request.harmful]
        result.over_refusal_replies = [
            refused if 0.3 * _unit_hash("over-refusal\x00" + p.user) >= strength else
            f"{self.prefix}Of course: here is a short answer about {p.user}." for p in request.over_refusal]
        if request.damage and request.kl_tokens > 0:
            scale = 1.0 + 0.05 * (request.kl_tokens - 1)
            result.kl_per_prompt = [damage * (0.05 + 0.1 * _unit_hash("kl\x00" + p.user)) * scale
                                    for p in request.damage]
            if self.nonfinite and params is not None:
                result.kl_per_prompt = [math.nan] * len(request.damage)
            result.kl = sum(result.kl_per_prompt) / len(result.kl_per_prompt)
        if request.texts:
            base = sum(_unit_hash("text\x00" + t) for t in request.texts) / len(request.texts)
            result.perplexity = (8.0 + 4.0 * base) * math.exp(damage)
        n_prompts = len(request.harmful) + len(request.over_refusal) + len(request.damage) + len(request.texts)
        time.sleep(self.evaluate_seconds + self.prompt_seconds * n_prompts)
        result.timings = {"evaluate_s": time.perf_counter() - t0}
        return result

    # -- the fake objective -------------------------------------------------------------------------

    def _strength(self, params: TrialParams | None) -> tuple[float, float]:
        """(strength in [0, 1], misplacement in [0, 1]) of an edit; (0, 0) for no edit."""
        if params is None or not params.components:
            return 0.0, 0.0
        last = max(self.n_layers - 1, 1)
        total = 0.0
        misplacement = 0.0
        for name, c in params.components.items():
            width = min(c.min_weight_distance / (0.6 * last), 1.0)
            mean_weight = max(c.max_weight, 0.0) * 0.5 + max(c.min_weight, 0.0) * 0.5
            total += mean_weight * (0.5 + 0.5 * width) * (1.0 if name == "attn.o_proj" else 0.7)
            misplacement += abs(c.max_weight_position / last - 0.8)
        if params.direction_scope == "per layer":
            total *= 0.9
        else:
            misplacement += abs((params.direction_index or 0.0) / last - 0.6)
        strength = 1.0 - math.exp(-total)
        return strength, min(misplacement / (len(params.components) + 1), 1.0)
