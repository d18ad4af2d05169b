"""A run directory read for reporting: the manifest, run_info.json and one Trial per trials.parquet row.

The front and the best point come from `heretic_dist.search.front`, the one definition every command
uses; the front is recomputed from trials.parquet, so a report of a run stopped mid-way is correct.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from heretic_dist.errors import UserError
from heretic_dist.rundir import MANIFEST, TRIALS, RunDir
from heretic_dist.rundir.records import read_run_info
from heretic_dist.search import front as results


@dataclass
class Trial:
    """One row of trials.parquet, with the fields the report uses parsed out of `row`."""

    number: int
    state: str
    refusals: int | None
    kl: float | None
    n_bad: int
    decoded: dict[str, Any] | None
    duration_s: float | None
    fail_reason: str | None
    row: dict[str, Any]

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE" and self.refusals is not None and self.kl is not None


def trial_point(trial: Trial) -> results.Point | None:
    """A Trial as the front functions of search/front.py see it."""
    if not trial.complete:
        return None
    assert trial.refusals is not None and trial.kl is not None
    return trial.refusals, trial.kl, trial.number


@dataclass
class RunData:
    uri: str
    manifest: dict[str, Any]
    info: dict[str, Any]  # run_info.json, {} when the driver has not written it yet
    trials: list[Trial]
    complete: list[Trial] = field(default_factory=list)
    pareto: list[Trial] = field(default_factory=list)  # sorted by refusals, then KL

    @property
    def n_bad(self) -> int:
        n = self.manifest.get("n_bad_prompts")
        if isinstance(n, int) and n > 0:
            return n
        return max((t.n_bad for t in self.trials), default=0)

    @property
    def base_refusals(self) -> int | None:
        value = self.manifest.get("base_refusals")
        return int(value) if isinstance(value, (int, float)) else None

    @property
    def n_trials(self) -> int | None:
        """Trials the run was asked for. Only run_info.json has it: n_trials is a runtime setting,
        deliberately not in the manifest (changing it must not change the run id)."""
        value = self.info.get("n_trials")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    @property
    def model_name(self) -> str:
        settings = self.manifest.get("settings") or {}
        model = self.manifest.get("model")
        if isinstance(settings.get("model"), str) and settings["model"]:
            return settings["model"]
        if isinstance(model, str):
            return model
        if isinstance(model, dict):
            for key in ("name", "id", "name_or_path", "path", "model"):
                if isinstance(model.get(key), str) and model[key]:
                    return model[key]
        return "unknown model"

    @property
    def failed(self) -> list[Trial]:
        return [t for t in self.trials if t.state == "FAIL"]

    @property
    def running(self) -> list[Trial]:
        return [t for t in self.trials if t.state not in ("COMPLETE", "FAIL")]

    @property
    def best(self) -> Trial | None:
        """The front trial to suggest (search/front.py's rule)."""
        return results.best_point(self.pareto, point=trial_point)

    def by_number(self, number: int) -> Trial | None:
        return next((t for t in self.complete if t.number == number), None)


def finite(value: Any) -> float | None:
    """A finite float, or None for missing, boolean, non-numeric, NaN and infinite values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _trial(row: dict[str, Any], default_n_bad: int) -> Trial:
    refusals = finite(row.get("refusals"))
    n_bad = finite(row.get("n_bad_prompts"))
    decoded = row.get("decoded")
    return Trial(
        number=int(row.get("number", -1)),
        state=str(row.get("state") or "UNKNOWN").upper(),
        refusals=None if refusals is None else int(refusals),
        kl=finite(row.get("kl")),
        n_bad=int(n_bad) if n_bad else default_n_bad,
        decoded=decoded if isinstance(decoded, dict) else None,
        duration_s=finite(row.get("duration_s")),
        fail_reason=row.get("fail_reason"),
        row=row,
    )


def pareto_front(items: Iterable[Trial | dict[str, Any]]) -> list[Any]:
    """search/front.py's Pareto front over report Trials or trials.parquet rows (either, or mixed)."""

    def point(item: Trial | dict[str, Any]) -> results.Point | None:
        return trial_point(item) if isinstance(item, Trial) else results.row_point(item)

    return results.pareto_front(items, point=point)


def choose_trial(run: RunData, number: int | None = None) -> Trial | None:
    """The trial whose kernel is drawn: `number` if given, else the run's best point."""
    if number is None:
        return run.best
    trial = run.by_number(number)
    if trial is None:
        raise UserError(f"trial {number} is not a complete trial of {run.uri}")
    return trial


def _check_folder(run: RunDir) -> None:
    if run.is_local:
        assert run.local_path is not None
        if not run.local_path.exists():
            raise UserError(f"run directory {run.uri} does not exist")
        if not run.local_path.is_dir():
            raise UserError(f"run directory {run.uri} is a file, not a folder")
    if not run.exists(TRIALS):
        hint = "" if run.exists(MANIFEST) else " (and no manifest.json: is this a heretic-dist run directory?)"
        raise UserError(f"no {TRIALS} in {run.uri}: no trial has finished yet, nothing to report{hint}")
    if not run.exists(MANIFEST):
        raise UserError(f"no {MANIFEST} in {run.uri}: not a complete heretic-dist run directory")


def _read_rows(run: RunDir) -> list[dict[str, Any]]:
    try:
        return run.read_parquet(TRIALS)
    except UserError:
        raise
    except Exception as exc:  # a truncated or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{TRIALS} in {run.uri} cannot be read: {first}") from None


def load_run(run_uri: str | os.PathLike[str]) -> RunData:
    """Read a run directory; one-line UserErrors for what is missing."""
    run = RunDir(str(run_uri))
    _check_folder(run)
    manifest = run.read_json(MANIFEST)
    if not isinstance(manifest, dict):
        raise UserError(f"{MANIFEST} in {run.uri} is not a JSON object")
    info = read_run_info(run)
    n_bad = manifest.get("n_bad_prompts") if isinstance(manifest.get("n_bad_prompts"), int) else 0
    trials = sorted((_trial(r, n_bad) for r in _read_rows(run)), key=lambda t: t.number)
    data = RunData(uri=run.uri, manifest=manifest, info=info, trials=trials)
    data.complete = [t for t in trials if t.complete]
    data.pareto = results.pareto_front(data.complete, point=trial_point)
    return data
