"""Ray Tune over the run's Optuna study: the Searcher, the trial function, the rounds until done.

How a trial runs:
1. The driver runs Ray Tune with `StudySearcher` (searcher.py), a Ray Tune `Searcher` (its public
   plug-in contract) that owns the Optuna study through Optuna's public API: `study.ask()` plus the
   define-by-run space for each suggestion, `study.tell()` exactly once per asked trial, both on a
   thread of its own so that Tune's controller does not wait for TPE or the journal's fsyncs.
2. Tune starts a light trial function (0 CPUs, pinned to the driver's node by node id, so model
   workers own all CPUs/GPUs). It re-attaches to the WorkerPool by
   name, decodes the params, leases K workers and runs shard i of K on each. A worker lost mid-trial
   is replaced and its shard re-run inside the same trial.
3. The function reduces the partial results, computes both objectives and reports once. Anything that
   goes wrong inside is reported as a result with `trial_failed` and a reason instead of raised, so
   Tune prints no traceback and the searcher records the reason.
4. `StudySearcher.on_trial_complete` hands the tell to its study thread: the trial's record as user
   attrs, then COMPLETE with two finite values, or FAIL with `fail_reason`. `run_search` fails, in a
   `finally`, every trial this session asked but never told (after the study thread has written what
   it was handed), so no trial is left RUNNING by this process.

Resume: `prepare_study` fails RUNNING leftovers of a killed driver ("interrupted") and re-queues their
parameters; `run_search` runs rounds until the study holds `n_trials` COMPLETE trials.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune import Callback

from heretic_dist.config import ClusterSettings, Settings
from heretic_dist.engine.types import Shard
from heretic_dist.search.objectives import METRICS, objective_values, reduce_partials
from heretic_dist.search.space import SearchSpace, decode_trial_params
from heretic_dist.search.study import REASON_KEY, jsonable, make_sampler, open_storage, open_study, prepare_study

from .searcher import FAILED_KEY, RECORD_KEY, StudySearcher

if TYPE_CHECKING:
    from .pool import WorkerPool
    from .progress import Progress

log = logging.getLogger(__name__)



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
    trials_per_worker: int = field(default_factory=lambda: _setting("trials_per_worker", ClusterSettings))
    max_attempts: int = field(default_factory=lambda: _setting("max_trial_attempts", ClusterSettings))
    lease_timeout_s: float | None = None  # no limit: a trial waits for free workers as long as it takes
    n_ei_candidates: int = 128  # TPE candidates per suggestion (Optuna's default is 24)
    presample: bool = field(default_factory=lambda: _setting("presample", ClusterSettings))

    def in_flight(self) -> int:
        """Trials at once: every worker slot busy (a trial takes `shards` slots)."""
        return max(1, self.workers * max(1, self.trials_per_worker) // max(1, self.shards))

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SearchSpec:
        c = settings.cluster
        spec = cls(n_trials=settings.n_trials, n_startup_trials=settings.n_startup_trials, seed=settings.seed,
                   allow_mlp_off=settings.allow_mlp_off, kl_scale=settings.kl_divergence_scale,
                   kl_target=settings.kl_divergence_target, workers=c.workers, shards=c.shards_per_trial,
                   trials_per_worker=c.trials_per_worker, max_attempts=c.max_trial_attempts, presample=c.presample)
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
# Rounds of Tune until the study holds n_trials COMPLETE trials


def build_tuner(setup: TrialSetup, spec: SearchSpec, storage: Any, study_name: str, num_samples: int,
                tune_dir: str, name: str = "tune", components: list[str] | None = None,
                callbacks: list | None = None, on_told: Callable[[FrozenTrial], None] | None = None,
                n_existing: int = 0):
    """(Tuner, searcher). Trials are 0-CPU function trainables pinned to this node."""
    from ray import tune

    in_flight = spec.in_flight()
    searcher = StudySearcher(
        storage, study_name,
        SearchSpace(setup.n_layers, setup.allow_mlp_off, tuple(components) if components else None),
        make_sampler(spec.n_startup_trials, spec.seed, n_existing, spec.n_ei_candidates),
        on_told=on_told, budget=num_samples, presample=spec.presample and in_flight > 1,
    )
    trainable = tune.with_resources(tune.with_parameters(trial_function, setup=setup), driver_node_resources())
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=num_samples,
            max_concurrent_trials=in_flight,
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


class PoolWatch(Callback):
    """Says the pool's new notices (a node being drained, a replacement waiting for a node) while
    trials run, not only after the next tell: a trial on a large model takes minutes. Tune calls
    on_step_end on its controller thread after every step; the pool is asked at most every `every_s`."""

    def __init__(self, progress: Progress, every_s: float = 2.0):
        self.progress: Progress | None
        self.progress, self.every_s = progress, every_s
        self.last = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the progress (files, the pool's
        # handle) stays in this process, and a resume makes a new watch
        return {**self.__dict__, "progress": None}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.progress is None or time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        stats = self.progress.recent_stats()
        if stats is not None:
            self.progress.pool_changed(stats)
