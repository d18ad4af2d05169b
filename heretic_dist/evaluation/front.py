"""The two ways an evaluation starts: `evaluate-front RUN_DIR` on a finished (or stopped) run, and
`[evaluation] enabled = true` at the end of `run`, which reuses the search's worker pool."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import rundir as st
from ..config.evaluation import EvaluationSettings, load_evaluation_file
from ..errors import UserError
from .rows import latest_rows
from .run import EvaluationOutcome, EvaluationPlan, ResultWriter, describe_plan, evaluate_on_pool, make_plan


@dataclass
class EvaluateOptions:
    run_dir: str
    trials: list[int] | None = None
    top: int | None = None
    config: str | None = None  # an evaluation config (or a run config with an [evaluation] table)
    cluster: dict[str, Any] = field(default_factory=dict)  # ClusterSettings overrides (workers, address...)
    overrides: dict[str, Any] = field(default_factory=dict)  # `--set` of runtime-only settings
    progress: Callable[[str], None] = print


def open_run(uri: str, *, set_up: bool = True) -> tuple[st.RunDir, dict[str, Any], Any]:
    """The run directory, its manifest and its study; one line when it is not a run with a study
    (`set_up`: also when the run has not finished its setup, which evaluate-front needs)."""
    import optuna

    from ..search.study import open_storage

    run = st.RunDir(uri)
    run.check_access()
    manifest = st.read_manifest(run)
    if manifest is None:
        raise UserError(f"{uri} is not a heretic-dist run directory (no {st.MANIFEST})")
    if set_up and "n_layers" not in manifest:
        raise UserError(f"{uri} has not finished setting up its run yet; start or resume it with heretic-dist run")
    run.pull_journal()
    if not run.journal_path().exists():
        raise UserError(f"{uri} has no study yet; start it with heretic-dist run")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=manifest["run_id"], storage=open_storage(str(run.journal_path())))
    return run, manifest, study


def run_settings(manifest: dict[str, Any], cluster: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None):
    """The run's settings as stored in its manifest, with its response prefix; `overrides` (`--set`)
    may change only runtime-only keys (batch size, devices, engine options, cluster): the candidates
    must be rebuilt exactly as the search scored them."""
    from ..config import Settings, load_settings

    runtime = Settings.runtime_only_fields()
    for key in overrides or {}:
        if key.split(".")[0] not in runtime:
            raise UserError(f"--set {key}: evaluate-front rebuilds the run's trials with the run's own settings; "
                            f"only settings that change no result can be set ({', '.join(sorted(runtime))})")
    layered = {**manifest["settings"], **(overrides or {})}
    layered.update({f"cluster.{k}": v for k, v in (cluster or {}).items() if v is not None})
    settings = load_settings(None, layered)
    return settings.model_copy(update={"response_prefix": manifest.get("response_prefix", "")})


def _judge(settings, evaluation: EvaluationSettings, run: st.RunDir):
    from .cache import JudgementCache
    from .judges import make_judge

    cache = JudgementCache(run, st.JUDGEMENTS)
    return make_judge(evaluation.judge, settings.refusal_markers, settings.response_prefix or "", cache=cache)


def _plan(settings, evaluation, manifest, study, judge, trials, top) -> EvaluationPlan:
    from ..search.front import trial_rows

    rows = trial_rows(study, manifest.get("n_bad_prompts", 0))
    return make_plan(settings, evaluation, manifest, rows, judge.identity(), trials, top)


def evaluate_front(options: EvaluateOptions) -> EvaluationOutcome:
    """evaluate-front: the run's candidates measured on a pool started for it (resumes by key)."""
    from ..distributed.driver import start_ray
    from ..distributed.sizing import reserved, resolve_cluster

    t0 = time.perf_counter()
    run, manifest, study = open_run(options.run_dir)
    settings = run_settings(manifest, options.cluster, options.overrides)
    evaluation = load_evaluation_file(options.config) if options.config else EvaluationSettings()
    run.check_access(write=True)
    with st.RunLock(run):
        judge = _judge(settings, evaluation, run)
        try:
            plan = _plan(settings, evaluation, manifest, study, judge, options.trials, options.top)
            writer = ResultWriter(run, plan.key)
            say = options.progress
            say(describe_plan(plan, writer.done()))
            for note in plan.notes:
                say(f"note: {note}")
            evaluated: list[int] = []
            if any(c.trial not in writer.done() for c in plan.candidates):
                judge_cpus = evaluation.judge.num_cpus if evaluation.judge.name == "classifier" else 0
                cpus, gpus = reserved(settings.cluster)
                started = start_ray(settings.cluster, cpus + judge_cpus, gpus)
                try:
                    request = plan.request
                    settings, replicas = resolve_cluster(
                        settings, request.harmful + request.over_refusal + request.damage,
                        max(settings.max_response_length, evaluation.max_response_length))
                    if replicas is not None:
                        say(f"replicas: {replicas.line}")
                    judge.start()  # a classifier judge loads its model in its actor now, not mid-evaluation
                    evaluated = _with_pool(settings, run, plan, judge, writer, say)
                finally:
                    if started:
                        import ray

                        ray.shutdown()
            stats = judge.stats()
        finally:
            judge.close()
    rows = writer.current()
    reused = [c.trial for c in plan.candidates if c.trial not in evaluated]
    return EvaluationOutcome(rows, evaluated, reused, time.perf_counter() - t0, stats, plan.notes)


def _with_pool(settings, run: st.RunDir, plan: EvaluationPlan, judge, writer: ResultWriter, say) -> list[int]:
    import ray

    from ..distributed.pool import WorkerPool

    cluster = settings.cluster
    t = time.perf_counter()
    pool = WorkerPool(settings.engine, settings, cluster.workers, cluster.cpus_per_worker, cluster.gpus_per_worker)
    try:
        say(f"{pool.size()} workers ready in {time.perf_counter() - t:.1f} s (model loaded once per worker)")
        pool.set_response_prefix(settings.response_prefix or "")
        directions, _, _ = st.load_directions(run)
        pool.set_directions(ray.put(directions))
        return evaluate_on_pool(pool, plan, judge, writer, say)
    finally:
        pool.shutdown()


def evaluate_after_run(pool: Any, settings, run: st.RunDir, say: Callable[[str], None]) -> EvaluationOutcome:
    """`[evaluation] enabled = true`: the search's pool measures its front before it shuts down."""
    t0 = time.perf_counter()
    run_, manifest, study = open_run(run.uri)
    evaluation = settings.evaluation
    judge = _judge(settings, evaluation, run)
    try:
        plan = _plan(settings, evaluation, manifest, study, judge, None, None)
        writer = ResultWriter(run, plan.key)
        say(describe_plan(plan, writer.done()))
        for note in plan.notes:
            say(f"note: {note}")
        judge.start()
        evaluated = evaluate_on_pool(pool, plan, judge, writer, say)
        stats = judge.stats()
    finally:
        judge.close()
    reused = [c.trial for c in plan.candidates if c.trial not in evaluated]
    return EvaluationOutcome(writer.current(), evaluated, reused, time.perf_counter() - t0, stats, plan.notes)


def stored_rows(run: st.RunDir) -> list[dict[str, Any]]:
    """The latest evaluation's rows in a run directory, the base model's first (empty when it has
    none): what report and status show."""
    rows = run.read_parquet(st.EVALUATION) if run.exists(st.EVALUATION) else []
    bases = run.read_parquet(st.EVALUATION_BASE) if run.exists(st.EVALUATION_BASE) else []
    return latest_rows(rows + bases)
