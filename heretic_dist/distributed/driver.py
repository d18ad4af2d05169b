"""The run: manifest, Ray, worker pool, directions map-reduce, base scores, the search, results.

The driver is the only writer of the run directory. The Optuna study in it is the source of truth: the
same command on the same run directory resumes, and the run ends with exactly `n_trials` COMPLETE
trials.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .. import rundir as st
from ..config import ClusterSettings, Settings
from ..engine.protocol import describe_edited, detect_response_prefix, directions_from_sums, engine_class
from ..engine.types import Prompt, Shard
from ..errors import UserError
from ..prompts import load_prompt_set, prompt_set_hash
from ..search.front import mark_fronts, pareto_front, trial_rows
from ..search.objectives import reduce_partials
from .progress import Progress, TrialUpdate
from .sizing import reserved, resolve_cluster

if TYPE_CHECKING:
    from .pool import WorkerPool

log = logging.getLogger("heretic_dist")

PROMPT_SETS = ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")
MANIFEST_VERSION = 1


@dataclass
class RunOptions:
    run_dir: str
    new_run: bool = False
    progress: Callable[[str], None] = print  # one plain line per step
    # per told trial; None: a plain line through `progress` (the CLI draws a live bar on a terminal)
    on_trial: Callable[[TrialUpdate], None] | None = None


@dataclass
class RunOutcome:
    run_id: str
    complete: int
    failed: int
    pareto: list[dict[str, Any]]
    directions_cached: bool
    loads_total: int
    replacements: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    evaluation: list[dict[str, Any]] = field(default_factory=list)  # [evaluation] enabled: its rows


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_prompts(settings: Settings) -> dict[str, list[Prompt]]:
    return {name: load_prompt_set(getattr(settings, name), settings.system_prompt, label=name)
            for name in PROMPT_SETS}


def build_manifest(settings: Settings, prompts: dict[str, list[Prompt]]) -> dict[str, Any]:
    """What defines the run's results. Its hash names the study; a change is refused on resume."""
    return {
        "version": MANIFEST_VERSION,
        "model": engine_class(settings.engine).model_identity(settings),
        "settings": settings.result_affecting(),
        "prompts": {name: {"n": len(p), "sha256": prompt_set_hash(p)} for name, p in prompts.items()},
    }


def _resolve_seed(settings: Settings, old_core: dict[str, Any] | None) -> Settings:
    """An unset seed is drawn once and stored, so that a resume and every worker use the same one."""
    if settings.seed is not None:
        return settings
    seed = (old_core or {}).get("settings", {}).get("seed")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    return settings.model_copy(update={"seed": seed})


def _archive_previous(run: st.RunDir, old_id: str) -> None:
    """--new-run: move the old run's files into archive/<old id>/ instead of deleting anything."""
    names = [st.MANIFEST, st.DIRECTIONS, st.DIRECTIONS_SHA, st.JOURNAL, st.TRIALS, st.PARETO, st.RUN_INFO]
    for name in names:
        if run.exists(name):
            run.write_bytes(f"archive/{old_id}/{name}", run.read_bytes(name))
            run.delete(name)
    if run.is_local and (run.local_path / st.TUNE).exists():
        (run.local_path / st.TUNE).rename(run.local_path / "archive" / old_id / st.TUNE)


# Ray reads this variable once, when `ray` is imported. Off, Ray takes 127.0.0.1 as a new node's IP and
# keeps 127.0.0.1 in an address (its default on Windows and macOS); on (Linux's default), it replaces
# 127.0.0.1 by the machine's network address everywhere, and a node whose IP is not 127.0.0.1 listens on
# all interfaces (GCS, raylet, object manager, workers: Ray 2.60).
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray_loopback():
    """Import Ray with SINGLE_MACHINE_ENV off for this process only: the embedded cluster then listens on
    127.0.0.1 alone, and a driver reaches a cluster at 127.0.0.1:PORT there (batch children join the
    batch's embedded cluster so). Addresses of other hosts are unaffected. Without effect when Ray is
    already imported in this process, or when the variable is set (the user's choice stands)."""
    if "ray" not in sys.modules and SINGLE_MACHINE_ENV not in os.environ:
        os.environ[SINGLE_MACHINE_ENV] = "0"
        try:
            import ray  # noqa: F401
        finally:  # Ray's own processes (raylet, workers) get their node IP as an argument
            del os.environ[SINGLE_MACHINE_ENV]
    import ray

    return ray


def start_ray(cluster: ClusterSettings, needed_cpus: float, needed_gpus: float) -> bool:
    """Join `cluster.address`, or start an embedded local cluster sized to the machine (on 127.0.0.1)."""
    ray = import_ray_loopback()
    from .pool import quiet_ray_env

    quiet_ray_env()
    if ray.is_initialized():
        return False
    common = dict(log_to_driver=False, configure_logging=True, logging_level=logging.ERROR)
    if cluster.address:
        probe_address(cluster.address)
    try:
        if cluster.address:
            ray.init(address=cluster.address, **common)
        else:
            # The raylet starts workers at nice 15; our workers are the compute itself, and at nice 15
            # any other busy process on the machine starves them (upstream runs at normal priority).
            os.environ.setdefault("RAY_worker_niceness", "0")
            cpus = max(os.cpu_count() or 1, 1)
            ray.init(address="local", num_cpus=cpus, include_dashboard=cluster.dashboard,
                     object_store_memory=cluster.object_store_memory_mb * 1024**2, **common)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = cluster.address or "a local cluster"
        raise UserError(f"cannot start or join Ray at {where}: {str(error).splitlines()[0]}") from None
    return True


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """One line within seconds when nothing listens at a host:port Ray address (ray.init would retry
    for minutes, printing the GCS client's log lines). "auto" and unparsable forms are left to Ray."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise UserError(f"no Ray cluster answers at {address} ({reason}): check the address, or start "
                        "a cluster with `ray start --head` (without --address, run starts its own)") from None


def _compute_directions(pool: WorkerPool, prompts: dict[str, list[Prompt]], settings: Settings):
    import torch

    def reduce(parts):
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    good_sum, good_n = reduce(pool.map("residual_sums", prompts["good_prompts"]))
    bad_sum, bad_n = reduce(pool.map("residual_sums", prompts["bad_prompts"]))
    good_sum, bad_sum = torch.as_tensor(good_sum), torch.as_tensor(bad_sum)
    return directions_from_sums(good_sum, good_n, bad_sum, bad_n, settings.orthogonalize_direction)


def _detect_prefix(pool: WorkerPool, prompts: dict[str, list[Prompt]], settings: Settings) -> str:
    """Upstream's rule on the first 100 + 100 direction prompts, generated over all workers."""
    sample = prompts["good_prompts"][:100] + prompts["bad_prompts"][:100]

    def generate(prefix: str) -> list[str]:
        pool.set_response_prefix(prefix)
        return [r for part in pool.map("prefix_replies", sample) for r in part]

    return detect_response_prefix(generate, settings.chain_of_thought_skips)


def _base_scores(pool: WorkerPool, shards: int) -> tuple[int, int, int]:
    """Refusals of the unedited model, on the same shards the trials use (their baselines are warm)."""
    parts = pool.run_sharded("run_trial", [(None, Shard(i, shards)) for i in range(shards)]).results
    reduced = reduce_partials(parts)
    return reduced["refusals"], reduced["bad_scored"], reduced["good_scored"]




@dataclass
class RunContext:
    """What the phases of one run share."""

    settings: Settings
    options: RunOptions
    run_dir: st.RunDir
    prompts: dict[str, list[Prompt]]
    manifest: dict[str, Any]
    run_id: str
    old: dict[str, Any] | None
    t0: float
    lock: st.RunLock | None = None
    pool: WorkerPool | None = None
    info: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""
    digest: str = ""
    directions_cached: bool = False
    base: tuple[int, int, int] = (0, 0, 0)  # base refusals, bad prompts, good prompts
    replica_plan: str = ""  # gpus_per_worker = "auto": what was chosen, in one line

    @property
    def resumed(self) -> bool:
        return self.old is not None

    def say(self, line: str) -> None:
        self.options.progress(line)


def run(settings: Settings, options: RunOptions) -> RunOutcome:
    """Run (or resume) the search described by `settings` in `options.run_dir`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    prompts = load_prompts(settings)  # bad input stops here, before any expensive work
    run_dir = st.RunDir(options.run_dir)
    run_dir.check_access(write=False)
    old = st.read_manifest(run_dir)
    settings = _resolve_seed(settings, old)
    manifest = build_manifest(settings, prompts)
    run_id = st.manifest_hash(manifest)
    changed = old is not None and old.get("run_id") != run_id
    if changed and not options.new_run:
        diff = st.manifest_diff({k: old.get(k) for k in manifest}, manifest)
        raise UserError(
            f"{run_dir.uri} holds a run with different settings ({', '.join(diff) or 'format'}); "
            "run with the old settings to resume it, use another --run-dir, or pass --new-run "
            "to archive it and start fresh")
    cluster = settings.cluster
    if cluster.address:
        probe_address(cluster.address)  # before anything is written to the run directory
    run_dir.check_access(write=True)
    with st.RunLock(run_dir) as lock:
        run_dir.ensure()
        if changed:
            _archive_previous(run_dir, old.get("run_id", "unknown"))
            options.progress(f"archived the previous run {old.get('run_id')} under archive/")
            old = None
        ctx = RunContext(settings, options, run_dir, prompts, manifest, run_id, old, t0, lock=lock)
        started_ray = start_ray(cluster, *reserved(cluster))
        from ray.exceptions import RayTaskError

        from .pool_types import PoolError
        from .pool import cause_text

        try:
            _size_replicas(ctx)
            _write_run_info(ctx, {})  # status and report read n_trials from here while the run goes on
            return _run_with_ray(ctx)
        except RayTaskError as error:  # an engine error outside a trial (setup): one line, no traceback
            raise UserError(f"a model worker failed: {cause_text(error)}") from None
        except PoolError as error:
            raise UserError(f"the worker pool failed: {error}") from None
        finally:
            if started_ray:
                import ray

                ray.shutdown()


def _size_replicas(ctx: RunContext) -> None:
    """gpus_per_worker = "auto": GPUs per worker from the model's size and the cluster (sizing.py)."""
    settings = ctx.settings
    evaluation = settings.evaluation.max_response_length if settings.evaluation.enabled else 0
    prompts = [p for prompt_set in ctx.prompts.values() for p in prompt_set]
    ctx.settings, plan = resolve_cluster(settings, prompts, max(settings.max_response_length, evaluation))
    if plan is not None:
        ctx.replica_plan = plan.line
        ctx.say(f"replicas: {plan.line}")


def _run_with_ray(ctx: RunContext) -> RunOutcome:
    from .pool import WorkerPool

    cluster = ctx.settings.cluster
    ctx.say(f"run {ctx.run_id} in {ctx.run_dir.uri} ({'resuming' if ctx.resumed else 'new'}); "
            f"{cluster.workers} workers x "
            + (f"{cluster.tensor_parallel} tensor-parallel ranks x " if cluster.tensor_parallel > 1 else "")
            + f"{cluster.cpus_per_worker} CPU"
            + (f" x {cluster.gpus_per_worker} GPU" if cluster.gpus_per_worker else "")
            + (f", {cluster.trials_per_worker} trials per worker" if cluster.trials_per_worker > 1 else ""))
    ctx.pool = WorkerPool(ctx.settings.engine, ctx.settings, cluster.workers, cluster.cpus_per_worker,
                          cluster.gpus_per_worker, min_workers=cluster.ready_to_start())
    try:
        ctx.info = ctx.pool.info()
        stats = ctx.pool.stats()
        ready = (f"{stats['workers']} of {cluster.workers} workers ready ({stats['starting']} pending: each joins "
                 "once its node is up and its model loaded)" if stats["starting"] else "workers ready")
        ctx.say(f"{ready}: model loaded once per worker in {ctx.pool.start_seconds:.1f} s; "
                f"{ctx.info['n_layers']} layers, components {', '.join(ctx.info['components'])}")
        for line in describe_edited(ctx.info.get("edited")):
            ctx.say(line)
        if ctx.info.get("unsupported") and not ctx.info.get("edited"):
            ctx.say(f"warning: NOT edited (fused expert tensors): {'; '.join(ctx.info['unsupported'])}")
        _set_up_workers(ctx)
        _write_manifest(ctx)
        summary = _search(ctx)
        outcome = _finish(ctx, summary)
        if ctx.settings.evaluation.enabled and outcome.complete >= ctx.settings.n_trials:
            from ..evaluation.front import evaluate_after_run

            settings = ctx.settings.model_copy(update={"response_prefix": ctx.prefix})
            outcome.evaluation = evaluate_after_run(ctx.pool, settings, ctx.run_dir, ctx.say).rows
        return outcome
    finally:
        ctx.pool.shutdown()


def _set_up_workers(ctx: RunContext) -> None:
    """Response prefix, directions, evaluation prompts, KL baselines, base scores: every worker's setup."""
    import ray

    pool, settings, old = ctx.pool, ctx.settings, ctx.old or {}
    if settings.response_prefix is not None:
        ctx.prefix = settings.response_prefix
    elif "response_prefix" in old:
        ctx.prefix = old["response_prefix"]
    else:
        t = time.perf_counter()
        ctx.prefix = _detect_prefix(pool, ctx.prompts, settings)
        ctx.say(f"response prefix: {ctx.prefix!r} ({time.perf_counter() - t:.1f} s)")
    pool.set_response_prefix(ctx.prefix)
    directions = _directions(ctx)
    pool.set_directions(ray.put(directions))
    pool.set_eval_prompts(ctx.prompts["good_evaluation_prompts"], ctx.prompts["bad_evaluation_prompts"])
    # every worker computes the unedited log-probs of the shards trials use; in the setup log, so
    # replacements warm them too instead of paying inside their first trial
    k = settings.cluster.shards_per_trial
    pool.broadcast_setup("warm_baselines", [Shard(i, k) for i in range(k)])
    if "base_refusals" in old:
        ctx.base = (old["base_refusals"], old["n_bad_prompts"], old["n_good_prompts"])
    else:
        t = time.perf_counter()
        ctx.base = _base_scores(pool, k)
        ctx.say(f"base model: {ctx.base[0]}/{ctx.base[1]} refusals ({time.perf_counter() - t:.1f} s)")


def _directions(ctx: RunContext):
    """Computed once per run (map-reduce over the workers), then always read back from the run dir."""
    ctx.directions_cached = ctx.run_dir.exists(st.DIRECTIONS)
    t = time.perf_counter()
    if ctx.directions_cached:
        directions, _, ctx.digest = st.load_directions(ctx.run_dir)
        ctx.say(f"directions: loaded from the run directory (sha256 {ctx.digest[:12]}), not recomputed")
        return directions
    directions = _compute_directions(ctx.pool, ctx.prompts, ctx.settings)
    ctx.digest = st.save_directions(ctx.run_dir, directions, {
        "run_id": ctx.run_id, "model": str(ctx.manifest["model"]),
        "good_prompts": ctx.manifest["prompts"]["good_prompts"]["sha256"],
        "bad_prompts": ctx.manifest["prompts"]["bad_prompts"]["sha256"],
        "winsorization_quantile": str(ctx.settings.winsorization_quantile),
        "orthogonalize_direction": str(ctx.settings.orthogonalize_direction),
        "response_prefix": ctx.prefix})
    ctx.say(f"directions: computed over {ctx.pool.stats()['workers']} workers in {time.perf_counter() - t:.1f} s "
            f"(sha256 {ctx.digest[:12]})")
    return directions


def _write_manifest(ctx: RunContext) -> None:
    base_refusals, n_bad, n_good = ctx.base
    ctx.run_dir.write_json(st.MANIFEST, dict(
        ctx.manifest, run_id=ctx.run_id, n_layers=ctx.info["n_layers"], components=ctx.info["components"],
        edited=ctx.info.get("edited"),
        response_prefix=ctx.prefix, base_refusals=base_refusals, n_bad_prompts=n_bad, n_good_prompts=n_good,
        directions_sha256=ctx.digest, created=(ctx.old or {}).get("created", _now())))


def _search(ctx: RunContext):
    from ..search.study import open_study
    from .tune import PoolWatch, SearchSpec, run_search

    ctx.run_dir.pull_journal()
    journal = str(ctx.run_dir.journal_path())
    tune_dir = (str(ctx.run_dir.local_path / st.TUNE) if ctx.run_dir.is_local
                else str(ctx.run_dir.journal_path().parent / st.TUNE))
    rows = trial_rows(open_study(journal, ctx.run_id), ctx.base[1])
    done = [(r["refusals"], r["kl"], r["number"]) for r in rows if r["state"] == "COMPLETE"]
    report = ctx.options.on_trial or (lambda update: ctx.say(update.line()))
    progress = Progress(ctx.settings.n_trials, len(done), ctx.base[1], ctx.run_dir, report,
                        pool_stats=ctx.pool.stats, points=done, say=ctx.say,
                        on_pool=lambda stats: _write_run_info(ctx, stats, live=True))
    summary = run_search(ctx.pool, SearchSpec.from_settings(ctx.settings), journal, ctx.run_id, ctx.base[0],
                         ctx.info["n_layers"], ctx.info["components"], tune_dir, on_told=progress.told,
                         callbacks=[PoolWatch(progress)], check=ctx.lock.check if ctx.lock else None)
    progress.pool_changed(ctx.pool.stats())  # notices that came after the last trial
    return summary


def _finish(ctx: RunContext, summary: Any) -> RunOutcome:
    """trials.parquet, pareto.parquet, the journal upload, run_info.json; the outcome to print."""
    from ..search.study import open_study

    study = open_study(str(ctx.run_dir.journal_path()), ctx.run_id)
    rows = mark_fronts(trial_rows(study, ctx.base[1]), study)
    ctx.run_dir.write_parquet(st.TRIALS, rows)
    ctx.run_dir.write_parquet(st.PARETO, [r for r in rows if r["pareto"]])
    ctx.run_dir.push_journal()
    stats = ctx.pool.stats()
    if stats["starting"]:
        ctx.say(f"workers at the end: {stats['workers']} ready, {stats['starting']} still pending "
                f"({', '.join(stats['pending'])})")
    _write_run_info(ctx, stats, rows)
    return RunOutcome(ctx.run_id, summary.complete, summary.failed, pareto_front(rows), ctx.directions_cached,
                      stats["loads_total"], stats["replacements"], time.perf_counter() - ctx.t0,
                      info={"stats": stats, "base_refusals": ctx.base[0], "n_bad": ctx.base[1]})


def _write_run_info(ctx: RunContext, stats: dict[str, Any], rows: list[dict[str, Any]] | None = None,
                    live: bool = False) -> None:
    """run_info.json: the requested n_trials and the cluster at the start; the pool's workers (ready per
    node, pending) when they change; totals after the search."""
    old = st.read_run_info(ctx.run_dir)
    old.pop("pool", None)  # a former session's
    if stats:
        old["pool"] = {"updated": _now(), "ready": stats.get("nodes", {}), "pending": stats.get("pending", [])}
        if live:
            st.write_run_info(ctx.run_dir, old)
            return
    cluster = ctx.settings.cluster
    info = dict(old, started=old.get("started", _now()), updated=_now(), n_trials=ctx.settings.n_trials,
                workers=cluster.workers, shards_per_trial=cluster.shards_per_trial,
                cpus_per_worker=cluster.cpus_per_worker, gpus_per_worker=cluster.gpus_per_worker,
                tensor_parallel=cluster.tensor_parallel, trials_per_worker=cluster.trials_per_worker)
    if ctx.replica_plan:
        info["replica_plan"] = ctx.replica_plan
    import ray

    if ray.is_initialized():  # where this session's driver (and so every trial function) ran
        info["driver_node"] = ray.get_runtime_context().get_node_id()
    if rows is not None:  # the search of this session has ended
        worker_seconds = sum(sum(t.get("edit_s", 0) + t.get("kl_s", 0) + t.get("generation_s", 0)
                                 for t in (r.get("timings") or [])) for r in rows)
        info.update(
            wall_seconds=old.get("wall_seconds", 0.0) + time.perf_counter() - ctx.t0,
            worker_seconds=worker_seconds,
            gpu_hours=worker_seconds * cluster.gpus_per_worker * cluster.tensor_parallel / 3600,
            loads_total=old.get("loads_total", 0) + stats.get("loads_total", 0),
            replacements=old.get("replacements", 0) + stats.get("replacements", 0),
            hosts=sorted({h for r in rows for h in (r.get("hosts") or []) if h}) or [socket.gethostname()])
    st.write_run_info(ctx.run_dir, info)
