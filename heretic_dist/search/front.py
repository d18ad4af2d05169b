"""The results vocabulary, one definition each: trial rows, the Pareto front, the best point.

Every command that shows a front (`run`, `status`, `report`, `batch-status`) calls `pareto_front` here,
so they all show the same trials for the same run:
- the front is over the raw scores (refusals, KL), both minimized, of COMPLETE trials;
- a trial is on it when no other trial is at least as good in both and better in one;
- equal points (same refusals and same KL) count once: the earliest trial that reached them;
- it is sorted by refusals ascending (so KL descending), then trial number.

`pareto.parquet` holds the optimizer's own front (`study.best_trials`, over the objective values the
search minimizes); it differs from this one only where upstream's KL-target rule ties low-KL trials.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, TypeVar

KL_THRESHOLD = 0.05  # "best point": fewest refusals among front trials with KL <= this

T = TypeVar("T")
Point = tuple[int, float, int]  # refusals, KL, trial number


def row_point(row: dict[str, Any]) -> Point | None:
    """(refusals, KL, number) of a COMPLETE trial row with finite scores, else None."""
    if row.get("state") != "COMPLETE":
        return None
    refusals, kl = row.get("refusals"), row.get("kl")
    if refusals is None or kl is None or isinstance(refusals, bool):
        return None
    try:
        refusals, kl = int(refusals), float(kl)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(kl):
        return None
    return refusals, kl, int(row.get("number", -1))


def pareto_front(items: Iterable[T], point: Callable[[T], Point | None] = row_point) -> list[T]:  # type: ignore[assignment]
    """The non-dominated items over (refusals, KL); see the module docstring for ties and order."""
    scored = sorted(((p, item) for item in items if (p := point(item)) is not None), key=lambda x: x[0])
    front: list[T] = []
    best_kl = math.inf  # lowest KL among items with fewer refusals, or equal refusals seen earlier
    for (refusals, kl, _), item in scored:
        # sorted by (refusals, KL, number): an item is dominated iff an earlier one has KL <= its KL
        if kl < best_kl:
            front.append(item)
            best_kl = kl
    return front


def best_point(front: list[T], point: Callable[[T], Point | None] = row_point) -> T | None:  # type: ignore[assignment]
    """The front item to suggest: fewest refusals at KL <= KL_THRESHOLD, else the lowest KL."""
    scored = [(p, item) for item in front if (p := point(item)) is not None]
    if not scored:
        return None
    within = [(p, item) for p, item in scored if p[1] <= KL_THRESHOLD]
    if within:
        return min(within, key=lambda x: x[0])[1]
    return min(scored, key=lambda x: (x[0][1], x[0][0], x[0][2]))[1]


def trial_rows(study: Any, n_bad: int) -> list[dict[str, Any]]:
    """One row per trial, in trial order: parameters, raw scores, objectives, workers, timings."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        complete = t.state.name == "COMPLETE"
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "refusals": a.get("refusals") if complete else None,
            "n_bad_prompts": a.get("bad_scored", n_bad),
            "kl": a.get("kl") if complete else None,
            "refusals_score": t.values[0] if complete else None,
            "kl_score": t.values[1] if complete else None,
            "params": dict(t.params),
            "decoded": a.get("params"),
            "worker_ids": a.get("worker_ids"),
            "hosts": a.get("hosts"),
            "timings": a.get("timings"),
            "attempts": a.get("attempts"),
            "started": t.datetime_start.isoformat() if t.datetime_start else None,
            "completed": t.datetime_complete.isoformat() if t.datetime_complete else None,
            "duration_s": a.get("trial_seconds"),
            "fail_reason": a.get("fail_reason"),
        })
    return rows


def mark_fronts(rows: list[dict[str, Any]], study: Any) -> list[dict[str, Any]]:
    """Flag each row: `pareto` (on the optimizer's front, study.best_trials) and `raw_pareto` (on the
    front shown to people, `pareto_front`)."""
    best = {t.number for t in study.best_trials}
    raw = {r["number"] for r in pareto_front(rows)}
    for r in rows:
        r["pareto"] = r["number"] in best
        r["raw_pareto"] = r["number"] in raw
    return rows


def front_table(front: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The cells people see for each front row (the CLI and batch-status render them)."""
    cells = []
    for r in front:
        d = r.get("decoded") or {}
        index = d.get("direction_index")
        cells.append({
            "trial": str(r["number"]),
            "refusals": f"{r['refusals']}/{r.get('n_bad_prompts', '?')}",
            "KL": f"{r['kl']:.4f}",
            "scope": str(d.get("direction_scope", "?")),
            "index": "-" if index is None else f"{index:.2f}",
        })
    return cells


def nearest_best(front: list[T], k: int, point: Callable[[T], Point | None] = row_point) -> list[T]:  # type: ignore[assignment]
    """The k front items nearest the best point along the front (the best point first, then its
    neighbours, the one with fewer refusals first on a tie), returned in front order."""
    best = best_point(front, point)
    if best is None or k >= len(front):
        return list(front)
    at = front.index(best)
    chosen = sorted(range(len(front)), key=lambda i: (abs(i - at), i))[:k]
    return [front[i] for i in sorted(chosen)]
