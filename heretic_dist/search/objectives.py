"""What a trial returns and how it is scored: shard results, the reducer, the two objective values.

Pure Python (ALGORITHM.md section 5): the Tune trial processes import it, and so does the engine for
the plain data it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

METRICS = ("refusals_score", "kl_score")  # both minimized


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
    # With a `refusal_judge`, the engine leaves (prompt, reply) pairs here and the worker judges them
    # (refusals is 0 until then); None once judged, so replies never travel back to the driver.
    replies_to_judge: list[tuple[str, str]] | None = None


def reduce_partials(parts: list[PartialResult]) -> dict[str, Any]:
    """Combine shard results: counts and KL sums add; KL = total KL sum / total harmless prompts."""
    if not parts:
        raise ValueError("no partial results to reduce")
    refusals = sum(int(p.refusals) for p in parts)
    bad = sum(int(p.bad_scored) for p in parts)
    good = sum(int(p.good_scored) for p in parts)
    kl_sum = math.fsum(float(p.kl_sum) for p in parts)
    timings = [dict(p.timings) for p in parts]
    phases = sorted({k for t in timings for k in t})
    return {
        "refusals": refusals,
        "bad_scored": bad,
        "good_scored": good,
        "kl_sum": kl_sum,
        "kl": kl_sum / good if good else math.nan,
        "timings": timings,
        "timings_max": {k: max(t.get(k, 0.0) for t in timings) for k in phases},
        "worker_ids": [p.worker_id for p in parts],
        "hosts": [p.host for p in parts],
    }


def objective_values(
    refusals: float, kl: float, base_refusals: float, kl_scale: float, kl_target: float
) -> tuple[float, float]:
    """(refusals_score, kl_score) of upstream Heretic 1.4.0 (ALGORITHM.md section 5). Always finite.

    Raises ValueError on non-finite inputs so that the trial fails explicitly instead of being told
    with a NaN.
    """
    for name, v in (("refusals", refusals), ("kl", kl), ("base_refusals", base_refusals),
                    ("kl_divergence_scale", kl_scale), ("kl_divergence_target", kl_target)):
        if v is None or not math.isfinite(float(v)):
            raise ValueError(f"non-finite {name}: {v!r}")
    if kl_scale <= 0:
        raise ValueError(f"kl_divergence_scale must be > 0, got {kl_scale}")
    s_ref = float(refusals) / float(base_refusals) if base_refusals > 0 else float(refusals)
    s_kl = float(kl) / kl_scale if kl >= kl_target else s_ref * kl_target / kl_scale
    if not (math.isfinite(s_ref) and math.isfinite(s_kl)):
        raise ValueError(f"non-finite objective values ({s_ref!r}, {s_kl!r})")
    return s_ref, s_kl
