"""Plain data the engine takes and returns (all picklable, no tensors).

The search's own data (TrialParams, Shard, PartialResult) is defined in heretic_dist/search/, which
imports no torch, so that Tune trial processes and reports stay light; it is named here for the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from heretic_dist.search.objectives import PartialResult, Shard
from heretic_dist.search.space import COMPONENTS, ComponentParams, TrialParams

__all__ = ["COMPONENTS", "ComponentParams", "PartialResult", "Prompt", "Shard", "TrialParams"]


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str
