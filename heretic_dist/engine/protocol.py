"""TrialEngine: everything a model worker calls on an engine, and the registry of engines by name.

`distributed/` reaches engines only through this module: a worker is given an engine *name* from the
settings (`engine = "hf"`), looks its class up here and calls the methods below, nothing else. Tests
and the Ray-side benchmarks use `engine = "fake"` (heretic_dist/testing/fake.py), configured through
`engine_options` like any other setting, so it travels in the manifest like the real engine does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from heretic_dist.errors import UserError

from .types import EvaluationRequest, EvaluationResult, MemoryNeed, PartialResult, Prompt, Shard, TrialParams

if TYPE_CHECKING:  # the registry is imported by Tune trial processes and the driver: no torch there
    import torch

    from heretic_dist.config import Settings


@runtime_checkable
class TrialEngine(Protocol):
    """One loaded model (or a stand-in) that scores trials. Constructed as `cls(settings)`."""

    @classmethod
    def model_identity(cls, settings: Settings) -> dict[str, str]:
        """What identifies the weights, for the run manifest (read on the driver: no model load)."""
        ...

    def info(self) -> dict[str, Any]:
        """n_layers, components, dtype, device, load_seconds."""
        ...

    def responses(self, prompts: list[Prompt], skip_special_tokens: bool = False) -> list[str]: ...

    def prefix_replies(self, prompts: list[Prompt]) -> list[str]: ...

    def set_response_prefix(self, prefix: str) -> None: ...

    def residual_sums(self, prompts: list[Prompt]) -> tuple[torch.Tensor, int]: ...

    def residuals(self, prompts: list[Prompt]) -> torch.Tensor:
        """First-token residuals per prompt, (n, L+2, d) float32 (research mode)."""
        ...

    def set_directions(self, directions: torch.Tensor) -> None: ...

    def set_eval_prompts(self, good: list[Prompt], bad: list[Prompt]) -> None: ...

    def warm_baselines(self, shards: list[Shard]) -> None:
        """Compute what the unedited model gives on these shards, once, before any trial."""
        ...

    def run_trial(self, params: TrialParams | None, shard: Shard) -> PartialResult: ...

    def run_trials(self, items: list[tuple[TrialParams | None, Shard]]) -> list[PartialResult]:
        """Score several trials (params, or None = the unedited model, each on its own shard) together,
        in one batched pass; a worker calls it only with cluster.trials_per_worker = K > 1, with 2..K
        items. Each result, in item order, is what run_trial(params, shard) gives that item alone
        (refusals equal, kl_sum up to the last bits a different batch changes); timings may split the
        shared pass among the items and say so (key "batched_with": the number of items). More items
        than K raise ValueError."""
        ...

    def evaluate(self, params: TrialParams | None, request: EvaluationRequest) -> EvaluationResult:
        """evaluate-front's measures of one candidate (None = the unedited model): long replies,
        multi-token KL against the base model, perplexity (engine/evaluation.py)."""
        ...


# name -> "module:Class"; imported only when used, so naming an engine costs nothing
ENGINES: dict[str, str] = {
    "hf": "heretic_dist.engine.engine:Engine",
    "fake": "heretic_dist.testing.fake:FakeEngine",
}


def engine_names() -> list[str]:
    return sorted(ENGINES)


def engine_class(name: str) -> type[TrialEngine]:
    """The engine class registered under `name`; a UserError naming the choices otherwise."""
    path = ENGINES.get(name)
    if path is None:
        raise UserError(f"unknown engine {name!r}: choose one of {', '.join(engine_names())}")
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def memory_need(settings: Settings, prompt_tokens: int, response_tokens: int) -> MemoryNeed:
    """GPU memory of one rank of a replica of the configured engine, without loading it (read on the
    driver for gpus_per_worker = "auto"). An engine class may answer with its own classmethod
    `memory_need(settings, prompt_tokens, response_tokens)`; else the model's config is sized
    (engine/sizing.py: weights, KV cache, overhead)."""
    own = getattr(engine_class(settings.engine), "memory_need", None)
    if own is not None:
        return own(settings, prompt_tokens, response_tokens)
    from .sizing import memory_need_for

    return memory_need_for(settings, prompt_tokens, response_tokens)


def describe_edited(edited: dict[str, Any] | None) -> list[str]:
    """Lines saying which modules take the edit per layer (from an engine's info()["edited"])."""
    if not edited or not edited.get("per_layer"):
        return []
    labels = (("attention", "attention"), ("dense_mlp", "dense MLP"), ("shared_experts", "shared experts"),
              ("routed_experts", "routed experts"))
    groups: list[tuple[int, int, dict[str, int]]] = []  # runs of identical layers
    for i, row in enumerate(edited["per_layer"]):
        if groups and groups[-1][2] == row:
            groups[-1] = (groups[-1][0], i, row)
        else:
            groups.append((i, i, row))
    lines = []
    for first, last, row in groups:
        where = f"layer {first}" if first == last else f"layers {first}-{last}"
        lines.append(f"edits, {where}: " + ", ".join(f"{label} {row.get(key, 0)}" for key, label in labels))
    if edited.get("fused_expert_modules"):
        lines.append(f"routed experts: {edited['totals'].get('routed_experts', 0)} in "
                     f"{edited['fused_expert_modules']} fused expert modules ({', '.join(edited['fused_layout'])}), "
                     "edited on the forward path")
    if edited.get("mlp_skipped"):
        lines.append("MLP not edited (attention_only = true)")
    if edited.get("not_edited"):
        lines.append(f"NOT edited (cannot take the edit): {'; '.join(edited['not_edited'])}")
    return lines


# -- engine-side math the driver runs between worker calls ---------------------------------------------


def directions_from_sums(good_sum: torch.Tensor, good_count: int, bad_sum: torch.Tensor, bad_count: int,
                         orthogonalize: bool) -> torch.Tensor:
    """The refusal direction per layer from residual sums map-reduced over workers (engine/ablation.py)."""
    from .ablation import directions_from_sums as compute

    return compute(good_sum, good_count, bad_sum, bad_count, orthogonalize)


def detect_response_prefix(generate: Any, chain_of_thought_skips: list[tuple[str, str]]) -> str:
    """Upstream's response-prefix rule over replies that `generate(prefix)` returns (engine/passes.py)."""
    from .passes import detect_response_prefix as detect

    return detect(generate, chain_of_thought_skips)
