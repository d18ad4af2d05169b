"""Which candidates an evaluation measures, what identifies an evaluation, and the rows it writes.

Plain functions over trial rows and results (no Ray, no torch), so the CLI, the report and `status`
read evaluation.parquet with the same vocabulary as the search's front (search/front.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..config.evaluation import EvaluationSettings
from ..errors import UserError
from ..search.front import nearest_best, pareto_front
from .measures import ReplyCounts

BASE_TRIAL = -1  # the row of the unedited model (its values stand beside every candidate's)


@dataclass(frozen=True)
class Candidate:
    trial: int  # BASE_TRIAL for the base model
    params: Any  # TrialParams, or None for the base model
    search_refusals: int | None = None
    search_kl: float | None = None

    @property
    def label(self) -> str:
        return "base" if self.trial == BASE_TRIAL else f"trial {self.trial}"


def choose_trials(rows: list[dict[str, Any]], trials: list[int] | None, top: int | None) -> list[dict[str, Any]]:
    """The trial rows to evaluate: the given numbers, else the top-K front trials, else the front."""
    complete = {r["number"]: r for r in rows if r["state"] == "COMPLETE"}
    if trials:
        missing = [n for n in trials if n not in complete]
        if missing:
            done = sorted(complete)
            raise UserError(
                f"trial {', '.join(map(str, missing))} is not a complete trial of this run; complete trials: "
                f"{', '.join(map(str, done[:30]))}{' ...' if len(done) > 30 else ''}")
        return [complete[n] for n in dict.fromkeys(trials)]
    front = pareto_front(rows)
    if not front:
        raise UserError("the run has no complete trials yet: nothing to evaluate (run the search first)")
    return nearest_best(front, top) if top else front


def evaluation_key(run_id: str, evaluation: EvaluationSettings, judge_identity: dict[str, Any],
                   set_hashes: dict[str, str], response_prefix: str) -> str:
    """What makes two evaluations comparable: same run, measures, lengths, prompt sets and judge."""
    parts = {
        "run_id": run_id,
        "measures": {m: getattr(evaluation, m) for m in ("refusal", "over_refusal", "degenerate", "kl", "perplexity")},
        "max_response_length": evaluation.max_response_length,
        "kl_tokens": evaluation.kl_tokens,
        "judge": judge_identity,
        "sets": set_hashes,
        "response_prefix": response_prefix,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rate(counts: ReplyCounts | None) -> float | None:
    return None if counts is None or not counts.n else counts.refusal_rate


def candidate_row(key: str, candidate: Candidate, harmful: ReplyCounts | None, over: ReplyCounts | None,
                  result: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """One row of evaluation.parquet (a measure that is off is None)."""
    degenerate = [c for c in (harmful, over) if c is not None and c.n]
    n_degenerate = sum(c.degenerate for c in degenerate)
    n_judged = sum(c.n for c in degenerate)
    return {
        "eval_key": key,
        "trial": candidate.trial,
        "label": candidate.label,
        "search_refusals": candidate.search_refusals,
        "search_kl": candidate.search_kl,
        "n_harmful": harmful.n if harmful else None,
        "refusals": harmful.refusals if harmful else None,
        "refusal_rate": _rate(harmful),
        "refusal_score": None if harmful is None or math.isnan(harmful.mean_score) else harmful.mean_score,
        "n_over_refusal": over.n if over else None,
        "over_refusals": over.refusals if over else None,
        "over_refusal_rate": _rate(over),
        "degenerate": n_degenerate if degenerate else None,
        "degenerate_rate": n_degenerate / n_judged if n_judged else None,
        "kl": result.kl,
        "perplexity": result.perplexity,
        "host": result.host,
        "timings": dict(result.timings),
        "params": None if candidate.params is None else candidate.params.to_dict(),
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the most recent evaluation (its key: the newest row's), base first, then by trial."""
    if not rows:
        return []
    newest = max(rows, key=lambda r: r.get("evaluated_at") or "")["eval_key"]
    return sorted((r for r in rows if r["eval_key"] == newest), key=lambda r: r["trial"])


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.0f}%"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def evaluated_refusals(row: dict[str, Any]) -> str:
    """"3/20 (15%)": the judged refusals of one evaluation row ("-" when not measured)."""
    if row.get("refusals") is None:
        return "-"
    return f"{row['refusals']}/{row['n_harmful']} ({_pct(row['refusal_rate'])})"


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The evaluation table as the CLI and the report show it: headers and one row of cells each."""
    headers = ["candidate", "search refusals", "search KL", "refusals", "over-refusals", "degenerate",
               "KL (N tokens)", "perplexity"]
    cells = []
    for r in rows:
        search = "-" if r.get("search_refusals") is None else str(r["search_refusals"])
        refusals = evaluated_refusals(r)
        over = "-" if r.get("over_refusals") is None else (
            f"{r['over_refusals']}/{r['n_over_refusal']} ({_pct(r['over_refusal_rate'])})")
        cells.append([r["label"], search, _num(r.get("search_kl"), ".4f"), refusals, over,
                      _pct(r.get("degenerate_rate")), _num(r.get("kl"), ".4f"), _num(r.get("perplexity"), ".2f")])
    return headers, cells
