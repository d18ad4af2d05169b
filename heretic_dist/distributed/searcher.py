"""The Ray Tune Searcher over the run's Optuna study: asks and tells on a thread of its own, each trial
told exactly once (see StudySearcher)."""

from __future__ import annotations

import json
import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher

from heretic_dist.search.objectives import METRICS
from heretic_dist.search.space import SearchSpace
from heretic_dist.search.study import REASON_KEY, grouped, jsonable, open_storage

log = logging.getLogger(__name__)

RECORD_KEY = "heretic_record"  # the result field carrying the trial's record (JSON), stored as user attrs
FAILED_KEY = "trial_failed"


class StudySearcher(Searcher):
    """A Ray Tune Searcher whose suggestions are Optuna trials of one study; tells each exactly once.

    One thread of its own (the study thread) makes every ask and tell, in the order they are asked
    for: Tune's controller thread only hands tells over and collects asks, so the journal's fsyncs
    (~4 ms each here) and TPE's sampling (~15-20 ms at 200 trials) leave the path between one trial's
    end and the next one's start. An ask always runs after the tells handed over before it.

    With `presample`, the ask for the next suggestion is started `presample_delay_s` after a suggest
    (once Tune has started that trial, so the sampling does not compete with it for the GIL) and the
    next suggest only collects it; a suggest that comes sooner takes the ask at once. Optuna's studies
    and samplers are thread-safe (as for `optimize(n_jobs=...)`). The cost: a sample taken ahead may
    treat the trial whose end frees the slot as still running (constant liar), as if one more trial
    were in flight. It is taken only while Tune has suggestions left to ask for (`budget`), so a round
    that ends normally leaves none behind.
    """

    def __init__(self, storage: Any, study_name: str, space: SearchSpace, sampler: optuna.samplers.BaseSampler,
                 on_told: Callable[[FrozenTrial], None] | None = None, budget: int | None = None,
                 presample: bool = False, presample_delay_s: float = 0.1):
        super().__init__(metric=list(METRICS), mode=["min", "min"])
        self.storage = open_storage(storage)
        self.study = optuna.load_study(study_name=study_name, storage=self.storage, sampler=sampler)
        self.space = space
        self.on_told = on_told
        self.asked: dict[str, optuna.Trial] = {}  # Tune trial id -> the Optuna trial asked for it
        self.finished: set[str] = set()
        self.told: dict[int, str] = {}  # trial number -> state name, for this session
        self.budget = budget  # suggestions Tune asks for in this round (its num_samples); None: unknown
        self.presample = presample
        self.presample_delay_s = presample_delay_s
        self.n_suggested = 0
        self._init_threads()

    def _init_threads(self) -> None:
        self._writer: ThreadPoolExecutor | None = None  # the study thread, started on first use
        self._next: Future | None = None  # the next suggestion's ask, handed to the study thread
        self._timer: threading.Timer | None = None  # starts that ask after presample_delay_s
        self._lock = threading.Lock()  # _next and _timer, between the controller and the timer thread

    def _study_thread(self) -> ThreadPoolExecutor:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="study")
        return self._writer

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # metric, mode and space are fixed at construction

    def _ask(self) -> tuple[optuna.Trial, dict[str, Any]]:
        # the ask and its ~11 parameter lines: 2 journal appends instead of 12
        with grouped(self.storage):
            trial = self.study.ask()
            params = self.space(trial)
        return trial, params

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        pending = self._take_presampled() or self._study_thread().submit(self._ask)
        trial, params = pending.result()
        self.asked[trial_id] = trial
        self.n_suggested += 1
        if self.presample and (self.budget is None or self.n_suggested < self.budget):
            self._schedule_presample()
        return params

    def _schedule_presample(self) -> None:
        def start_ask() -> None:
            with self._lock:
                if self._timer is timer:  # not taken or cancelled meanwhile
                    self._timer = None
                    self._next = self._study_thread().submit(self._ask)

        timer = threading.Timer(self.presample_delay_s, start_ask)
        timer.daemon = True
        with self._lock:
            self._timer = timer
        timer.start()

    def _take_presampled(self) -> Future | None:
        """The ask started ahead, if any; a timer that has not fired yet is cancelled."""
        with self._lock:
            timer, self._timer = self._timer, None
            pending, self._next = self._next, None
        if timer is not None:
            timer.cancel()
        return pending

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.finished or trial_id not in self.asked:
            return
        trial = self.asked[trial_id]
        values, reason = _outcome(result, error)
        attrs: dict[str, Any] = {}
        if result and RECORD_KEY in result:
            try:
                attrs = json.loads(result[RECORD_KEY])
            except ValueError:
                attrs = {}
        attrs["index"] = trial.number + 1
        if reason:
            attrs[REASON_KEY] = reason
        self.finished.add(trial_id)
        self._study_thread().submit(self._tell_or_leave, trial_id, trial, values, attrs)

    def _tell_or_leave(self, trial_id: str, trial: optuna.Trial, values: list[float] | None,
                       attrs: dict[str, Any]) -> None:
        try:
            self._tell(trial, values, attrs)
        except Exception as exc:  # noqa: BLE001 - the storage failed even for FAIL: fail_untold retries
            log.warning("trial %d could not be told: %s", trial.number, exc)
            self.finished.discard(trial_id)

    def _tell(self, trial: optuna.Trial, values: list[float] | None, attrs: dict[str, Any]) -> None:
        # the ~20 user attrs go with the tell's state change: 1 journal append, not 21
        with grouped(self.storage):
            for key, value in attrs.items():
                try:
                    trial.set_user_attr(key, jsonable(value))
                except Exception as exc:  # noqa: BLE001 - attrs must not cost the trial
                    log.warning("trial %d: user attr %s not stored: %s", trial.number, key, exc)
            state = TrialState.COMPLETE if values is not None else TrialState.FAIL
            try:
                frozen = self.study.tell(trial, values, state=state)
            except Exception as exc:  # noqa: BLE001 - never leave it RUNNING
                log.warning("trial %d: tell failed (%s); marking it FAIL", trial.number, exc)
                trial.set_user_attr(REASON_KEY, f"tell failed: {exc}")
                frozen = self.study.tell(trial, None, state=TrialState.FAIL)
                state = TrialState.FAIL
        self.told[trial.number] = state.name
        if self.on_told is not None:
            try:
                self.on_told(frozen)
            except Exception as exc:  # noqa: BLE001 - a progress line must not stop the search
                log.warning("after trial %d: %s", trial.number, exc)

    def settle(self) -> None:
        """Wait until every tell handed over is written and the ask due ahead (if any) is taken."""
        with self._lock:
            timer = self._timer
        if timer is not None:
            timer.join()
        with self._lock:
            pending = self._next
        if pending is not None:
            pending.result()
        if self._writer is not None:
            self._writer.submit(lambda: None).result()

    def _stop_threads(self) -> None:
        """Write what was handed over, stop the study thread; an ask taken ahead joins the asked trials."""
        pending = self._take_presampled()
        if pending is not None:
            try:
                trial, _ = pending.result()
                self.asked[f"presampled-{trial.number}"] = trial
            except Exception as exc:  # noqa: BLE001 - an ask that failed created no trial to fail
                log.warning("a trial sampled ahead could not be asked: %s", exc)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def fail_untold(self, reason: str) -> list[int]:
        """Fail every trial this searcher asked but never told (e.g. the run was interrupted)."""
        self._stop_threads()
        failed = []
        for trial_id, trial in list(self.asked.items()):
            if trial_id in self.finished:
                continue
            try:
                with grouped(self.storage):
                    trial.set_user_attr(REASON_KEY, reason)
                    self.study.tell(trial, None, state=TrialState.FAIL, skip_if_finished=True)
                failed.append(trial.number)
            except Exception as exc:  # noqa: BLE001 - best effort; a resume fails it as interrupted
                log.warning("trial %d could not be failed: %s", trial.number, exc)
            self.finished.add(trial_id)
        return failed

    # The Tuner pickles its searcher into its own state file; the callback (progress display, run
    # directory) stays in this process: a restored searcher would be a new one anyway (see save).
    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "on_told": None}
        for name in ("_writer", "_next", "_timer", "_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_threads()

    # The study file is the source of truth and a resume builds a fresh searcher: nothing to checkpoint.
    def save(self, checkpoint_path: str) -> None:
        return None

    def restore(self, checkpoint_path: str) -> None:
        return None


def _outcome(result: dict | None, error: bool) -> tuple[list[float] | None, str | None]:
    """(objective values, None) for a trial to tell COMPLETE, else (None, the reason it failed)."""
    if error:
        return None, "the Tune trial process failed (see the Tune trial log)"
    if not result or RECORD_KEY not in result:
        return None, "the trial was stopped before it reported"
    if result.get(FAILED_KEY):
        return None, str(result.get(REASON_KEY) or "trial failed")
    try:
        values = [float(result[m]) for m in METRICS]
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"bad objective values: {exc}"
    if not all(math.isfinite(v) for v in values):
        return None, f"non-finite objective values {values}"
    return values, None
