"""Plain data passed between the driver, the workers and the engine (all picklable, no tensors)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # Tune trial processes import this module; they need no torch
    import torch

COMPONENTS = ("attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str


@dataclass(frozen=True)
class ComponentParams:
    """Tent kernel over layers for one component. min_weight is absolute (fraction x max already applied)."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float


@dataclass(frozen=True)
class TrialParams:
    """A decoded point of the search space. direction_index is None for the `per layer` scope."""

    direction_scope: str
    direction_index: float | None
    components: dict[str, ComponentParams]

    def to_dict(self) -> dict[str, Any]:
        return {
            "direction_scope": self.direction_scope,
            "direction_index": self.direction_index,
            "components": {k: asdict(v) for k, v in self.components.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialParams:
        return cls(
            direction_scope=d["direction_scope"],
            direction_index=d["direction_index"],
            components={k: ComponentParams(**v) for k, v in d["components"].items()},
        )


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: a contiguous slice of a prompt list."""

    index: int = 0
    count: int = 1

    def take(self, items: list) -> list:
        n = len(items)
        return items[self.index * n // self.count : (self.index + 1) * n // self.count]


@dataclass
class PartialResult:
    """One worker's part of a trial. The reducer sums these over shards."""

    refusals: int
    bad_scored: int
    kl_sum: float
    good_scored: int
    timings: dict[str, float] = field(default_factory=dict)  # edit_s, kl_s, generation_s
    worker_id: str = ""
    host: str = ""


class TrialEngine(Protocol):
    """What a ModelWorker needs from an engine (the real one or a fake for tests)."""

    def info(self) -> dict[str, Any]: ...  # n_layers, components, dtype, device, load_seconds

    def responses(self, prompts: list[Prompt], skip_special_tokens: bool = False) -> list[str]: ...

    def prefix_replies(self, prompts: list[Prompt]) -> list[str]: ...

    def set_response_prefix(self, prefix: str) -> None: ...

    def residual_sums(self, prompts: list[Prompt]) -> tuple["torch.Tensor", int]: ...

    def set_directions(self, directions: "torch.Tensor") -> None: ...

    def set_eval_prompts(self, good: list[Prompt], bad: list[Prompt]) -> None: ...

    def run_trial(self, params: TrialParams | None, shard: Shard) -> PartialResult: ...
