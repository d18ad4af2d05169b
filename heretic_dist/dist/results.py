"""Trial records from the Optuna study (the source of truth) and the Pareto front over raw scores."""

from __future__ import annotations

from typing import Any


def trial_rows(study, n_bad: int) -> list[dict[str, Any]]:
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


def mark_fronts(rows: list[dict[str, Any]], study) -> list[dict[str, Any]]:
    """Flag each row: on the optimizer's front (study.best_trials, over the objective values the
    search minimizes) and on the raw (refusals, KL) front shown to people. They differ only where
    upstream's KL-target rule ties low-KL trials; pareto.parquet holds the optimizer's front."""
    best = {t.number for t in study.best_trials}
    raw = {r["number"] for r in pareto_rows(rows)}
    for r in rows:
        r["pareto"] = r["number"] in best
        r["raw_pareto"] = r["number"] in raw
    return rows


def pareto_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Complete trials not dominated in raw (refusals, KL), fewest refusals first."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    front = []
    for r in done:
        dominated = any(
            o["refusals"] <= r["refusals"] and o["kl"] <= r["kl"]
            and (o["refusals"] < r["refusals"] or o["kl"] < r["kl"])
            for o in done
        )
        if not dominated:
            front.append(r)
    front.sort(key=lambda r: (r["refusals"], r["kl"], r["number"]))
    # equal points: keep the first trial that reached them
    unique, seen = [], set()
    for r in front:
        key = (r["refusals"], r["kl"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def pareto_table(front: list[dict[str, Any]], base_refusals: int, n_bad: int) -> str:
    lines = [f"Pareto front (base model: {base_refusals}/{n_bad} refusals, KL 0)",
             f"{'trial':>6}  {'refusals':>9}  {'KL':>8}  scope       index"]
    for r in front:
        d = r.get("decoded") or {}
        index = d.get("direction_index")
        lines.append(f"{r['number']:>6}  {r['refusals']:>4}/{r['n_bad_prompts']:<4}  {r['kl']:>8.4f}  "
                     f"{d.get('direction_scope', '?'):<10}  {'-' if index is None else f'{index:.2f}'}")
    return "\n".join(lines)
