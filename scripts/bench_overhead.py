#!/usr/bin/env python
"""Driver overhead per trial: the real search path (Ray Tune + StudySearch + WorkerPool) with the
zero-cost FakeEngine, so whatever time a trial takes is the machinery's.

Usage:
  python scripts/bench_overhead.py [--trials 200] [--workers 2] [--shards 1] [--startup 60]
      [--env KEY=VALUE ...] [--profile FILE] [--max-load 1.5] [--wait 900] [--record]

It calls `heretic_dist.distributed.driver.run` (the function behind `heretic-dist run`) with a Settings built
here (model "fake", 20 + 20 scoring prompts, production sampler: multivariate TPE, 128 EI candidates,
60 start-up trials, constant liar) and engine = "fake" (heretic_dist/testing/fake.py), run
directory in a temp folder. P = workers / shards trials are in flight. Timestamps come from the study
(the source of truth) and from a Tune callback added to the search (controller side); nothing else is
changed. Definitions (all per COMPLETE trial):

  (a) in-function overhead = trial_seconds (user attr: wall time of evaluate_trial inside the Tune
      trial function) - the engine's time (max over the trial's shards of edit_s + kl_s + generation_s,
      user attr `timings`). This is attach + decode + lease + the Ray calls to the worker + reduce.
  (b) controller overhead per slot = the time a trial slot is NOT inside the trial function:
      (tell of this trial) - (tell of the previous trial on the same slot) - trial_seconds of this
      trial. A slot is one Tune trial process (`trial_pid` user attr; actors are reused). It has two
      parts, also shown: tell(prev) -> ask(this) (Optuna datetime_complete -> datetime_start: Tune
      asking the searcher, TPE included) and ask(this) -> tell(this) - trial_seconds (starting the
      function on the reused actor, shipping its result back, Tune's result processing, the tell).
      Also shown: inter-completion time (gaps between consecutive tells over all slots) x P.
  (c) throughput: wall time / n_trials x P, for the steady state (first tell -> last tell, over
      n_trials - 1) and for the whole search phase (run_search: Tune start-up and shutdown included);
      the start-up latency (first ask -> first tell: Tune starting its trial actors) is shown apart.
  TOTAL = slot cycle - engine time = (a) + (b): what the machinery adds to each trial on a slot. The
  driver is one process: with P slots its own per-trial work (ask, tell) is shared by the slots.

  TPE ask alone: optuna's TPESampler as the search builds it (multivariate, 128 EI candidates, 60
  start-up, constant liar, P - 1 trials RUNNING) on an in-memory copy of the finished study, at several
  study sizes; and on a copy of the run's JournalStorage file. This cost is in (b) and in any
  Optuna-based driver, upstream's sequential loop too.

--presample on|off sets `[cluster] presample` (default on: the TPE ask for a slot's next trial runs on
a background thread while trials run, and the searcher's suggest on the controller's thread only
collects it). "ask" in (b) is the moment Tune calls the searcher's suggest, not the Optuna ask.

--profile FILE runs the driver under cProfile and prints where the driver process spends its time.
--env KEY=VALUE sets an environment variable before Ray and Tune are imported (to try Tune knobs).
--record writes the section `bench_overhead` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _benchdoc as bd  # noqa: E402

TARGET_MS = 50.0

CONFIG = """
model = "fake"
engine = "fake"
n_trials = {trials}
n_startup_trials = {startup}
seed = 1
max_response_length = 8
[good_prompts]
dataset = "builtin:demo_harmless"
split = "[:10]"
[bad_prompts]
dataset = "builtin:demo_harmful"
split = "[:10]"
[good_evaluation_prompts]
dataset = "builtin:demo_harmless"
split = "[20:40]"
[bad_evaluation_prompts]
dataset = "builtin:demo_harmful"
split = "[20:40]"
[cluster]
workers = {workers}
cpus_per_worker = 1
shards_per_trial = {shards}
object_store_memory_mb = 100
presample = {presample}
[engine_options]
fake_trial_seconds = {trial_seconds}
"""


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def row(name: str, values_s: list[float]) -> str:
    ms = [v * 1000 for v in values_s]
    if not ms:
        return f"{name:<58} (no data)"
    return (f"{name:<58} p50 {pct(ms, 50):8.1f}  p90 {pct(ms, 90):8.1f}  p99 {pct(ms, 99):8.1f}  "
            f"mean {statistics.fmean(ms):8.1f}  max {max(ms):8.1f}  (n={len(ms)})")


class Stamps:
    """Tune callback (built lazily so Ray is imported after --env): controller-side timestamps."""

    def __init__(self):
        from ray.tune import Callback

        stamps = self.by_tune_id = defaultdict(dict)

        class _CB(Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                stamps[trial.trial_id]["tune_start"] = time.time()

            def on_trial_result(self, iteration, trials, trial, result, **info):
                stamps[trial.trial_id].setdefault("tune_result", time.time())

            def on_trial_complete(self, iteration, trials, trial, **info):
                stamps[trial.trial_id]["tune_complete"] = time.time()

        self.callback = _CB()


def run_driver(args, run_root: Path):
    """driver.run with the search phase timed and a Tune callback added. Returns facts."""
    from heretic_dist.config import load_settings
    from heretic_dist.distributed import driver
    from heretic_dist.distributed import tune as search

    cfg = run_root / "bench.toml"
    cfg.write_text(CONFIG.format(trials=args.trials, startup=args.startup, workers=args.workers,
                                 shards=args.shards, trial_seconds=args.trial_seconds,
                                 presample=str(args.presample == "on").lower()))
    settings = load_settings(cfg)
    stamps = Stamps()
    searchers = []
    marks: dict[str, float] = {}
    orig_run_search, orig_build = search.run_search, search.build_tuner

    def run_search(*a, **kw):
        kw["callbacks"] = list(kw.get("callbacks") or []) + [stamps.callback]
        marks["search_start"] = time.time()
        try:
            return orig_run_search(*a, **kw)
        finally:
            marks["search_end"] = time.time()

    ask_seconds: dict[str, float] = {}
    suggest_at: dict[str, float] = {}

    def build_tuner(*a, **kw):
        tuner, searcher = orig_build(*a, **kw)
        searchers.append(searcher)
        suggest = searcher.suggest

        def timed_suggest(trial_id):  # the suggest on the controller's thread (see --presample)
            t = time.perf_counter()
            suggest_at[trial_id] = time.time()
            try:
                return suggest(trial_id)
            finally:
                ask_seconds[trial_id] = time.perf_counter() - t

        searcher.suggest = timed_suggest
        return tuner, searcher

    search.run_search, search.build_tuner = run_search, build_tuner
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if not line.startswith("["):
            print("  driver: " + line, file=sys.stderr, flush=True)
        elif len(lines) % 50 == 0:
            print("  driver: " + line, file=sys.stderr, flush=True)

    profiler = cProfile.Profile() if args.profile else None
    t0 = time.time()
    try:
        if profiler:
            profiler.enable()
        outcome = driver.run(settings, driver.RunOptions(run_dir=str(run_root / "run"),
                                                         progress=progress))
    finally:
        if profiler:
            profiler.disable()
        search.run_search, search.build_tuner = orig_run_search, orig_build
    wall = time.time() - t0
    # Tune trial id -> Optuna trial number
    tune_to_number = {tid: ot.number for s in searchers for tid, ot in s.asked.items()}
    by_number = {tune_to_number[tid]: v for tid, v in stamps.by_tune_id.items() if tid in tune_to_number}
    for tid, sec in ask_seconds.items():
        if tid in tune_to_number:
            by_number.setdefault(tune_to_number[tid], {}).update(ask_s=sec, suggest_at=suggest_at[tid])
    return dict(outcome=outcome, marks=marks, wall=wall, stamps=by_number, profiler=profiler,
                run_dir=run_root / "run", settings=settings)


def analyse(facts, in_flight: int) -> tuple[list[str], dict]:
    import optuna

    from heretic_dist import rundir as st
    from heretic_dist.search.study import open_storage

    run_dir = facts["run_dir"]
    manifest = json.loads((run_dir / st.MANIFEST).read_text())
    study = optuna.load_study(study_name=manifest["run_id"], storage=open_storage(str(run_dir / st.JOURNAL)))
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    n_failed = sum(t.state.name == "FAIL" for t in study.get_trials(deepcopy=False))
    recs = []
    for t in trials:
        a = t.user_attrs
        engine = max(sum(float(v) for v in tm.values()) for tm in a["timings"])
        recs.append(dict(number=t.number, ask=t.datetime_start.timestamp(), tell=t.datetime_complete.timestamp(),
                         fn=float(a["trial_seconds"]), engine=engine, lease=float(a.get("lease_s", 0.0)),
                         run=float(a.get("run_s", 0.0)), pid=a.get("trial_pid"), **facts["stamps"].get(t.number, {})))
    for r in recs:  # the moment Tune asked the searcher (with --presample on, the Optuna ask ran earlier)
        r["ask"] = r.get("suggest_at", r["ask"])
    recs.sort(key=lambda r: r["ask"])
    # (a)
    in_fn = [r["fn"] - r["engine"] for r in recs]
    engine = [r["engine"] for r in recs]
    lease = [r["lease"] for r in recs]
    ray_call = [r["run"] - r["engine"] for r in recs]
    # (b) per slot
    slots: dict = defaultdict(list)
    for r in recs:
        slots[r["pid"]].append(r)
    ctrl, tell_ask, ask_tell_rest, t_res_tell, t_start_fn, ctrl_no_ask, total = [], [], [], [], [], [], []
    for seq in slots.values():
        seq.sort(key=lambda r: r["ask"])
        for prev, cur in zip(seq, seq[1:]):
            ctrl.append(cur["tell"] - prev["tell"] - cur["fn"])
            total.append(cur["tell"] - prev["tell"] - cur["engine"])
            tell_ask.append(cur["ask"] - prev["tell"])
            ask_tell_rest.append(cur["tell"] - cur["ask"] - cur["fn"])
            if "ask_s" in cur:
                ctrl_no_ask.append(ctrl[-1] - cur["ask_s"])
    asks = [r["ask_s"] for r in recs if "ask_s" in r]
    for r in recs:
        if "tune_start" in r:
            t_start_fn.append(r["tune_start"] - r["ask"])  # ask -> Tune marks the trial RUNNING
        if "tune_result" in r:
            t_res_tell.append(r["tell"] - r["tune_result"])  # first result at the controller -> tell
    tells = sorted(r["tell"] for r in recs)
    inter = [(b - a) * in_flight for a, b in zip(tells, tells[1:])]
    n = len(recs)
    first_ask = min(r["ask"] for r in recs)
    steady = tells[-1] - tells[0]
    phase = facts["marks"]["search_end"] - facts["marks"]["search_start"]
    out = [
        f"{n} COMPLETE trials ({n_failed} FAIL), {in_flight} in flight ({len(slots)} Tune trial processes seen)",
        "",
        "(a) inside the Tune trial function, per trial [ms]",
        row("trial_seconds - engine time (= in-function overhead)", in_fn),
        row("  of which: lease (broker.acquire round trip)", lease),
        row("  of which: run_s - engine (actor call + result back)", ray_call),
        row("engine time (max over shards; FakeEngine, ~0)", engine),
        "",
        "(b) controller, per trial per slot [ms]",
        row("slot cycle - trial_seconds (= controller overhead)", ctrl),
        row("  of which: searcher.suggest on the controller's thread", asks),
        row("  controller overhead without the suggest", ctrl_no_ask),
        row("  part: tell(prev) -> ask(this), same slot", tell_ask),
        row("  part: ask(this) -> tell(this) - trial_seconds", ask_tell_rest),
        row("  ask -> Tune marks trial RUNNING (callback)", t_start_fn),
        row("  first result at controller -> tell (callback)", t_res_tell),
        row(f"inter-completion time x {in_flight} (all slots)", inter),
        "",
        "(c) throughput",
        f"steady state (first tell -> last tell): {steady:.2f} s for {n - 1} trials = "
        f"{steady / (n - 1) * 1000:.1f} ms per trial, x {in_flight} in flight = "
        f"{steady / (n - 1) * in_flight * 1000:.1f} ms per slot-trial",
        f"start-up latency (first ask -> first tell, Tune starts its trial actors): {tells[0] - first_ask:.2f} s",
        f"search phase (run_search, Tune start-up + shutdown included): {phase:.2f} s = "
        f"{phase / n * in_flight * 1000:.1f} ms per slot-trial; whole driver.run: {facts['wall']:.1f} s",
    ]
    summary = dict(n=n, in_fn_p50=pct(in_fn, 50) * 1000, in_fn_p99=pct(in_fn, 99) * 1000,
                   ctrl_p50=pct(ctrl, 50) * 1000, ctrl_p99=pct(ctrl, 99) * 1000,
                   total_p50=pct(total, 50) * 1000, total_p99=pct(total, 99) * 1000,
                   ask_p50=pct(asks, 50) * 1000,
                   total_no_ask_p50=pct([t - (c - c2) for t, c, c2 in zip(total, ctrl, ctrl_no_ask)], 50) * 1000
                   if len(ctrl_no_ask) == len(ctrl) else float("nan"),
                   steady_per_slot_ms=steady / (n - 1) * in_flight * 1000, phase_s=phase, study=study, recs=recs)
    out.insert(1, row("TOTAL overhead per trial per slot = slot cycle - engine", total))
    return out, summary


def time_ask(study, in_flight: int, startup: int, sizes: list[int], repeats: int, journal: Path | None) -> list[str]:
    """TPE ask (+ the define-by-run suggestions) alone, as the search builds the sampler."""
    import optuna
    from optuna.storages import InMemoryStorage

    from heretic_dist.distributed.tune import SearchSpec
    from heretic_dist.search.space import SearchSpace
    from heretic_dist.search.study import make_sampler

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    # n_layers from the distributions: direction_index is in [0.4, 0.9] * (n_layers - 1)
    hi = complete[0].distributions["direction_index"].high
    n_layers = round(hi / 0.9) + 1
    comps = sorted({k.rsplit(".", 1)[0] for k in complete[0].params if k.count(".") >= 2})
    space = SearchSpace(n_layers, False, tuple(comps) or None)
    spec = SearchSpec(n_trials=len(complete), n_startup_trials=startup, seed=0)
    out = ["", f"TPE ask alone (multivariate, {spec.n_ei_candidates} EI candidates, {startup} start-up, constant "
           f"liar, {in_flight - 1} RUNNING) [ms], median of {repeats}:"]
    for size in sizes:
        if size > len(complete):
            continue
        times = []
        for rep in range(repeats):
            s = optuna.create_study(storage=InMemoryStorage(), directions=["minimize", "minimize"],
                                    sampler=make_sampler(spec.n_startup_trials, spec.seed, rep, spec.n_ei_candidates))
            s.add_trials(complete[:size])
            running = [s.ask() for _ in range(in_flight - 1)]
            for r in running:
                space(r)
            t = time.perf_counter()
            trial = s.ask()
            space(trial)
            times.append(time.perf_counter() - t)
        out.append(f"  in-memory study, {size:4d} complete: {statistics.median(times) * 1000:7.1f}"
                   f"  (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f})")
    if journal is not None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        variants = [("plain JournalStorage (one append + fsync per log)", JournalStorage)]
        from heretic_dist.search.study import GroupedJournalStorage, grouped

        variants.append(("as the searcher writes (grouped appends)", GroupedJournalStorage))
        for label, cls in variants:
            times, tells = [], []
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / "study.journal"
                shutil.copy(journal, copy)
                storage = cls(JournalFileBackend(str(copy), lock_obj=JournalFileOpenLock(str(copy))))
                s = optuna.load_study(study_name=study.study_name, storage=storage, sampler=make_sampler(spec.n_startup_trials, spec.seed, 0, spec.n_ei_candidates))
                group = (lambda: grouped(storage)) if cls is GroupedJournalStorage else contextlib.nullcontext
                for _ in range(repeats):
                    running = [s.ask() for _ in range(in_flight - 1)]
                    for r in running:
                        space(r)
                    t = time.perf_counter()
                    with group():
                        trial = s.ask()
                        space(trial)
                    times.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    with group():
                        for i in range(20):  # about as many user attrs as a real trial stores
                            trial.set_user_attr(f"a{i}", i)
                        s.tell(trial, None, state=optuna.trial.TrialState.FAIL)
                    tells.append(time.perf_counter() - t)
                    for r in running:
                        s.tell(r, None, state=optuna.trial.TrialState.FAIL)
            out.append(f"  journal copy of the run ({len(complete)} complete), {label}: ask + suggestions "
                       f"{statistics.median(times) * 1000:.1f}; 20 user attrs + tell {statistics.median(tells) * 1000:.1f}")
    return out


def profile_text(profiler, limit: int = 30) -> list[str]:
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    stats.sort_stats("tottime").print_stats(limit)
    buf.write("\n")
    stats.sort_stats("cumulative").print_stats(limit + 20)
    return buf.getvalue().splitlines()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=1, help="shards per trial (K); P = workers / K in flight")
    p.add_argument("--startup", type=int, default=60, help="TPE start-up trials (production: 60)")
    p.add_argument("--trial-seconds", type=float, default=0.0,
                   help="engine time per trial (FakeEngine sleep; subtracted like any engine time). 0: the "
                        "driver saturated by zero-cost trials; a few seconds: slots that overlap as in a real run")
    p.add_argument("--presample", choices=["on", "off"], default="on",
                   help="[cluster] presample: the next TPE ask on a background thread while trials run (default on)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--profile", metavar="FILE", help="cProfile the driver; stats into FILE (and a summary printed)")
    p.add_argument("--max-load", type=float, default=1.5)
    p.add_argument("--wait", type=float, default=900, help="seconds to wait for the load to drop")
    p.add_argument("--ask-repeats", type=int, default=5)
    p.add_argument("--keep", metavar="DIR", help="run in DIR (emptied first) and keep it")
    p.add_argument("--record", action="store_true", help="write the section into docs/benchmarks.md")
    args = p.parse_args()
    for kv in args.env:
        k, _, v = kv.partition("=")
        os.environ[k] = v
    command = "python scripts/bench_overhead.py " + shlex.join(sys.argv[1:])
    in_flight = max(1, args.workers // args.shards)

    load_before, quiet = bd.wait_for_quiet(args.max_load, args.wait)
    load_text_before = bd.load_text()
    date = bd.now_utc()
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        if args.keep:
            tmp = args.keep
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        facts = run_driver(args, Path(tmp))
        load_text_after = bd.load_text()
        lines, summary = analyse(facts, in_flight)
        from heretic_dist import rundir as st

        lines += time_ask(summary["study"], in_flight, args.startup, [60, 100, 150, args.trials - 1],
                          args.ask_repeats, facts["run_dir"] / st.JOURNAL)
    verdict = (f"target p50 <= {TARGET_MS:.0f} ms (TOTAL overhead per trial per slot): "
               f"{'MET' if summary['total_p50'] <= TARGET_MS else 'NOT met'}: p50 {summary['total_p50']:.1f} ms, "
               f"p99 {summary['total_p99']:.1f} ms (p50s: in-function {summary['in_fn_p50']:.1f}, controller "
               f"{summary['ctrl_p50']:.1f}, of which searcher.suggest {summary['ask_p50']:.1f}); "
               f"TOTAL without the suggest: p50 {summary['total_no_ask_p50']:.1f} ms")
    header = [f"{args.trials} trials, FakeEngine ({args.trial_seconds:g} s of engine time per trial), "
              f"{args.workers} workers x 1 CPU, K = {args.shards} shard(s) per trial, {args.startup} TPE start-up trials, "
              f"presample {args.presample}",
              f"env: {' '.join(args.env) or '(defaults)'}",
              f"before: {load_text_before}{'' if quiet else ' (NOT quiet: waited the maximum)'}; "
              f"after: {load_text_after}"]
    text = "\n".join(header + [""] + lines + ["", verdict])
    print(f"$ {command}")
    print(text)
    if facts["profiler"] is not None:
        facts["profiler"].dump_stats(args.profile)
        prof = profile_text(facts["profiler"])
        print("\n".join(prof[:140]))
        print(f"profile written to {args.profile}", file=sys.stderr)
    if args.record:
        body = "\n".join([
            "## Driver overhead per trial (FakeEngine"
            + (f", {args.trial_seconds:g} s per trial" if args.trial_seconds else ", zero-cost trials")
            + (", presample off)" if args.presample == "off" else ")"),
            "",
            "What: the real search path (`driver.run`: Ray Tune + StudySearch on a JournalStorage study + "
            "WorkerPool) with the model-free FakeEngine, so all time per trial is the machinery's. "
            "Definitions are in the script's docstring: (a) time inside the Tune trial function not spent "
            "in the engine; (b) time a trial slot spends outside the trial function (Tune + Optuna "
            "ask/tell + result shipping); TOTAL = (a) + (b) = slot cycle minus engine time; (c) wall "
            "time per trial per slot. The issue's target is TOTAL p50 <= 50 ms.",
            "",
            f"- Machine: {bd.machine()}",
            f"- Load: {load_text_before} before, {load_text_after} after",
            f"- Command: `{command}`",
            f"- Date: {date}",
            "",
            "```",
            text,
            "```",
        ])
        # zero-cost trials and trials with engine time are different questions: one section each
        section = ("bench_overhead" + (f"_{args.trial_seconds:g}s".replace(".", "_") if args.trial_seconds else "")
                   + ("_presample_off" if args.presample == "off" else ""))
        bd.write_section(section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
