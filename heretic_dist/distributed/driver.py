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
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .. import rundir as st
from ..errors import UserError
from ..prompts import load_prompt_set, prompt_set_hash
from ..search.front import mark_fronts, pareto_front, trial_rows

log = logging.getLogger("heretic_dist")

ENGINE = "heretic_dist.engine.engine:Engine"
PROMPT_SETS = ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")
MANIFEST_VERSION = 1


@dataclass
class RunOptions:
    run_dir: str
    new_run: bool = False
    # tests and benchmarks swap in the model-free FakeEngine through this variable
    engine_factory: str = field(default_factory=lambda: os.environ.get("HERETIC_DIST_ENGINE", ENGINE))
    progress: Callable[[str], None] = print


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_prompts(settings) -> dict[str, list]:
    return {name: load_prompt_set(getattr(settings, name), settings.system_prompt, label=name)
            for name in PROMPT_SETS}


def build_manifest(settings, prompts: dict[str, list], engine_factory: str) -> dict[str, Any]:
    """What defines the run's results. Its hash names the study; a change is refused on resume."""
    from ..engine.loading import model_identity

    model = {"fake": engine_factory} if engine_factory != ENGINE else model_identity(
        settings.model, settings.model_commit)
    return {
        "version": MANIFEST_VERSION,
        "model": model,
        "settings": settings.result_affecting(),
        "prompts": {name: {"n": len(p), "sha256": prompt_set_hash(p)} for name, p in prompts.items()},
    }


def _resolve_seed(settings, old_core: dict[str, Any] | None):
    """An unset seed is drawn once and stored, so that a resume and every worker use the same one."""
    if settings.seed is not None:
        return settings
    seed = (old_core or {}).get("settings", {}).get("seed")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    return settings.model_copy(update={"seed": seed})


def _archive_previous(run: st.RunDir, old_id: str) -> None:
    """--new-run: move the old run's files into archive/<old id>/ instead of deleting anything."""
    names = [st.MANIFEST, st.DIRECTIONS, st.DIRECTIONS_SHA, st.JOURNAL, st.TRIALS, st.PARETO, "run_info.json"]
    for name in names:
        if run.exists(name):
            run.write_bytes(f"archive/{old_id}/{name}", run.read_bytes(name))
            run.delete(name)
    if run.is_local and (run.local_path / st.TUNE).exists():
        (run.local_path / st.TUNE).rename(run.local_path / "archive" / old_id / st.TUNE)


def start_ray(cluster, needed_cpus: float, needed_gpus: float) -> bool:
    """Join `cluster.address`, or start an embedded local cluster sized to the machine."""
    import ray

    from .pool import quiet_ray_env

    quiet_ray_env()
    if ray.is_initialized():
        return False
    common = dict(log_to_driver=False, configure_logging=True, logging_level=logging.ERROR)
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


def _compute_directions(pool, prompts, settings):
    import torch

    from ..engine.ablation import directions_from_sums

    def reduce(parts):
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    good_sum, good_n = reduce(pool.map("residual_sums", prompts["good_prompts"]))
    bad_sum, bad_n = reduce(pool.map("residual_sums", prompts["bad_prompts"]))
    good_sum, bad_sum = torch.as_tensor(good_sum), torch.as_tensor(bad_sum)
    return directions_from_sums(good_sum, good_n, bad_sum, bad_n, settings.orthogonalize_direction)


def _detect_prefix(pool, prompts, settings) -> str:
    """Upstream's rule on the first 100 + 100 direction prompts, generated over all workers."""
    from ..engine.passes import detect_response_prefix

    sample = prompts["good_prompts"][:100] + prompts["bad_prompts"][:100]

    def generate(prefix: str) -> list[str]:
        pool.set_response_prefix(prefix)
        return [r for part in pool.map("prefix_replies", sample) for r in part]

    return detect_response_prefix(generate, settings.chain_of_thought_skips)


def _base_scores(pool, shards: int) -> tuple[int, int, int]:
    """Refusals of the unedited model, on the same shards the trials use (their baselines are warm)."""
    from ..engine.types import Shard
    from .search import reduce_partials

    parts = pool.run_sharded("run_trial", [(None, Shard(i, shards)) for i in range(shards)]).results
    reduced = reduce_partials(parts)
    return reduced["refusals"], reduced["bad_scored"], reduced["good_scored"]


def run(settings, options: RunOptions) -> RunOutcome:
    """Run (or resume) the search described by `settings` in `options.run_dir`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    say = options.progress
    t0 = time.perf_counter()
    prompts = load_prompts(settings)  # bad input stops here, before any expensive work
    run_dir = st.RunDir(options.run_dir)
    run_dir.check_access(write=False)
    old = run_dir.read_json(st.MANIFEST) if run_dir.exists(st.MANIFEST) else None
    settings = _resolve_seed(settings, old)
    manifest = build_manifest(settings, prompts, options.engine_factory)
    run_id = st.manifest_hash(manifest)
    if old is not None and old.get("run_id") != run_id:
        old_core = {k: old.get(k) for k in manifest}
        diff = st.manifest_diff(old_core, manifest)
        if not options.new_run:
            raise UserError(
                f"{run_dir.uri} holds a run with different settings ({', '.join(diff) or 'format'}); "
                "run with the old settings to resume it, use another --run-dir, or pass --new-run "
                "to archive it and start fresh")
    cluster = settings.cluster
    run_dir.check_access(write=True)
    with st.RunLock(run_dir):
        run_dir.ensure()
        if old is not None and old.get("run_id") != run_id:
            _archive_previous(run_dir, old.get("run_id", "unknown"))
            say(f"archived the previous run {old.get('run_id')} under archive/")
            old = None
        resumed = old is not None
        started_ray = start_ray(cluster, cluster.workers * cluster.cpus_per_worker,
                                cluster.workers * cluster.gpus_per_worker)
        try:
            return _run_locked(settings, options, run_dir, prompts, manifest, run_id, old, resumed, t0)
        finally:
            if started_ray:
                import ray

                ray.shutdown()


def _run_locked(settings, options, run_dir, prompts, manifest, run_id, old, resumed, t0) -> RunOutcome:
    import ray

    from .pool import WorkerPool
    from .search import SearchSpec, open_study, run_search

    say = options.progress
    cluster = settings.cluster
    say(f"run {run_id} in {run_dir.uri} ({'resuming' if resumed else 'new'}); "
        f"{cluster.workers} workers x {cluster.cpus_per_worker} CPU"
        + (f" x {cluster.gpus_per_worker} GPU" if cluster.gpus_per_worker else ""))
    pool = WorkerPool(options.engine_factory, settings, cluster.workers, cluster.cpus_per_worker,
                      cluster.gpus_per_worker)
    try:
        info = pool.info()
        say(f"workers ready: model loaded once per worker in {pool.start_seconds:.1f} s; "
            f"{info['n_layers']} layers, components {', '.join(info['components'])}")
        if info.get("unsupported"):
            say(f"warning: NOT edited (fused expert tensors): {'; '.join(info['unsupported'])}")

        # response prefix: given, from the manifest of a resumed run, or detected once
        if settings.response_prefix is not None:
            prefix = settings.response_prefix
        elif resumed and "response_prefix" in old:
            prefix = old["response_prefix"]
        else:
            t = time.perf_counter()
            prefix = _detect_prefix(pool, prompts, settings)
            say(f"response prefix: {prefix!r} ({time.perf_counter() - t:.1f} s)")
        pool.set_response_prefix(prefix)

        # directions: computed once per run (map-reduce), then always read back from the run dir
        directions_cached = run_dir.exists(st.DIRECTIONS)
        t = time.perf_counter()
        if directions_cached:
            directions, _, digest = st.load_directions(run_dir)
            say(f"directions: loaded from the run directory (sha256 {digest[:12]}), not recomputed")
        else:
            directions = _compute_directions(pool, prompts, settings)
            digest = st.save_directions(run_dir, directions, {
                "run_id": run_id, "model": str(manifest["model"]),
                "good_prompts": manifest["prompts"]["good_prompts"]["sha256"],
                "bad_prompts": manifest["prompts"]["bad_prompts"]["sha256"],
                "winsorization_quantile": str(settings.winsorization_quantile),
                "orthogonalize_direction": str(settings.orthogonalize_direction),
                "response_prefix": prefix})
            say(f"directions: computed over {pool.size()} workers in {time.perf_counter() - t:.1f} s "
                f"(sha256 {digest[:12]})")
        pool.set_directions(ray.put(directions))
        pool.set_eval_prompts(prompts["good_evaluation_prompts"], prompts["bad_evaluation_prompts"])
        # every worker computes the unedited log-probs of the shards trials use; in the setup log, so
        # replacements warm them too instead of paying inside their first trial
        from ..engine.types import Shard

        k = cluster.shards_per_trial
        pool.broadcast_setup("warm_baselines", [Shard(i, k) for i in range(k)])

        if resumed and "base_refusals" in old:
            base_refusals, n_bad, n_good = old["base_refusals"], old["n_bad_prompts"], old["n_good_prompts"]
        else:
            t = time.perf_counter()
            base_refusals, n_bad, n_good = _base_scores(pool, cluster.shards_per_trial)
            say(f"base model: {base_refusals}/{n_bad} refusals ({time.perf_counter() - t:.1f} s)")
        full_manifest = dict(manifest, run_id=run_id, n_layers=info["n_layers"], components=info["components"],
                             response_prefix=prefix, base_refusals=base_refusals, n_bad_prompts=n_bad,
                             n_good_prompts=n_good, directions_sha256=digest,
                             created=(old or {}).get("created", _now()))
        run_dir.write_json(st.MANIFEST, full_manifest)

        run_dir.pull_journal()
        journal = str(run_dir.journal_path())
        tune_dir = (str(run_dir.local_path / st.TUNE) if run_dir.is_local
                    else str(run_dir.journal_path().parent / st.TUNE))
        from optuna.trial import TrialState

        complete = sum(t.state == TrialState.COMPLETE for t in open_study(journal, run_id).get_trials(deepcopy=False))
        progress = Progress(settings.n_trials, complete, n_bad, say, run_dir)
        spec = SearchSpec.from_settings(settings)
        summary = run_search(pool, settings, journal, run_id, base_refusals, info["n_layers"],
                             info["components"], tune_dir, on_told=progress.told, spec=spec)
        study = open_study(journal, run_id)
        rows = mark_fronts(trial_rows(study, n_bad), study)
        front = pareto_front(rows)
        run_dir.write_parquet(st.TRIALS, rows)
        run_dir.write_parquet(st.PARETO, [r for r in rows if r["pareto"]])
        run_dir.push_journal()
        stats = pool.stats()
        run_info = _run_info(run_dir, settings, rows, time.perf_counter() - t0, stats)
        run_dir.write_json("run_info.json", run_info)
        return RunOutcome(run_id, summary.complete, summary.failed, front, directions_cached,
                          stats["loads_total"], stats["replacements"], time.perf_counter() - t0,
                          info={"stats": stats, "base_refusals": base_refusals, "n_bad": n_bad})
    finally:
        pool.shutdown()


def _run_info(run_dir, settings, rows, seconds: float, stats: dict) -> dict[str, Any]:
    old = run_dir.read_json("run_info.json") if run_dir.exists("run_info.json") else {}
    worker_seconds = sum(sum(t.get("edit_s", 0) + t.get("kl_s", 0) + t.get("generation_s", 0)
                             for t in (r.get("timings") or [])) for r in rows)
    cluster = settings.cluster
    return {
        "started": old.get("started", _now()),
        "updated": _now(),
        "wall_seconds": old.get("wall_seconds", 0.0) + seconds,
        "workers": cluster.workers,
        "shards_per_trial": cluster.shards_per_trial,
        "cpus_per_worker": cluster.cpus_per_worker,
        "gpus_per_worker": cluster.gpus_per_worker,
        "worker_seconds": worker_seconds,
        "gpu_hours": worker_seconds * cluster.gpus_per_worker / 3600,
        "n_trials": settings.n_trials,
        "loads_total": old.get("loads_total", 0) + stats.get("loads_total", 0),
        "replacements": old.get("replacements", 0) + stats.get("replacements", 0),
        "hosts": sorted({h for r in rows for h in (r.get("hosts") or []) if h}) or [socket.gethostname()],
    }


class Progress:
    """One plain line per finished trial (with ETA), and the journal upload after each trial."""

    def __init__(self, n_trials: int, complete: int, n_bad: int, say: Callable[[str], None], run_dir):
        self.n_trials, self.complete, self.n_bad, self.say, self.run_dir = n_trials, complete, n_bad, say, run_dir
        self.start = time.perf_counter()
        self.done_here = 0

    def told(self, trial) -> None:
        from optuna.trial import TrialState

        try:
            self.run_dir.push_journal()
        except UserError as error:  # the next push retries; the local cache keeps the trial
            log.warning("journal upload failed: %s", error)
        a = trial.user_attrs
        if trial.state != TrialState.COMPLETE:
            self.say(f"trial {trial.number}: FAILED: {a.get('fail_reason', 'unknown reason')}")
            return
        self.done_here += 1
        self.complete += 1
        per_trial = (time.perf_counter() - self.start) / self.done_here
        eta = max(self.n_trials - self.complete, 0) * per_trial
        self.say(f"[{self.complete}/{self.n_trials}] trial {trial.number}: refusals {a.get('refusals')}/"
                 f"{self.n_bad}, KL {a.get('kl', 0.0):.4f}, {a.get('trial_seconds', 0.0):.1f} s; "
                 f"ETA {eta / 60:.1f} min")
