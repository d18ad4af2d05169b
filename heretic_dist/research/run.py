"""`research`: residuals on the workers, then geometry, PaCMAP plots and the direction sweep.

Order of work: the worker pool (one model load per worker) captures the residuals and runs the sweep;
then the pool is shut down and the per-layer CPU work (geometric medians, silhouettes, PaCMAP) runs as
Ray tasks over every CPU of the cluster. Everything goes to research/ in the run directory; a rerun
reuses the stored residuals, embeddings and sweep when what they depend on is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from .. import rundir as st
from ..errors import UserError
from ..prompts import prompt_set_hash
from . import residuals as res

if TYPE_CHECKING:
    from ..config import Settings

GEOMETRY = "research/geometry.parquet"
GEOMETRY_PNG = "research/geometry.png"
SWEEP = "research/sweep.parquet"
SWEEP_PNG = "research/sweep.png"
EMBEDDING = "research/embedding.safetensors"
ANIMATION = "research/animation.gif"
STATE = "research/state.json"
EXTRA_MESSAGE = ("research plots need the research extra: pip install 'heretic-dist[research]' "
                 "(pacmap, scikit-learn); --geometry alone works without it")


def layer_png_name(layer: int) -> str:
    return f"research/layer_{layer:03d}.png"


@dataclass
class ResearchOptions:
    run_dir: str
    geometry: bool = True
    plots: bool = True
    sweep: bool = True
    seed_search: int = 0  # enqueue this many of the best sweep trials into the run's study
    progress: Callable[[str], None] = print


@dataclass
class ResearchOutcome:
    geometry: list[dict[str, Any]] = field(default_factory=list)
    sweep: list[dict[str, Any]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def require_extra() -> None:
    """One line naming what to install when pacmap or scikit-learn is missing."""
    import importlib.util
    import sys

    for name in ("pacmap", "sklearn"):  # looked up, not imported: pacmap's import JIT-compiles (~16 s)
        found = sys.modules[name] is not None if name in sys.modules else importlib.util.find_spec(name) is not None
        if not found:
            raise UserError(EXTRA_MESSAGE)


def _key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def research(settings: Settings, options: ResearchOptions) -> ResearchOutcome:
    from ..distributed.driver import load_prompts, start_ray
    from ..distributed.sizing import reserved, resolve_cluster

    if options.plots:
        require_extra()  # before any expensive work
    prompts = load_prompts(settings)
    run = st.RunDir(options.run_dir)
    run.check_access(write=True)
    run.ensure()
    manifest = st.read_manifest(run) or {}
    say, out = options.progress, ResearchOutcome()
    state = run.read_json(STATE) if run.exists(STATE) else {}
    from ..engine.protocol import engine_class

    expected = {"good_prompts": prompt_set_hash(prompts["good_prompts"]),
                "bad_prompts": prompt_set_hash(prompts["bad_prompts"]),
                "model": json.dumps(engine_class(settings.engine).model_identity(settings), sort_keys=True),
                "winsorization_quantile": str(settings.winsorization_quantile)}
    prefix = settings.response_prefix if settings.response_prefix is not None else manifest.get("response_prefix")
    if prefix is not None:
        expected["response_prefix"] = prefix
    stored = res.load(run, expected)
    eval_key = _key(good=prompt_set_hash(prompts["good_evaluation_prompts"]),
                    bad=prompt_set_hash(prompts["bad_evaluation_prompts"]), residuals=expected,
                    directions=manifest.get("directions_sha256"), settings=settings.result_affecting())
    sweep_cached = options.sweep and state.get("sweep_key") == eval_key and run.exists(SWEEP)
    started = start_ray(settings.cluster, *reserved(settings.cluster))
    try:
        if stored is None or (options.sweep and not sweep_cached):
            sized, replicas = resolve_cluster(settings, [p for ps in prompts.values() for p in ps])
            if replicas is not None:
                say(f"research: replicas: {replicas.line}")
            pool_options = replace(options, sweep=options.sweep and not sweep_cached)
            stored = _with_pool(sized, pool_options, run, prompts, expected, prefix, stored, eval_key, state, out)
        else:
            say("research: residuals loaded from the run directory (not recaptured)")
        if sweep_cached:
            out.sweep = run.read_parquet(SWEEP)
            say("research: sweep loaded from the run directory (not rerun)")
        good, bad, meta = stored
        _cpu_work(settings, options, run, good.numpy(), bad.numpy(), meta, state, out)
    finally:
        if started:
            import ray

            ray.shutdown()
    run.write_json(STATE, state)
    if options.seed_search and out.sweep:
        _seed(run, manifest, out.sweep, options.seed_search, say)
    return out


def _with_pool(settings, options, run, prompts, expected, prefix, stored, eval_key, state, out):
    """Model work on the workers: response prefix, residuals, sweep."""
    from ..distributed.pool import WorkerPool
    from ..engine.protocol import detect_response_prefix

    say, cluster = options.progress, settings.cluster
    t = time.perf_counter()
    pool = WorkerPool(settings.engine, settings, cluster.workers, cluster.cpus_per_worker, cluster.gpus_per_worker)
    try:
        info = pool.info()
        say(f"research: {pool.size()} workers ready in {time.perf_counter() - t:.1f} s; {info['n_layers']} layers")
        if prefix is None and stored is not None:
            prefix = stored[2].get("response_prefix")  # the one the stored residuals were captured after
        if prefix is None:
            sample = prompts["good_prompts"][:100] + prompts["bad_prompts"][:100]

            def generate(p: str) -> list[str]:
                pool.set_response_prefix(p)
                return [r for part in pool.map("prefix_replies", sample) for r in part]

            prefix = detect_response_prefix(generate, settings.chain_of_thought_skips)
            say(f"research: response prefix {prefix!r}")
        pool.set_response_prefix(prefix)
        if stored is None:
            t = time.perf_counter()
            good, bad = res.capture(pool, prompts["good_prompts"]), res.capture(pool, prompts["bad_prompts"])
            res.save(run, good, bad, dict(expected, response_prefix=prefix, n_layers=str(info["n_layers"])))
            out.seconds["residuals"] = time.perf_counter() - t
            say(f"research: residuals of {len(good)} + {len(bad)} prompts captured in "
                f"{out.seconds['residuals']:.1f} s -> {res.RESIDUALS}")
            out.written.append(res.RESIDUALS)
            stored = (good, bad, dict(expected, response_prefix=prefix, n_layers=str(info["n_layers"])))
        if options.sweep:
            _sweep(settings, options, run, pool, prompts, stored, info, eval_key, state, out)
    finally:
        pool.shutdown()
    return stored


def _sweep(settings, options, run, pool, prompts, stored, info, eval_key, state, out):
    import ray
    import torch

    from ..engine.protocol import directions_from_sums
    from ..search.objectives import Shard
    from . import plots
    from .sweep import run_sweep

    t = time.perf_counter()
    if run.exists(st.DIRECTIONS):
        directions, _, _ = st.load_directions(run)
        options.progress("research: sweep uses the run's directions.safetensors")
    else:
        good, bad, _ = stored
        directions = directions_from_sums(good.double().sum(0), len(good), bad.double().sum(0), len(bad),
                                          settings.orthogonalize_direction)
    pool.set_directions(ray.put(torch.as_tensor(directions)))
    pool.set_eval_prompts(prompts["good_evaluation_prompts"], prompts["bad_evaluation_prompts"])
    k = settings.cluster.shards_per_trial
    pool.broadcast_setup("warm_baselines", [Shard(i, k) for i in range(k)])
    rows, base = run_sweep(pool, info["n_layers"], list(info["components"]), k, options.progress)
    out.sweep = rows
    run.write_parquet(SWEEP, [dict(r, params=json.dumps(r["params"]), base_refusals=base["refusals"]) for r in rows])
    run.write_bytes(SWEEP_PNG, plots.sweep_png(rows, base["refusals"], base["bad_scored"], settings.residual_plot_style))
    out.written += [SWEEP, SWEEP_PNG]
    state["sweep_key"] = eval_key
    out.seconds["sweep"] = time.perf_counter() - t
    options.progress(f"research: sweep of {len(rows)} layers in {out.seconds['sweep']:.1f} s -> {SWEEP}")


def _cpu_work(settings, options, run, good, bad, meta, state, out):
    """Geometry and PaCMAP per layer as Ray tasks over every CPU (the pool is gone by now)."""
    import numpy as np

    from . import embedding, plots

    say = options.progress
    n_layers = int(meta.get("n_layers", good.shape[1] - 1))  # rows: embedding output, then one per layer
    layers = list(range(n_layers))
    if options.geometry:
        t = time.perf_counter()
        rows = embedding.geometry_layers([good[:, i + 1] for i in layers], [bad[:, i + 1] for i in layers])
        out.geometry = [dict(layer=i, **r) for i, r in zip(layers, rows)]
        run.write_parquet(GEOMETRY, out.geometry)
        run.write_bytes(GEOMETRY_PNG, plots.geometry_png(out.geometry, "",
                                                         settings.residual_plot_style))
        out.written += [GEOMETRY, GEOMETRY_PNG]
        out.seconds["geometry"] = time.perf_counter() - t
        say(f"research: geometry of {n_layers} layers in {out.seconds['geometry']:.1f} s -> {GEOMETRY}")
    if not options.plots:
        return
    labels = np.array([0] * len(good) + [1] * len(bad))
    key = _key(meta=meta, seed=settings.seed, n_neighbors=embedding.N_NEIGHBORS, align=2)
    t = time.perf_counter()
    if state.get("embedding_key") == key and run.exists(EMBEDDING):
        from safetensors.numpy import load

        points = load(run.read_bytes(EMBEDDING))
        aligned = [points[f"layer_{i:03d}"] for i in layers]
        say("research: embeddings loaded from the run directory (PaCMAP not rerun)")
    else:
        from safetensors.numpy import save

        raw = embedding.embed_layers([np.concatenate([good[:, i + 1], bad[:, i + 1]]) for i in layers],
                                     settings.seed if settings.seed is not None else 0)
        aligned = embedding.align(raw, labels)
        run.write_bytes(EMBEDDING, save({f"layer_{i:03d}": np.ascontiguousarray(a) for i, a in zip(layers, aligned)}))
        state["embedding_key"] = key
        out.written.append(EMBEDDING)
        out.seconds["pacmap"] = time.perf_counter() - t
        say(f"research: PaCMAP of {n_layers} layers in {out.seconds['pacmap']:.1f} s (Ray tasks)")
    t = time.perf_counter()
    frames = []
    for i, points in zip(layers, aligned):
        png = plots.layer_png(points, labels, i, embedding.limits(points), settings.residual_plot_title,
                              settings.residual_plot_style)
        run.write_bytes(layer_png_name(i), png)
        frames.append(png)
    run.write_bytes(ANIMATION, plots.animation_gif(frames))
    out.written += [layer_png_name(i) for i in layers] + [ANIMATION]
    out.seconds["plots"] = time.perf_counter() - t
    say(f"research: {n_layers} layer PNGs and {ANIMATION} in {out.seconds['plots']:.1f} s")


def _seed(run, manifest, rows, n, say) -> None:
    from .sweep import best_layers, seed_study

    if not manifest.get("run_id") or not run.exists(st.JOURNAL):
        say(f"research: --seed-search: {run.uri} has no study yet (start one with heretic-dist run); nothing enqueued")
        return
    best = best_layers(rows, n, len(rows))
    with st.RunLock(run):
        run.pull_journal()
        count = seed_study(str(run.journal_path()), manifest["run_id"], best)
        run.push_journal()
    say(f"research: enqueued {count} sweep trials (layers {', '.join(str(r['layer']) for r in best)}) "
        "as the next trials of the run's search")
