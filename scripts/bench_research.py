"""Research mode's wall time on the demo model (SmolLM2-135M, 30 layers), 1 CPU vs the whole machine.

Two measurements:
- the per-layer CPU work (geometric medians, silhouettes, PaCMAP, then the plots) on the residuals a
  research run stored, as Ray tasks on an embedded cluster of 1 CPU and of every CPU of the machine;
  each in a fresh run directory seeded with those residuals only, so nothing else is reused;
- with --full, also a whole `research` (worker start, residual capture, 30-trial sweep, CPU work) in
  a fresh run directory, on 1 CPU (one worker) and on the whole machine (one 1-CPU worker per CPU).

Usage: python scripts/bench_research.py --residuals RUN_DIR [--config configs/demo.toml] [--full] [--record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchdoc import load_text, machine, now_utc, write_section  # noqa: E402

from heretic_dist.config import load_settings  # noqa: E402
from heretic_dist.research import residuals as res  # noqa: E402
from heretic_dist.research.run import ResearchOptions, research  # noqa: E402


def cpu_phase(settings, source: Path, cpus: int) -> dict[str, float]:
    import ray

    folder = Path(tempfile.mkdtemp(prefix="bench-research-"))
    try:
        (folder / "research").mkdir()
        shutil.copy(source / res.RESIDUALS, folder / res.RESIDUALS)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        t = time.perf_counter()
        out = research(settings, ResearchOptions(run_dir=str(folder), sweep=False, progress=lambda _: None))
        total = time.perf_counter() - t
        ray.shutdown()
        return dict(out.seconds, total=total)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def full_run(settings, cpus: int) -> dict[str, float]:
    """A whole research run in a fresh run directory on an embedded cluster of `cpus` CPUs, with one
    1-CPU model worker per CPU (the model loads are part of the time, as for a user)."""
    import ray

    folder = Path(tempfile.mkdtemp(prefix="bench-research-full-"))
    cluster = settings.cluster.model_copy(update={"workers": cpus, "cpus_per_worker": 1.0})
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        t = time.perf_counter()
        out = research(settings.model_copy(update={"cluster": cluster}),
                       ResearchOptions(run_dir=str(folder), progress=lambda _: None))
        return dict(out.seconds, total=time.perf_counter() - t)
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--residuals", required=True, help="a run directory whose research/ holds residuals")
    parser.add_argument("--full", action="store_true", help="also time a whole research run")
    parser.add_argument("--record", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    settings = load_settings(args.config, {"residual_plot_style": "default"})
    # a fixed prefix keeps the stored residuals valid without a model (the demo model's is empty)
    meta = res.load(__import__("heretic_dist.rundir", fromlist=["RunDir"]).RunDir(args.residuals), {})[2]
    settings = settings.model_copy(update={"response_prefix": meta.get("response_prefix", "")})
    load = load_text()
    everything = len(os.sched_getaffinity(0))
    rows = []
    for cpus in (1, everything):
        s = cpu_phase(settings, Path(args.residuals), cpus)
        rows.append((cpus, s))
        print(f"{cpus} CPU: geometry {s.get('geometry', 0):.1f} s, PaCMAP {s.get('pacmap', 0):.1f} s, "
              f"plots {s.get('plots', 0):.1f} s, total {s['total']:.1f} s", flush=True)
    fulls = [(cpus, full_run(settings, cpus)) for cpus in (1, everything)] if args.full else []
    for cpus, full in fulls:
        print(f"whole research run, {cpus} CPU: {full}", flush=True)
    table = "\n".join(f"| {c} | {s.get('geometry', 0):.1f} | {s.get('pacmap', 0):.1f} | {s.get('plots', 0):.1f} | "
                      f"{s['total']:.1f} |" for c, s in rows)
    full_rows = "\n".join(
        f"| {c} ({c} worker{'s' if c > 1 else ''}) | {f['total']:.0f} | {f.get('residuals', 0):.1f} | "
        f"{f.get('sweep', 0):.1f} | {f.get('geometry', 0):.1f} | {f.get('pacmap', 0):.1f} | {f.get('plots', 0):.1f} |"
        for c, f in fulls)
    full_text = ("" if not fulls else
                 "\nWhole `heretic-dist research` (fresh run directory; embedded cluster of N CPUs, one 1-CPU model "
                 "worker per CPU; the rest of the total is Ray start and the workers' model loads):\n\n"
                 "| CPUs | total s | residual capture s | 30-layer sweep s | geometry s | PaCMAP s | plots s |\n"
                 "|---:|---:|---:|---:|---:|---:|---:|\n" + full_rows + "\n")
    body = f"""## Research mode: 1 CPU vs the whole machine (`scripts/bench_research.py`)

- what: the per-layer CPU work of `heretic-dist research` on SmolLM2-135M (30 layers, 20 + 20 direction
  prompts of configs/demo.toml): geometry table (geometric medians, silhouette) and PaCMAP (one Ray task
  per layer), then 30 PNGs and the GIF (driver), on the stored residuals; embedded Ray cluster of N CPUs
- machine: {machine()}; {load}. Only {everything} cores, shared with other jobs: "the whole machine" is
  {everything} CPUs here, so the speed-up is bounded by {everything}, and other jobs' load counts against it
- reading: at this size (40 points per layer) one layer's PaCMAP or geometry task takes a fraction of a
  second, less than what a second Ray worker process costs (its start and pacmap's import, numba code
  cached on disk after the very first compile, which took ~16 s once); the split over CPUs is for
  upstream-sized prompt sets (400 + 400 per layer, "an hour or more" serially) on many cores, which
  this 2-core machine cannot show
- command: `python scripts/bench_research.py --residuals R{' --full' if fulls else ''} --record`, {now_utc()}

| CPUs | geometry s | PaCMAP s | plots s | total s |
|---:|---:|---:|---:|---:|
{table}
{full_text}"""
    print(body)
    if args.record:
        write_section("bench_research", body)


if __name__ == "__main__":
    main()
