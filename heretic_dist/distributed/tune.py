"""Ray Tune over the run's Optuna study: the Searcher, the trial function, the rounds until done.

How a trial runs:
1. The driver runs Ray Tune with `StudySearcher`, a Ray Tune `Searcher` (its public plug-in contract)
   that owns the Optuna study through Optuna's public API: `study.ask()` plus the define-by-run space
   for each suggestion, `study.tell()` exactly once per asked trial.
2. Tune starts a light trial function (0 CPUs, pinned to the driver's node by a sliver of its
   `node:<ip>` resource, so model workers own all CPUs/GPUs). It re-attaches to the WorkerPool by
   name, decodes the params, leases K workers and runs shard i of K on each. A worker lost mid-trial
   is replaced and its shard re-run inside the same trial.
3. The function reduces the partial results, computes both objectives and reports once. Anything that
   goes wrong inside is reported as a result with `trial_failed` and a reason instead of raised, so
   Tune prints no traceback and the searcher records the reason.
4. `StudySearcher.on_trial_complete` stores the trial's record as user attrs and tells the study:
   COMPLETE with two finite values, or FAIL with `fail_reason`. `run_search` fails, in a `finally`,
   every trial this session asked but never told, so no trial is left RUNNING by this process.

Resume: `prepare_study` fails RUNNING leftovers of a killed driver ("interrupted") and re-queues their
parameters; `run_search` runs rounds until the study holds `n_trials` COMPLETE trials.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher

from heretic_dist.config import ClusterSettings, Settings
from heretic_dist.engine.types import Shard
from heretic_dist.search.objectives import METRICS, objective_values, reduce_partials
from heretic_dist.search.space import SearchSpace, decode_trial_params
from heretic_dist.search.study import (REASON_KEY, grouped, jsonable, make_sampler, open_storage, open_study,
                                       prepare_study)

if TYPE_CHECKING:
    from .pool import WorkerPool

log = logging.getLogger(__name__)

RECORD_KEY = "heretic_record"  # the result field carrying the trial's record (JSON), stored as user attrs
FAILED_KEY = "trial_failed"


def _setting(name: str, table: type = Settings) -> Any:
    """A setting's default, declared once in config/schema.py."""
    return table.model_fields[name].get_default(call_default_factory=True)


@dataclass
class SearchSpec:
    """Sampler and Tune knobs of one search; `from_settings` fills them from a run's Settings."""

    n_trials: int
    n_startup_trials: int = field(default_factory=lambda: _setting("n_startup_trials"))
    seed: int | None = None
    allow_mlp_off: bool = field(default_factory=lambda: _setting("allow_mlp_off"))
    kl_scale: float = field(default_factory=lambda: _setting("kl_divergence_scale"))
    kl_target: float = field(default_factory=lambda: _setting("kl_divergence_target"))
    workers: int = field(default_factory=lambda: _setting("workers", ClusterSettings))
    shards: int = field(default_factory=lambda: _setting("shards_per_trial", ClusterSettings))
    max_attempts: int = field(default_factory=lambda: _setting("max_trial_attempts", ClusterSettings))
    lease_timeout_s: float | None = None  # no limit: a trial waits for free workers as long as it takes
    n_ei_candidates: int = 128  # TPE candidates per suggestion (Optuna's default is 24)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SearchSpec:
        c = settings.cluster
        spec = cls(n_trials=settings.n_trials, n_startup_trials=settings.n_startup_trials, seed=settings.seed,
                   allow_mlp_off=settings.allow_mlp_off, kl_scale=settings.kl_divergence_scale,
                   kl_target=settings.kl_divergence_target, workers=c.workers, shards=c.shards_per_trial,
                   max_attempts=c.max_trial_attempts)
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in names:
                raise TypeError(f"SearchSpec has no field {key!r}")
            setattr(spec, key, value)
        return spec


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial function needs besides its sampled params. Plain data, pickled to Tune."""

    pool_name: str
    pool_namespace: str | None
    n_layers: int
    base_refusals: float
    kl_scale: float = field(default_factory=lambda: _setting("kl_divergence_scale"))
    kl_target: float = field(default_factory=lambda: _setting("kl_divergence_target"))
    allow_mlp_off: bool = field(default_factory=lambda: _setting("allow_mlp_off"))
    shards: int = 1
    max_attempts: int = field(default_factory=lambda: _setting("max_trial_attempts", ClusterSettings))
    lease_timeout_s: float | None = None

    @classmethod
    def for_search(cls, pool: WorkerPool, spec: SearchSpec, n_layers: int, base_refusals: float) -> TrialSetup:
        return cls(pool.name, pool.namespace, n_layers, float(base_refusals), spec.kl_scale, spec.kl_target,
                   spec.allow_mlp_off, spec.shards, spec.max_attempts, spec.lease_timeout_s)


# --------------------------------------------------------------------------------------------------
# One trial (runs in a Tune trial process, or in-process for tests)


def evaluate_trial(raw: dict[str, Any], setup: TrialSetup, pool: WorkerPool | None = None) -> dict[str, Any]:
    """Run one trial on the pool and return the result to report (never raises for trial failures)."""
    from .pool import WorkerPool

    t0 = time.perf_counter()
    import ray

    record: dict[str, Any] = {"trial_pid": os.getpid(), "trial_node": ray.get_runtime_context().get_node_id()}
    try:
        pool = pool or WorkerPool.attach(setup.pool_name, setup.pool_namespace)
        params = decode_trial_params(raw, setup.n_layers, setup.allow_mlp_off)
        record["params"] = params.to_dict()
        # upstream 1.4.0 keeps these two user attrs; keep them for tools that read its studies
        record["direction_index"] = params.direction_index
        record["parameters"] = record["params"]["components"]
        k = setup.shards
        run = pool.run_sharded("run_trial", [(record["params"], Shard(i, k)) for i in range(k)],
                               max_attempts=setup.max_attempts, lease_timeout_s=setup.lease_timeout_s)
        record.update(lease_s=run.lease_s, run_s=run.run_s, attempts=max(run.attempts), worker_losses=run.losses)
        reduced = reduce_partials(run.results)
        record.update(reduced)
        scores = objective_values(reduced["refusals"], reduced["kl"], setup.base_refusals, setup.kl_scale,
                                  setup.kl_target)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an explicit FAIL with its reason
        record["trial_seconds"] = time.perf_counter() - t0
        return {FAILED_KEY: True, REASON_KEY: failure_reason(exc), METRICS[0]: 0.0, METRICS[1]: 0.0,
                RECORD_KEY: json.dumps(jsonable(record))}
    record["trial_seconds"] = time.perf_counter() - t0
    return {FAILED_KEY: False, METRICS[0]: scores[0], METRICS[1]: scores[1], "refusals": reduced["refusals"],
            "kl": reduced["kl"], RECORD_KEY: json.dumps(jsonable(record))}


def failure_reason(exc: BaseException) -> str:
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        return f"engine error: {type(exc.cause).__name__}: {exc.cause}"[:2000]
    if isinstance(exc, ValueError):
        return f"{exc}"[:2000]
    return f"{type(exc).__name__}: {exc}"[:2000]


def trial_function(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable (function API): one report per trial."""
    from ray import tune

    tune.report(evaluate_trial(config, setup))


# --------------------------------------------------------------------------------------------------
# The searcher


class StudySearcher(Searcher):
    """A Ray Tune Searcher whose suggestions are Optuna trials of one study; tells each exactly once."""

    def __init__(self, storage: Any, study_name: str, space: SearchSpace, sampler: optuna.samplers.BaseSampler,
                 on_told: Callable[[FrozenTrial], None] | None = None):
        super().__init__(metric=list(METRICS), mode=["min", "min"])
        self.storage = open_storage(storage)
        self.study = optuna.load_study(study_name=study_name, storage=self.storage, sampler=sampler)
        self.space = space
        self.on_told = on_told
        self.asked: dict[str, optuna.Trial] = {}  # Tune trial id -> the Optuna trial asked for it
        self.finished: set[str] = set()
        self.told: dict[int, str] = {}  # trial number -> state name, for this session

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # metric, mode and space are fixed at construction

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        # the ask and its ~11 parameter lines: 2 journal appends instead of 12
        with grouped(self.storage):
            trial = self.study.ask()
            params = self.space(trial)
        self.asked[trial_id] = trial
        return params

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
        self._tell(trial, values, attrs)
        self.finished.add(trial_id)

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

    def fail_untold(self, reason: str) -> list[int]:
        """Fail every trial this searcher asked but never told (e.g. the run was interrupted)."""
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
        return {**self.__dict__, "on_told": None}

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


# --------------------------------------------------------------------------------------------------
# Rounds of Tune until the study holds n_trials COMPLETE trials


def build_tuner(setup: TrialSetup, spec: SearchSpec, storage: Any, study_name: str, num_samples: int,
                tune_dir: str, name: str = "tune", components: list[str] | None = None,
                callbacks: list | None = None, on_told: Callable[[FrozenTrial], None] | None = None,
                n_existing: int = 0):
    """(Tuner, searcher). Trials are 0-CPU function trainables pinned to this node."""
    import ray
    from ray import tune

    searcher = StudySearcher(
        storage, study_name,
        SearchSpace(setup.n_layers, setup.allow_mlp_off, tuple(components) if components else None),
        make_sampler(spec.n_startup_trials, spec.seed, n_existing, spec.n_ei_candidates),
        on_told=on_told,
    )
    trainable = tune.with_resources(tune.with_parameters(trial_function, setup=setup), driver_node_resources())
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=num_samples,
            max_concurrent_trials=max(1, spec.workers // max(1, spec.shards)),
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            storage_path=os.path.abspath(tune_dir),
            name=name,
            verbose=0,
            # One report per trial: stop it on that report. Without this Tune asks the trial actor
            # for one more result (the function's return) before it tells the searcher.
            stop={"training_iteration": 1},
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, num_to_keep=1),
            callbacks=callbacks or [],
            log_to_file=False,
        ),
    )
    return tuner, searcher


def driver_node_resources() -> Any:
    """Trial functions live on the driver's node, chosen by node id (a label selector): a lost spot node
    must not take a trial function along, and several nodes may share one IP, so `node:<ip>` cannot
    tell them apart. One byte of `memory` is the bundle's resource (every node has plenty; CPUs may all
    be taken by the model workers)."""
    import ray
    from ray import tune
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    node_id = ray.get_runtime_context().get_node_id()
    return tune.PlacementGroupFactory([{"memory": 1}], bundle_label_selector=[{NODE_ID_LABEL_KEY: node_id}])


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


@dataclass
class SearchSummary:
    complete: int
    failed: int
    told: dict[int, str] = field(default_factory=dict)
    rounds: int = 0
    seconds: float = 0.0
    resume: dict[str, Any] = field(default_factory=dict)


def _counts(storage: Any, study_name: str) -> tuple[int, int, int]:
    """(complete, failed, total) trials of the study, as its file says now."""
    trials = open_study(storage, study_name).get_trials(deepcopy=False)
    return (sum(t.state == TrialState.COMPLETE for t in trials), sum(t.state == TrialState.FAIL for t in trials),
            len(trials))


def run_search(pool: WorkerPool, spec: SearchSpec, storage: Any, study_name: str, base_refusals: float,
               n_layers: int, components: list[str] | None, tune_dir: str, callbacks: list | None = None,
               on_told: Callable[[FrozenTrial], None] | None = None, rerun_interrupted: bool = True,
               max_rounds: int = 10, check: Callable[[], None] | None = None) -> SearchSummary:
    """Run trials until the study holds `spec.n_trials` COMPLETE trials (resuming what is there).

    `pool` is a WorkerPool (only its name travels to the trial processes). `storage` is a journal file
    path or an Optuna storage. `on_told(frozen_trial)` is called in this process after each tell.
    `check()` runs after every Tune round and may raise to stop the search: Tune takes an interrupt of
    the main thread (e.g. from a run lock that could not be renewed) and returns from fit() quietly.
    """
    from .pool import quiet_ray_env

    quiet_ray_env()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage)
    t0 = time.perf_counter()
    resume = prepare_study(storage, study_name, rerun_interrupted)
    setup = TrialSetup.for_search(pool, spec, n_layers, base_refusals)
    summary = SearchSummary(complete=resume["complete"], failed=resume["failed"], resume=resume)
    complete, n_existing = resume["complete"], resume["total"]
    while complete < spec.n_trials and summary.rounds < max_rounds:
        name = "tune" if summary.rounds == 0 and n_existing == 0 else f"tune-{n_existing:05d}"
        tuner, searcher = build_tuner(setup, spec, storage, study_name, spec.n_trials - complete, tune_dir,
                                      name=name, components=components, callbacks=callbacks, on_told=on_told,
                                      n_existing=n_existing)
        summary.rounds += 1
        try:
            tuner.fit()
        finally:
            leftover = searcher.fail_untold("not told by the searcher (run interrupted or Tune error)")
            if leftover:
                log.warning("failed %d trials that were never told: %s", len(leftover), leftover)
        summary.told.update(searcher.told)
        if check is not None:
            check()
        new_complete, _, n_existing = _counts(storage, study_name)
        if new_complete == complete:
            break  # a round that completes nothing would loop forever
        complete = new_complete
    summary.complete, summary.failed, _ = _counts(storage, study_name)
    summary.seconds = time.perf_counter() - t0
    return summary
