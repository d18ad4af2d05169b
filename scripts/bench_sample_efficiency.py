#!/usr/bin/env python
"""Sample efficiency of the search when trials run in parallel: the optimizer alone, no model.

Question: heretic-dist can use W workers either trial-parallel (P = W trials in flight, TPE with or
without `constant_liar`) or prompt-sharded (K = W workers score one trial, 1 trial in flight). How much
Pareto-front quality per trial does each give up against a plain sequential search?

Sampler (identical to production, `heretic_dist.search.study.make_sampler`):
  TPESampler(n_startup_trials=60, n_ei_candidates=128, multivariate=True, seed=s, constant_liar=on|off),
  two objectives, both minimized, 200 trials, seeds 0..9.

Search space: ALGORITHM.md section 3 with L = 23 (a 24-layer model), same names, ranges and order as
`suggest_params`: direction_scope {global, per layer}; direction_index [0.4L, 0.9L]; for c in
{attn.o_proj, mlp.down_proj}: c.max_weight [0.8, 1.5], c.max_weight_position [0.6L, 1.0L],
c.min_weight [0, 1], c.min_weight_distance [1, 0.6L]. (Checked against `suggest_params` when the
package imports.)

Test function (an inverted DTLZ2: a known, convex trade-off like refusals vs KL). With every float
rescaled to u in [0, 1] over its range (mw = max_weight, pos = max_weight_position, mwf = min_weight,
dist = min_weight_distance; suffix a = attn.o_proj, m = mlp.down_proj; idx = direction_index):
  strength  t = 0.6 mw_a + 0.4 mw_m                                                        (0..1)
  distance  g = 6 [ (pos_a - 0.55)^2 + 0.8 (pos_m - (0.35 + 0.3 pos_a))^2
                    + 0.5 (mwf_a - 0.3)^2 + 0.5 (dist_a - 0.7)^2 + 0.5 (mwf_m - (1 - dist_m))^2 + h ]
            h = 1.2 (idx - (0.25 + 0.3 pos_a))^2  for "global";   h = 0.06  for "per layer"
  refusal-like  f1 = (1 + g) (1 - sin(t pi/2))   (a stronger edit refuses less ...)
  KL-like       f2 = (1 + g) (1 - cos(t pi/2))   (... and damages more)
The Pareto front is g = 0, t in [0, 1]: the quarter circle (1 - f1)^2 + (1 - f2)^2 = 1 from (1, 0) to
(0, 1), bulging towards the origin (a knee, as real refusal/KL fronts have). Every parameter matters:
the two max_weights move along the front; the other eight set the distance to it, with interactions
(the MLP peak and the best direction index follow the attention peak; mlp min_weight must match its
distance) that multivariate TPE can model; the categorical matters: "global" beats "per layer" only
with a direction index within ~0.22 (in u) of its optimum. A random trial has g ~ 2, so reaching the
front takes search: the scale 6 is chosen so that the model matters (pure random search, printed with
the table, reaches ~85-93 % of sequential TPE's median hypervolume at 200 trials; with scale 3 it
reached ~97 %, and a benchmark where TPE barely beats random cannot show what parallelism costs TPE).
Caveat seen in the runs: multi-objective TPE converges on a narrow band of the front rather than
spreading along it, so its lead over random search is modest and seed-to-seed spread is large; use
--seeds 40 before reading differences of a few percent.
Noise (mild, deterministic per seed and trial number): f1 is multiplied by (1 + 0.02 z) and rounded to
1/100 (refusals counted on 100 prompts); f2 is multiplied by exp(0.05 z). As in production, the study
is told upstream 1.4.0's objectives (ALGORITHM.md section 5, base refusals 1, KL scale 1, KL target
0.01): (f1, f2), or (f1, 0.01 f1) when f2 < 0.01; the hypervolume is taken over the raw (f1, f2).

Metric: hypervolume of the observed Pareto front of the first N completed trials (N = 100 and 200, in
completion order), on the objectives as they are (the true front already spans [0, 1] on both axes,
so the normalization is the identity), reference point (1.1, 1.1); points outside the reference box add
nothing. The best possible value (the true front, noise-free) is printed for scale.

Parallelism is simulated with Optuna's ask/tell exactly as Ray Tune's OptunaSearch drives the study:
P trials are asked (params suggested at once, define-by-run, so they are RUNNING with params) and kept
in flight at all times; each trial gets a random duration, uniform in [0.5, 1.5] (its own RNG stream
per seed, the same for every configuration), the one that finishes first is told and a new one asked at
that moment, until N trials are asked; then the rest drain. Finishing order is therefore not FIFO, as
on a cluster where generation length varies per trial. With constant_liar on, TPE sees RUNNING trials
(as the worst values); off, it ignores them, so it may suggest near-duplicates.

Prompt sharding (K workers score one trial, 1 in flight) gives exactly the sequential trial sequence:
it changes only the latency per trial, not which trials TPE sees, so its row is the sequential result.
A W-worker cluster split as P trials x K shards (P K = W) has the sample efficiency of the "P in flight"
row: 8 workers as 8x1, 4x2, 2x4 or 1x8 are the rows P = 8, 4, 2 and sequential.

Usage:
  python scripts/bench_sample_efficiency.py [--seeds 10] [--trials 200] [--startup 60]
      [--candidates 128] [--in-flight 2,4,8] [--jobs 2] [--record]

With --record, the table goes into docs/benchmarks.md, in this script's own section (between the
<!-- bench_sample_efficiency:start/end --> comments), one subsection per command.

Cost: one TPE ask at ~200 trials (multivariate, 128 candidates) takes ~20-60 ms here, so one 200-trial
study takes ~5 s; the default run (7 configurations x 10 seeds) takes ~4 minutes on 2 cores with
--jobs 2, --seeds 40 about four times that. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import math
import multiprocessing as mp
import os
import platform
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchdoc import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
DOC_HEADER = "Every number here comes from a script in scripts/.\n"
MARK = "bench_sample_efficiency"
TITLE = "## Sample efficiency of parallel TPE (optimizer only, test function)"

N_LAYERS = 24  # a 24-layer model: L = 23
COMPONENTS = ("attn.o_proj", "mlp.down_proj")
REF = np.array([1.1, 1.1])
KL_TARGET = 0.01  # upstream 1.4.0's kl_divergence_target (ALGORITHM.md section 5)


# --------------------------------------------------------------------------------------------- space

def space(n_layers: int = N_LAYERS) -> dict[str, optuna.distributions.BaseDistribution]:
    """ALGORITHM.md section 3 (upstream 1.4.0 ranges, MLP off not allowed), in suggest order."""
    last = n_layers - 1
    d: dict[str, optuna.distributions.BaseDistribution] = {
        "direction_scope": CategoricalDistribution(["global", "per layer"]),
        "direction_index": FloatDistribution(0.4 * last, 0.9 * last),
    }
    for c in COMPONENTS:
        d[f"{c}.max_weight"] = FloatDistribution(0.8, 1.5)
        d[f"{c}.max_weight_position"] = FloatDistribution(0.6 * last, 1.0 * last)
        d[f"{c}.min_weight"] = FloatDistribution(0.0, 1.0)
        d[f"{c}.min_weight_distance"] = FloatDistribution(1.0, 0.6 * last)
    return d


def check_space_against_package() -> str:
    """Compare `space()` with heretic_dist's define-by-run space; returns a one-line verdict."""
    try:
        sys.path.insert(0, str(REPO))
        from heretic_dist.search.space import suggest_params
    except Exception as exc:  # noqa: BLE001 - the benchmark does not need the package
        return f"not checked against heretic_dist.search.space.suggest_params ({type(exc).__name__}: {exc})"
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    suggest_params(trial, N_LAYERS)
    theirs = study.trials[-1].distributions
    ours = space()
    if theirs != ours:
        raise SystemExit(f"search space differs from suggest_params:\n ours   {ours}\n theirs {theirs}")
    return "identical to heretic_dist.search.space.suggest_params(n_layers=24)"


# ----------------------------------------------------------------------------------- test function

def _u(x: float, lo: float, hi: float) -> float:
    return (x - lo) / (hi - lo)


def objectives_clean(p: dict) -> tuple[float, float, float, float]:
    """(f1, f2, strength t, distance g) without noise; see the module docstring."""
    last = N_LAYERS - 1
    a, m = COMPONENTS
    mw_a, mw_m = _u(p[f"{a}.max_weight"], 0.8, 1.5), _u(p[f"{m}.max_weight"], 0.8, 1.5)
    pos_a = _u(p[f"{a}.max_weight_position"], 0.6 * last, 1.0 * last)
    pos_m = _u(p[f"{m}.max_weight_position"], 0.6 * last, 1.0 * last)
    mwf_a, mwf_m = p[f"{a}.min_weight"], p[f"{m}.min_weight"]
    dist_a = _u(p[f"{a}.min_weight_distance"], 1.0, 0.6 * last)
    dist_m = _u(p[f"{m}.min_weight_distance"], 1.0, 0.6 * last)
    t = 0.6 * mw_a + 0.4 * mw_m
    if p["direction_scope"] == "global":
        h = 1.2 * (_u(p["direction_index"], 0.4 * last, 0.9 * last) - (0.25 + 0.3 * pos_a)) ** 2
    else:
        h = 0.06
    g = 6.0 * ((pos_a - 0.55) ** 2 + 0.8 * (pos_m - (0.35 + 0.3 * pos_a)) ** 2
               + 0.5 * (mwf_a - 0.3) ** 2 + 0.5 * (dist_a - 0.7) ** 2 + 0.5 * (mwf_m - (1 - dist_m)) ** 2
               + h)
    f1 = (1.0 + g) * (1.0 - math.sin(t * math.pi / 2))
    f2 = (1.0 + g) * (1.0 - math.cos(t * math.pi / 2))
    return f1, f2, t, g


def told(values: tuple[float, float]) -> tuple[float, float]:
    """What the study is told: upstream 1.4.0's objectives (ALGORITHM.md section 5) with base refusals
    1.0 and kl_divergence_scale 1: below the KL target the second objective is refusals x target."""
    f1, f2 = values
    return (f1, f2) if f2 >= KL_TARGET else (f1, f1 * KL_TARGET)


def objectives(p: dict, seed: int, number: int) -> tuple[float, float]:
    f1, f2, _, _ = objectives_clean(p)
    z = np.random.default_rng([seed, number, 17]).standard_normal(2)
    f1 = round(100.0 * max(f1 * (1.0 + 0.02 * z[0]), 0.0)) / 100.0
    f2 = f2 * math.exp(0.05 * z[1])
    return f1, f2


# ------------------------------------------------------------------------------------- hypervolume

def hypervolume_2d(points: np.ndarray, ref: np.ndarray = REF) -> float:
    """Area dominated by `points` (minimization) inside the box below `ref`."""
    pts = points[np.all(points < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]  # by f1, then f2
    hv, best_f2 = 0.0, ref[1]
    for f1, f2 in pts:
        if f2 < best_f2:
            hv += (ref[0] - f1) * (best_f2 - f2)
            best_f2 = f2
    return float(hv)


def true_front_hypervolume(ref: np.ndarray = REF, n: int = 20001) -> float:
    t = np.linspace(0.0, 1.0, n)
    front = np.stack([1 - np.sin(t * np.pi / 2), 1 - np.cos(t * np.pi / 2)], axis=1)
    return hypervolume_2d(front, ref)


# -------------------------------------------------------------------------------------- simulation

def run_one(job: tuple) -> dict:
    """One study: `in_flight` trials pending at all times; returns values in completion order."""
    name, in_flight, liar, seed, n_trials, startup, candidates = job
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sampler = optuna.samplers.TPESampler(
        n_startup_trials=startup, n_ei_candidates=candidates, multivariate=True,
        seed=seed, constant_liar=liar,
    )
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    dist = space()
    durations = np.random.default_rng([seed, 7919]).uniform(0.5, 1.5, size=n_trials)
    t0 = time.perf_counter()
    ask_s: list[float] = []
    pending: list[tuple[float, int, optuna.Trial]] = []  # (finish time, number, trial)
    done: list[tuple[float, float]] = []
    asked, now = 0, 0.0

    def ask() -> None:
        nonlocal asked
        s = time.perf_counter()
        trial = study.ask(fixed_distributions=dist)  # params suggested now, as OptunaSearch does
        ask_s.append(time.perf_counter() - s)
        heapq.heappush(pending, (now + durations[asked], trial.number, trial))
        asked += 1

    while asked < min(in_flight, n_trials):
        ask()
    while pending:
        now, number, trial = heapq.heappop(pending)
        values = objectives(trial.params, seed, number)
        study.tell(trial, told(values))
        done.append(values)
        if asked < n_trials:
            ask()
    return {
        "name": name, "seed": seed, "values": np.array(done),
        "seconds": time.perf_counter() - t0,
        "ask_late_ms": 1000.0 * float(np.mean(ask_s[-20:])),
        "makespan": now,
    }


# ---------------------------------------------------------------------------------------- report

def stats(xs: list[float]) -> tuple[float, float]:
    q1, med, q3 = np.percentile(xs, [25, 50, 75])
    return float(med), float(q3 - q1)


def build_table(results: dict[str, list[dict]], configs: list[tuple], checkpoints: list[int],
                n_seeds: int) -> str:
    best = true_front_hypervolume()
    hv = {name: {n: [hypervolume_2d(r["values"][:n]) for r in sorted(rs, key=lambda r: r["seed"])]
                 for n in checkpoints} for name, rs in results.items()}
    seq = "sequential"
    lines = []
    head = f"{'configuration':<40}"
    for n in checkpoints:
        head += f" | {'HV@' + str(n) + ' median':>14} {'IQR':>6} {'vs seq':>7} {'paired':>7} {'>=95%':>6}"
    lines.append(head)
    lines.append("-" * len(head))

    def row(label: str, name: str) -> str:
        s = f"{label:<40}"
        for n in checkpoints:
            med, iqr = stats(hv[name][n])
            rel = med / stats(hv[seq][n])[0]
            paired = float(np.median([a / b for a, b in zip(hv[name][n], hv[seq][n])]))
            ok = sum(a >= 0.95 * b for a, b in zip(hv[name][n], hv[seq][n]))
            s += f" | {med:>14.4f} {iqr:>6.4f} {rel:>7.1%} {paired:>7.1%} {f'{ok}/{n_seeds}':>6}"
        return s

    for name, in_flight, liar in configs:
        lines.append(row(name, name))
        if name == seq:
            lines.append(row("prompt-sharded (K workers, 1 in flight)", seq) + "  (= sequential)")
    lines.append("")
    lines.append(f"HV = hypervolume of the observed Pareto front, reference (1.1, 1.1); true front (best "
                 f"possible) {best:.4f}.\n'vs seq' = median / sequential median; 'paired' = median over seeds of "
                 f"HV / sequential's HV with the same seed (same sampler seed, so the same 60 start-up trials); "
                 f"'>=95%' = seeds where that ratio is >= 95%.")
    rnd = [hypervolume_2d(random_values(s, checkpoints[-1])) for s in range(n_seeds)]
    lines.append(f"Reference: pure random search, {checkpoints[-1]} trials: median HV {stats(rnd)[0]:.4f} "
                 f"({stats(rnd)[0] / stats(hv[seq][checkpoints[-1]])[0]:.1%} of sequential TPE).")
    cost = {name: (np.median([r["seconds"] for r in rs]), np.median([r["ask_late_ms"] for r in rs]))
            for name, rs in results.items()}
    lines.append("Cost per study (median over seeds): " + "; ".join(
        f"{name}: {s:.0f} s, {ms:.0f} ms/ask at the end" for name, (s, ms) in cost.items()) + ".")
    return "\n".join(lines)


def random_values(seed: int, n: int) -> np.ndarray:
    sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    out = []
    for _ in range(n):
        trial = study.ask(fixed_distributions=space())
        v = objectives(trial.params, seed, trial.number)
        study.tell(trial, told(v))
        out.append(v)
    return np.array(out)


WHAT = (
    "What: Optuna TPE alone (production settings: multivariate, 128 EI candidates, 60 start-up trials) "
    "on a noisy two-objective test function with heretic-dist's 10-parameter space (L = 23); "
    "Pareto-front hypervolume after 100 and 200 completed trials, sequential vs. P trials in flight with "
    "constant liar on/off (simulated with ask/tell, random trial durations). Prompt sharding keeps 1 "
    "trial in flight, so it equals sequential; a W-worker cluster split P trials x K shards has the "
    "sample efficiency of the 'P in flight' row. Details in the script's docstring. One subsection per "
    "command; `--record` replaces the subsection of the same command."
)


def record(command: str, table: str, args, wall: float) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    run = "\n".join([
        f"### `{command}`",
        "",
        f"- Machine: {cpu_model()}, {cores} cores usable (shared with other jobs), {args.jobs} processes; "
        f"Python {platform.python_version()}, optuna {optuna.__version__}, numpy {np.__version__}",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; wall {wall / 60:.1f} min",
        "",
        "```",
        table,
        "```",
    ])
    text = DOC.read_text() if DOC.exists() else DOC_HEADER
    pattern = re.compile(rf"(^{re.escape(TITLE)}\n)?<!-- {MARK}:start -->\n(.*?)<!-- {MARK}:end -->\n?",
                         re.S | re.M)
    found = pattern.search(text)
    runs: list[str] = []
    if found:  # keep the other commands' runs
        old = found.group(2)
        runs = ["### " + r.strip("\n") for r in re.split(r"^### ", old, flags=re.M)[1:]]
        runs = [r for r in runs if not r.startswith(f"### `{command}`")]
    runs.append(run)
    body = "\n".join([TITLE, f"<!-- {MARK}:start -->", "", WHAT, "", "\n\n".join(runs), "",
                      f"<!-- {MARK}:end -->", ""])
    if found:
        text = text[:found.start()] + body + text[found.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + body
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_name(DOC.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, DOC)
    print(f"recorded in {DOC}", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--startup", type=int, default=60)
    p.add_argument("--candidates", type=int, default=128, help="n_ei_candidates (production: 128)")
    p.add_argument("--in-flight", default="2,4,8", help="comma-separated P values besides sequential")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (at most the cores you may use)")
    p.add_argument("--record", action="store_true", help=f"write the table into {DOC.relative_to(REPO)}")
    args = p.parse_args()
    command = "python scripts/bench_sample_efficiency.py " + shlex.join(sys.argv[1:])
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    print(f"search space: {check_space_against_package()}", file=sys.stderr, flush=True)

    configs: list[tuple[str, int, bool]] = [("sequential", 1, False)]
    for P in (int(x) for x in args.in_flight.split(",") if x.strip()):
        configs.append((f"{P} in flight, constant liar", P, True))
        configs.append((f"{P} in flight, no liar", P, False))
    jobs = [(name, P, liar, seed, args.trials, args.startup, args.candidates)
            for seed in range(args.seeds) for name, P, liar in configs]
    checkpoints = sorted({min(100, args.trials), args.trials})
    results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    t0 = time.perf_counter()
    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
    with ctx.Pool(processes=max(1, args.jobs)) as pool:
        for i, r in enumerate(pool.imap_unordered(run_one, jobs), 1):
            results[r["name"]].append(r)
            el = time.perf_counter() - t0
            print(f"[{i}/{len(jobs)} {el / 60:5.1f} min, ~{el / i * (len(jobs) - i) / 60:.0f} min left] "
                  f"{r['name']}, seed {r['seed']}: HV@{args.trials} {hypervolume_2d(r['values']):.4f} "
                  f"({r['seconds']:.0f} s, {r['ask_late_ms']:.0f} ms/ask at the end)",
                  file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    table = (f"{args.trials} trials, {args.startup} start-up, n_ei_candidates {args.candidates}, "
             f"multivariate TPE, seeds 0..{args.seeds - 1}\n"
             + build_table(results, configs, checkpoints, args.seeds))
    print(f"$ {command}")
    print(table)
    if args.record:
        record(command, table, args, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
