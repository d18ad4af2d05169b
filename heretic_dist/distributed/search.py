"""The search: the space (upstream Heretic 1.4.0 names), the reducer, the objectives, and Ray Tune.

How a trial runs:
1. The driver runs Ray Tune with `StudySearch` (an OptunaSearch whose study lives in a JournalStorage
   file). Tune asks the searcher for a config; the searcher `ask`s the Optuna study and runs the
   define-by-run space (`suggest_params`).
2. Tune starts a light trial function (0 CPUs, pinned to the driver's node by a sliver of its
   `node:<ip>` resource, so model workers own all CPUs/GPUs and a lost spot node cannot take trial
   functions along). The function re-attaches to the WorkerPool by name, decodes the params, leases K
   workers and runs shard i of K on each (`WorkerPool.run_sharded`). A worker lost mid-trial is
   replaced and its shard re-run inside the same trial.
3. The function reduces the partial results, computes both objectives and calls `tune.report` once.
   Anything that goes wrong inside (engine error, non-finite metric, too many worker losses) is
   reported as a result with `trial_failed` and a reason instead of raised, so Tune prints no
   traceback and the searcher can record the reason.
4. In the driver process `StudySearch.on_trial_complete` sets the trial's user attrs and tells the
   study exactly once: COMPLETE with two finite values, or FAIL (user attr `fail_reason`).
   A `finally` in `run_search` fails any trial this session asked but never told, so no trial is left
   RUNNING by this process.

Resume: `prepare_study` marks RUNNING trials left by a killed driver as FAIL (`fail_reason`
"interrupted") and, by default, enqueues their parameters so the same points are evaluated again.
`run_search` then runs only `n_trials - complete` trials, in rounds until the study holds `n_trials`
COMPLETE trials (a round that completes none stops the loop).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import optuna
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import TrialState

from heretic_dist.engine.scoring import objective_values  # noqa: F401 (re-exported for the trial function)
from heretic_dist.engine.types import COMPONENTS, PartialResult, Shard

log = logging.getLogger(__name__)

METRICS = ["refusals_score", "kl_score"]
MODES = ["min", "min"]
RECORD_KEY = "heretic_record"  # JSON string: the user attrs of the Optuna trial
FAILED_KEY = "trial_failed"
REASON_KEY = "fail_reason"


# --------------------------------------------------------------------------------------------------
# Search space, reducer, objectives
# --------------------------------------------------------------------------------------------------


def suggest_params(
    trial: optuna.Trial,
    n_layers: int,
    allow_mlp_off: bool = False,
    components: list[str] | tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Define-by-run space of upstream Heretic 1.4.0: same names, ranges and order of suggestions."""
    last = n_layers - 1
    values: dict[str, Any] = {}
    values["direction_scope"] = trial.suggest_categorical("direction_scope", ["global", "per layer"])
    # Always sampled (multivariate TPE needs a fixed set of parameters); ignored for "per layer".
    values["direction_index"] = trial.suggest_float("direction_index", 0.4 * last, 0.9 * last)
    present = set(COMPONENTS if components is None else components)
    for c in sorted(present & set(COMPONENTS)):
        low = -0.25 if (allow_mlp_off and c == "mlp.down_proj") else 0.8
        values[f"{c}.max_weight"] = trial.suggest_float(f"{c}.max_weight", low, 1.5)
        values[f"{c}.max_weight_position"] = trial.suggest_float(f"{c}.max_weight_position", 0.6 * last, 1.0 * last)
        values[f"{c}.min_weight"] = trial.suggest_float(f"{c}.min_weight", 0.0, 1.0)
        values[f"{c}.min_weight_distance"] = trial.suggest_float(f"{c}.min_weight_distance", 1.0, 0.6 * last)
    return values


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


# --------------------------------------------------------------------------------------------------
# One trial (runs in a Tune trial process, or in-process for tests)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial function needs besides its sampled params. Plain data, pickled to Tune."""

    pool_name: str
    pool_namespace: str | None
    n_layers: int
    base_refusals: float
    kl_scale: float = 1.0
    kl_target: float = 0.01
    allow_mlp_off: bool = False
    shards: int = 1
    max_attempts: int = 3
    lease_timeout_s: float | None = None


def evaluate_trial(raw: dict[str, Any], setup: TrialSetup, pool: Any = None) -> dict[str, Any]:
    """Run one trial on the pool and return the result to report (never raises for trial failures)."""
    from heretic_dist.engine.ablation import decode_trial_params

    from .pool import WorkerPool

    t0 = time.perf_counter()
    record: dict[str, Any] = {"raw_params": raw, "trial_pid": os.getpid()}
    try:
        pool = pool or WorkerPool.attach(setup.pool_name, setup.pool_namespace)
        params = decode_trial_params(raw, setup.n_layers, setup.allow_mlp_off)
        record["params"] = params.to_dict()
        # upstream 1.4.0 keeps these two user attrs; keep them for tools that read its studies
        record["direction_index"] = params.direction_index
        record["parameters"] = record["params"]["components"]
        k = setup.shards
        run = pool.run_sharded(
            "run_trial",
            [(record["params"], Shard(i, k)) for i in range(k)],
            max_attempts=setup.max_attempts,
            lease_timeout_s=setup.lease_timeout_s,
        )
        record["lease_s"] = run.lease_s
        record["run_s"] = run.run_s
        record["attempts"] = max(run.attempts)
        record["worker_losses"] = run.losses
        reduced = reduce_partials(run.results)
        record.update(reduced)
        scores = objective_values(
            reduced["refusals"], reduced["kl"], setup.base_refusals, setup.kl_scale, setup.kl_target
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes an explicit FAIL with its reason
        reason = _reason(exc)
        record["trial_seconds"] = time.perf_counter() - t0
        return {FAILED_KEY: True, REASON_KEY: reason, METRICS[0]: 0.0, METRICS[1]: 0.0,
                RECORD_KEY: _dumps(record)}
    record["trial_seconds"] = time.perf_counter() - t0
    return {
        FAILED_KEY: False,
        METRICS[0]: scores[0],
        METRICS[1]: scores[1],
        "refusals": reduced["refusals"],
        "kl": reduced["kl"],
        RECORD_KEY: _dumps(record),
    }


def _reason(exc: BaseException) -> str:
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        cause = exc.cause
        return f"engine error: {type(cause).__name__}: {cause}"[:2000]
    if isinstance(exc, ValueError):
        return f"{exc}"[:2000]
    return f"{type(exc).__name__}: {exc}"[:2000]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=True)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


def trial_function(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable (function API): one report per trial."""
    from ray import tune

    tune.report(evaluate_trial(config, setup))


# --------------------------------------------------------------------------------------------------
# The searcher: OptunaSearch that records user attrs and tells every trial exactly once
# --------------------------------------------------------------------------------------------------


def _optuna_search_cls():
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        """OptunaSearch with user attrs, explicit FAIL with a reason, and no swallowed tell errors."""

        def __init__(self, *args: Any, on_told: Callable[[optuna.trial.FrozenTrial], None] | None = None,
                     **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.on_told = on_told
            self.told: dict[int, str] = {}  # trial number -> state name, for this session

        def suggest(self, trial_id: str) -> dict | None:
            # the ask and its ~11 parameter logs: 2 journal appends instead of 12
            with _buffered(self._ot_study):
                return super().suggest(trial_id)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot_trial = self._ot_trials[trial_id]
            values, reason = None, None
            if error:
                reason = "the Tune trial process failed (see the Tune trial log)"
            elif not result or RECORD_KEY not in result:
                reason = "the trial was stopped before it reported"
            elif result.get(FAILED_KEY):
                reason = str(result.get(REASON_KEY) or "trial failed")
            else:
                try:
                    values = [float(result[m]) for m in self.metric]
                except (KeyError, TypeError, ValueError) as exc:
                    reason = f"bad objective values: {exc}"
                else:
                    if not all(math.isfinite(v) for v in values):
                        values, reason = None, f"non-finite objective values {values}"
            attrs = {}
            if result and RECORD_KEY in result:
                try:
                    attrs = json.loads(result[RECORD_KEY])
                except ValueError:
                    attrs = {}
            attrs.pop("raw_params", None)  # they are the trial's params already
            attrs["index"] = ot_trial.number + 1
            if reason:
                attrs[REASON_KEY] = reason
            self._tell(ot_trial, values, attrs)
            self._completed_trials.add(trial_id)

        def _tell(self, ot_trial: optuna.Trial, values: list[float] | None, attrs: dict[str, Any]) -> None:
            # the ~20 user attrs are written with the tell's state change: 1 journal append, not 21
            with _buffered(self._ot_study):
                self._tell_grouped(ot_trial, values, attrs)

        def _tell_grouped(self, ot_trial: optuna.Trial, values: list[float] | None, attrs: dict[str, Any]) -> None:
            for key, value in attrs.items():
                try:
                    ot_trial.set_user_attr(key, _jsonable(value))
                except Exception as exc:  # noqa: BLE001 - attrs must not cost the trial
                    log.warning("trial %d: user attr %s not stored: %s", ot_trial.number, key, exc)
            state = TrialState.COMPLETE if values is not None else TrialState.FAIL
            try:
                frozen = self._ot_study.tell(ot_trial, values, state=state)
            except Exception as exc:  # noqa: BLE001 - never leave it RUNNING
                log.warning("trial %d: tell failed (%s); marking it FAIL", ot_trial.number, exc)
                with _suppress():
                    ot_trial.set_user_attr(REASON_KEY, f"tell failed: {exc}")
                frozen = self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
                state = TrialState.FAIL
            self.told[ot_trial.number] = state.name
            if self.on_told is not None:
                with _suppress():
                    self.on_told(frozen)

        # Tune checkpoints the searcher by pickling it (the study, its storage, callbacks). The Optuna
        # study file is our source of truth and a resume builds a fresh searcher, so there is nothing
        # to save: saving would only cost time per trial and fail on unpicklable callbacks.
        def save(self, checkpoint_path: str) -> None:
            return None

        def restore(self, checkpoint_path: str) -> None:
            return None

        def fail_untold(self, reason: str) -> list[int]:
            """Fail every trial this searcher asked but never told (e.g. the run was interrupted)."""
            failed = []
            for trial_id, ot_trial in list(self._ot_trials.items()):
                if trial_id in self._completed_trials:
                    continue
                with _suppress():
                    ot_trial.set_user_attr(REASON_KEY, reason)
                    self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
                    failed.append(ot_trial.number)
                self._completed_trials.add(trial_id)
            return failed

    return StudySearch


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, Exception):
            log.warning("ignored: %s: %s", type(exc).__name__, exc)
            return True
        return False


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default, allow_nan=True))


# --------------------------------------------------------------------------------------------------
# Study helpers
# --------------------------------------------------------------------------------------------------


class BufferedJournalStorage(optuna.storages.JournalStorage):
    """A JournalStorage that can write the many small logs of one ask or one tell in one append.

    Optuna writes every suggested parameter and every user attr as its own log line, and each line is
    one append to the journal file under the file lock, with an fsync: about 11 appends per ask and
    20 per tell here, 5 ms each on this machine's disk, all of it on the Tune controller's thread.
    Inside `buffered()`, parameter and user-attr logs of the calling thread are held back and written
    with the next other log (the tell's state change) or when the block ends, in one append (one lock,
    one fsync). The file holds the same log lines as before, in the same order, so any Optuna reader
    (and optuna-dashboard) replays it as usual. Readers of this storage object see the held-back logs
    only after they are written; Optuna's Trial keeps its own copy of its params and user attrs, and
    the tell (a state change) writes them first, so the study never sees a trial without them.
    """

    _HELD = frozenset({JournalOperation.SET_TRIAL_PARAM, JournalOperation.SET_TRIAL_USER_ATTR})

    def __init__(self, log_storage: Any) -> None:
        super().__init__(log_storage)
        self._held: list[dict[str, Any]] | None = None
        self._held_thread: int | None = None

    @contextlib.contextmanager
    def buffered(self):
        if self._held is not None:  # nested: the outer block writes
            yield
            return
        self._held, self._held_thread = [], threading.get_ident()
        try:
            yield
        finally:
            with self._thread_lock:
                held, self._held, self._held_thread = self._held, None, None
                if held:
                    self._backend.append_logs(held)
                    try:
                        self._sync_with_backend()
                    except (KeyError, optuna.exceptions.UpdateFinishedTrialError) as exc:
                        # unbuffered, each write would have raised this (and been written all the same)
                        log.warning("journal: held logs for a missing or finished trial: %s", exc)

    def _write_log(self, op_code: int, extra_fields: dict[str, Any]) -> None:
        log = {"op_code": op_code, "worker_id": self._replay_result.worker_id, **extra_fields}
        if self._held is None or self._held_thread != threading.get_ident():
            self._backend.append_logs([log])
        elif op_code in self._HELD:
            self._held.append(log)
        else:
            self._backend.append_logs(self._held + [log])
            self._held.clear()


def open_storage(storage: str | os.PathLike | optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """A JournalStorage on a local journal file (or a storage object passed through)."""
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = os.fspath(storage)
    return BufferedJournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def _buffered(study: optuna.Study):
    """Write-grouping block of the study's storage (a no-op for other storages)."""
    buffered = getattr(study._storage, "buffered", None)
    return buffered() if buffered is not None else contextlib.nullcontext()


def open_study(storage: Any, study_name: str) -> optuna.Study:
    return optuna.create_study(
        storage=open_storage(storage),
        study_name=study_name,
        directions=["minimize", "minimize"],
        load_if_exists=True,
    )


def prepare_study(storage: Any, study_name: str, rerun_interrupted: bool = True) -> dict[str, Any]:
    """Resume hygiene: fail RUNNING leftovers of a killed driver; optionally queue their params again.

    Returns {"complete": n, "failed": n, "interrupted": [trial numbers], "requeued": n}.
    """
    study = open_study(storage, study_name)
    interrupted = []
    requeued = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, REASON_KEY, "interrupted: the driver stopped while it ran")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        interrupted.append(t.number)
        if rerun_interrupted and t.params:
            study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number})
            requeued += 1
    trials = study.get_trials(deepcopy=False)
    return {
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "interrupted": interrupted,
        "requeued": requeued,
        "total": len(trials),
    }


# --------------------------------------------------------------------------------------------------
# Tune
# --------------------------------------------------------------------------------------------------


@dataclass
class SearchSpec:
    """Sampler and Tune knobs of one search (from Settings; see `SearchSpec.from_settings`)."""

    n_trials: int
    n_startup_trials: int = 60
    seed: int | None = None
    allow_mlp_off: bool = False
    kl_scale: float = 1.0
    kl_target: float = 0.01
    workers: int = 1
    shards: int = 1
    max_attempts: int = 3
    lease_timeout_s: float | None = None
    n_ei_candidates: int = 128

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> SearchSpec:
        def get(obj: Any, key: str, default: Any) -> Any:
            if obj is None:
                return default
            v = obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)
            return default if v is None and default is not None else v

        cluster = get(settings, "cluster", None)
        spec = cls(
            n_trials=int(get(settings, "n_trials", 200)),
            n_startup_trials=int(get(settings, "n_startup_trials", 60)),
            seed=get(settings, "seed", None),
            allow_mlp_off=bool(get(settings, "allow_mlp_off", False)),
            kl_scale=float(get(settings, "kl_divergence_scale", 1.0)),
            kl_target=float(get(settings, "kl_divergence_target", 0.01)),
            workers=int(get(cluster, "workers", 1)),
            shards=int(get(cluster, "shards_per_trial", 1)),
            max_attempts=int(get(cluster, "max_trial_attempts", 3)),
        )
        for k, v in overrides.items():
            setattr(spec, k, v)
        return spec


@dataclass(frozen=True)
class SearchSpace:
    """The define-by-run function given to OptunaSearch (a picklable callable)."""

    n_layers: int
    allow_mlp_off: bool = False
    components: list[str] | None = None

    def __call__(self, trial: optuna.Trial) -> None:
        suggest_params(trial, self.n_layers, self.allow_mlp_off, self.components)


def make_sampler(spec: SearchSpec, n_existing: int = 0) -> optuna.samplers.TPESampler:
    # On resume the seed is shifted by the number of trials already in the study: the same seed would
    # replay the random start-up points that the study already holds.
    seed = None if spec.seed is None else int(spec.seed) + n_existing
    return optuna.samplers.TPESampler(
        n_startup_trials=spec.n_startup_trials,
        n_ei_candidates=spec.n_ei_candidates,
        multivariate=True,
        constant_liar=True,
        seed=seed,
    )


def build_tuner(
    setup: TrialSetup,
    spec: SearchSpec,
    storage: Any,
    study_name: str,
    num_samples: int,
    tune_dir: str,
    name: str = "tune",
    components: list[str] | None = None,
    callbacks: list | None = None,
    on_told: Callable[[optuna.trial.FrozenTrial], None] | None = None,
    n_existing: int = 0,
):
    """(Tuner, searcher). Trials are 0-CPU function trainables pinned to this node."""
    import ray
    from ray import tune

    searcher = _optuna_search_cls()(
        space=SearchSpace(setup.n_layers, setup.allow_mlp_off, components),
        metric=list(METRICS),
        mode=list(MODES),
        sampler=make_sampler(spec, n_existing),
        storage=open_storage(storage),
        study_name=study_name,
        on_told=on_told,
    )
    node_resource = f"node:{ray.util.get_node_ip_address()}"
    trainable = tune.with_resources(
        tune.with_parameters(trial_function, setup=setup),
        {"cpu": 0, node_resource: 0.001},
    )
    concurrency = max(1, spec.workers // max(1, spec.shards))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=num_samples,
            max_concurrent_trials=concurrency,
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


def run_search(
    pool: Any,
    settings: Any,
    storage: Any,
    study_name: str,
    base_refusals: float,
    n_layers: int,
    components: list[str] | None,
    tune_dir: str,
    callbacks: list | None = None,
    on_told: Callable[[optuna.trial.FrozenTrial], None] | None = None,
    spec: SearchSpec | None = None,
    rerun_interrupted: bool = True,
    max_rounds: int = 10,
) -> SearchSummary:
    """Run trials until the study holds `n_trials` COMPLETE trials (resuming what is there).

    `pool` is a WorkerPool (only its name travels to the trial processes). `storage` is a journal
    file path or an Optuna storage. `on_told(frozen_trial)` is called in this process after each tell
    (e.g. to append a row to trials.parquet or print progress).
    """
    from .pool import quiet_ray_env

    quiet_ray_env()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = spec or SearchSpec.from_settings(settings)
    t0 = time.perf_counter()
    resume = prepare_study(storage, study_name, rerun_interrupted)
    setup = TrialSetup(
        pool_name=pool.name,
        pool_namespace=pool.namespace,
        n_layers=n_layers,
        base_refusals=float(base_refusals),
        kl_scale=spec.kl_scale,
        kl_target=spec.kl_target,
        allow_mlp_off=spec.allow_mlp_off,
        shards=spec.shards,
        max_attempts=spec.max_attempts,
        lease_timeout_s=spec.lease_timeout_s,
    )
    summary = SearchSummary(complete=resume["complete"], failed=resume["failed"], resume=resume)
    complete = resume["complete"]
    n_existing = resume["total"]
    rounds = 0
    while complete < spec.n_trials and rounds < max_rounds:
        remaining = spec.n_trials - complete
        name = "tune" if rounds == 0 and n_existing == 0 else f"tune-{n_existing:05d}"
        tuner, searcher = build_tuner(
            setup, spec, storage, study_name, remaining, tune_dir, name=name, components=components,
            callbacks=callbacks, on_told=on_told, n_existing=n_existing,
        )
        rounds += 1
        try:
            tuner.fit()
        finally:
            leftover = searcher.fail_untold("not told by the searcher (run interrupted or Tune error)")
            if leftover:
                log.warning("failed %d trials that were never told: %s", len(leftover), leftover)
        summary.told.update(searcher.told)
        study = open_study(storage, study_name)
        trials = study.get_trials(deepcopy=False)
        new_complete = sum(t.state == TrialState.COMPLETE for t in trials)
        n_existing = len(trials)
        if new_complete == complete:
            break  # a round that completes nothing would loop forever
        complete = new_complete
    summary.complete = complete
    summary.failed = sum(t.state == TrialState.FAIL for t in open_study(storage, study_name).get_trials(deepcopy=False))
    summary.rounds = rounds
    summary.seconds = time.perf_counter() - t0
    return summary
