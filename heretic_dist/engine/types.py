"""Plain data the engine takes and returns (all picklable, no tensors).

The search's own data (TrialParams, Shard, PartialResult) is defined in heretic_dist/search/, which
imports no torch, so that Tune trial processes and reports stay light; it is named here for the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from heretic_dist.search.objectives import PartialResult, Shard
from heretic_dist.search.space import COMPONENTS, ComponentParams, TrialParams

__all__ = ["COMPONENTS", "ComponentParams", "EvaluationRequest", "EvaluationResult", "PartialResult", "Prompt", "Shard",
           "TrialParams"]


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str


@dataclass(frozen=True)
class EvaluationRequest:
    """What `evaluate-front` asks a worker to measure for one candidate (params, or None = base model).

    Empty lists switch a measure off. `key` names the prompt sets and lengths, so a worker can keep the
    base model's references (its greedy replies to `damage`, their log-probs) across candidates.
    """

    key: str
    harmful: list[Prompt] = field(default_factory=list)  # replies returned, judged on the driver
    over_refusal: list[Prompt] = field(default_factory=list)  # replies returned, judged on the driver
    damage: list[Prompt] = field(default_factory=list)  # multi-token KL against the base model
    texts: list[str] = field(default_factory=list)  # perplexity (raw text, no chat template)
    max_response_length: int = 150
    kl_tokens: int = 20


@dataclass
class EvaluationResult:
    """A worker's measurements of one candidate; replies in request order (special tokens removed)."""

    harmful_replies: list[str] = field(default_factory=list)
    over_refusal_replies: list[str] = field(default_factory=list)
    kl: float | None = None  # mean over damage prompts of the mean KL over the first kl_tokens positions
    kl_per_prompt: list[float] = field(default_factory=list)
    perplexity: float | None = None  # exp(mean token NLL over all texts)
    timings: dict[str, float] = field(default_factory=dict)
    host: str = ""


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes one rank of a model replica needs on its GPUs (engine/sizing.py estimates them).

    `weights`: the rank's share of the parameters at their load dtype; `kv_cache`: the KV cache of the
    largest batch the engine runs; `overhead`: LoRA adapters and the CUDA context of the process.
    Activations are what `cluster.memory_headroom` keeps free.
    """

    label: str  # e.g. "Qwen2.5-72B-Instruct bf16": the model and how it is loaded
    weights: int
    kv_cache: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead
