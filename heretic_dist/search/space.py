"""The parameter schema of the search (upstream Heretic 1.4.0 names): suggest, decode, layer kernel.

Pure Python: the Tune trial processes, the report and the engine all import it (no torch, no Optuna
at import time; `suggest_params` takes any object with Optuna's `suggest_*` methods).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

COMPONENTS = ("attn.o_proj", "mlp.down_proj")


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


def suggest_params(
    trial: optuna.Trial,
    n_layers: int,
    allow_mlp_off: bool = False,
    components: list[str] | tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Define-by-run space of upstream Heretic 1.4.0: same names, ranges and order of suggestions."""
    last = n_layers - 1
    values: dict[str, Any] = {}
    values["direction_scope"] = trial.suggest_categorical("direction_scope", ["global", "per layer"])
    # Always sampled (multivariate TPE needs a fixed set of parameters); ignored for "per layer".
    values["direction_index"] = trial.suggest_float("direction_index", 0.4 * last, 0.9 * last)
    present = set(COMPONENTS if components is None else components)
    for c in sorted(present & set(COMPONENTS)):
        low = -0.25 if (allow_mlp_off and c == "mlp.down_proj") else 0.8
        values[f"{c}.max_weight"] = trial.suggest_float(f"{c}.max_weight", low, 1.5)
        values[f"{c}.max_weight_position"] = trial.suggest_float(f"{c}.max_weight_position", 0.6 * last, 1.0 * last)
        values[f"{c}.min_weight"] = trial.suggest_float(f"{c}.min_weight", 0.0, 1.0)
        values[f"{c}.min_weight_distance"] = trial.suggest_float(f"{c}.min_weight_distance", 1.0, 0.6 * last)
    return values


@dataclass(frozen=True)
class SearchSpace:
    """The define-by-run space as a picklable callable over an Optuna trial."""

    n_layers: int
    allow_mlp_off: bool = False
    components: tuple[str, ...] | None = None

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        return suggest_params(trial, self.n_layers, self.allow_mlp_off, self.components)


def decode_trial_params(raw: dict[str, Any], n_layers: int, allow_mlp_off: bool = False) -> TrialParams:
    """Turn sampled search-space values (upstream Heretic's parameter names) into TrialParams."""
    scope = raw["direction_scope"]
    if scope not in ("global", "per layer"):
        raise ValueError(f"unknown direction_scope {scope!r}")
    components = {}
    for name in COMPONENTS:
        if f"{name}.max_weight" not in raw:
            continue
        max_weight = float(raw[f"{name}.max_weight"])
        if allow_mlp_off and name == "mlp.down_proj":
            max_weight = max(max_weight, 0.0)
        components[name] = ComponentParams(
            max_weight=max_weight,
            max_weight_position=float(raw[f"{name}.max_weight_position"]),
            min_weight=float(raw[f"{name}.min_weight"]) * max_weight,
            min_weight_distance=float(raw[f"{name}.min_weight_distance"]),
        )
    index = None if scope == "per layer" else float(raw["direction_index"])
    return TrialParams(direction_scope=scope, direction_index=index, components=components)


def layer_weight(layer: int, params: ComponentParams) -> float:
    """Tent kernel over layers: 0.0 means the layer is not edited."""
    distance = abs(layer - params.max_weight_position)
    if distance > params.min_weight_distance:
        return 0.0
    return params.max_weight + (distance / params.min_weight_distance) * (
        params.min_weight - params.max_weight
    )
