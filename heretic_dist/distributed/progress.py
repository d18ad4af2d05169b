"""What the driver says while the search runs: one update per told trial, and the journal upload."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from optuna.trial import FrozenTrial, TrialState

from ..errors import UserError
from ..search.front import Point, best_point, pareto_front

log = logging.getLogger("heretic_dist")


@dataclass(frozen=True)
class TrialUpdate:
    """One told trial, with the run's progress at that moment (what a progress display shows)."""

    number: int
    complete: bool
    refusals: int | None
    kl: float | None
    seconds: float
    reason: str | None
    done: int  # COMPLETE trials in the study now
    n_trials: int
    n_bad: int
    eta_s: float | None
    best: Point | None  # (refusals, KL, trial) of the best point so far (search/front.py's rule)
    busy_workers: int | None
    workers: int | None  # loaded (ready) workers
    pending_workers: int | None = None  # workers still starting: elastic ones, replacements

    def line(self) -> str:
        """The plain progress line (logs, CI, `ray job logs`)."""
        if not self.complete:
            return f"trial {self.number}: FAILED: {self.reason or 'unknown reason'}"
        eta = "" if self.eta_s is None else f"; ETA {self.eta_s / 60:.1f} min"
        pool = f"; workers {self.workers} ready, {self.pending_workers} pending" if self.pending_workers else ""
        return (f"[{self.done}/{self.n_trials}] trial {self.number}: refusals {self.refusals}/{self.n_bad}, "
                f"KL {self.kl or 0.0:.4f}, {self.seconds:.1f} s{eta}{pool}")


class Progress:
    """Called after each tell: uploads the journal, then reports a TrialUpdate. With `say`, the pool's
    new notices (a replacement that waits for a node) are said first, one line each; `on_pool` is called
    with the pool's stats when its ready or pending workers change (run_info.json for `status`)."""

    def __init__(self, n_trials: int, complete: int, n_bad: int, run_dir: Any,
                 report: Callable[[TrialUpdate], None], pool_stats: Callable[[], dict[str, Any]] | None = None,
                 points: list[Point] | None = None, say: Callable[[str], None] | None = None,
                 on_pool: Callable[[dict[str, Any]], None] | None = None):
        self.n_trials, self.complete, self.n_bad, self.run_dir = n_trials, complete, n_bad, run_dir
        self.report, self.pool_stats, self.say, self.on_pool = report, pool_stats, say, on_pool
        self.notices_said = 0
        self._said = threading.Lock()  # tells (study thread) and PoolWatch (Tune's controller) both say
        self.pool_seen: tuple[Any, ...] | None = None
        self.points: list[Point] = list(points or [])
        self.start = time.perf_counter()
        self.done_here = 0
        self._stats: tuple[float, dict[str, Any]] | None = None  # (when, pool stats): at most 1 call/s

    def told(self, trial: FrozenTrial) -> None:
        try:
            self.run_dir.push_journal()
        except UserError as error:  # the next push retries; the local cache keeps the trial
            log.warning("journal upload failed: %s", error)
        a = trial.user_attrs
        complete = trial.state == TrialState.COMPLETE
        eta = None
        if complete:
            self.done_here += 1
            self.complete += 1
            self.points.append((int(a.get("refusals", 0)), float(a.get("kl", 0.0)), trial.number))
            eta = max(self.n_trials - self.complete, 0) * (time.perf_counter() - self.start) / self.done_here
        busy = workers = pending = None
        stats = self.recent_stats()
        if stats is not None:
            workers, busy, pending = stats["workers"], len(stats["leased"]), stats.get("starting")
            self.pool_changed(stats)
        self.report(TrialUpdate(
            number=trial.number, complete=complete, refusals=a.get("refusals") if complete else None,
            kl=a.get("kl") if complete else None, seconds=float(a.get("trial_seconds", 0.0)),
            reason=a.get("fail_reason"), done=self.complete, n_trials=self.n_trials, n_bad=self.n_bad,
            eta_s=eta, best=best_point(pareto_front(self.points, point=_same), point=_same),
            busy_workers=busy, workers=workers, pending_workers=pending))

    def pool_changed(self, stats: dict[str, Any]) -> None:
        """New notices said once each; `on_pool` when the ready or pending workers changed. The driver
        calls it once more after the search (for what came after the last trial)."""
        notices = stats.get("notices", [])
        with self._said:
            new, self.notices_said = notices[self.notices_said:], max(self.notices_said, len(notices))
        for line in new if self.say is not None else []:
            self.say(line)
        seen = (tuple(sorted(stats.get("nodes", {}).items())), tuple(stats.get("pending", [])))
        if self.on_pool is not None and seen != self.pool_seen:
            self.pool_seen = seen
            try:
                self.on_pool(stats)
            except Exception as error:  # noqa: BLE001 - the display must not cost the run
                log.warning("recording the pool's workers failed: %s", error)


    def recent_stats(self) -> dict[str, Any] | None:
        """The pool's stats, asked at most once a second: this runs on the Tune controller's thread,
        where a Ray round trip per trial would add to every trial's overhead."""
        if self.pool_stats is None:
            return None
        now = time.monotonic()
        if self._stats is None or now - self._stats[0] > 1.0:
            try:
                self._stats = (now, self.pool_stats())
            except Exception:  # noqa: BLE001 - the display must not cost the run
                return None
        return self._stats[1]


def _same(p: Point) -> Point:
    return p
