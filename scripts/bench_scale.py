#!/usr/bin/env python
"""Trial throughput vs the number of model workers N: the real search path at N = 8 ... 256.

Usage:
  python scripts/bench_scale.py [--workers 8,32,128,256] [--trials 1000] [--trial-seconds 5]
      [--startup 60] [--presample on|off] [--memory-budget-gib 12] [--min-available-gib 2]
      [--env KEY=VALUE ...] [--ask-repeats 3] [--max-load 1.5] [--wait 900] [--record]

Each N runs in a child process (a fresh Ray, a fresh temp run directory): an embedded local cluster
advertising N logical CPUs (`ray.init(num_cpus=N)` with the options of driver.start_ray), then
`heretic_dist.distributed.driver.run` through scripts/bench_overhead.py's `run_driver` (its Settings:
FakeEngine sleeping --trial-seconds per trial, N workers x 1 CPU, K = 1, production TPE sampler; its
Tune callback and timed suggest) and `analyse`. N trials are in flight: ideal throughput N / trial time.

Printed per N: achieved throughput / (N / trial time) for the steady state (first tell -> last tell,
bench_overhead's (c)), after full occupancy (once the N-th Tune trial process ran its first trial) and
for the whole search phase; the ramp to full occupancy; the driver's time per trial: TPE ask and tell
(StudySearcher._ask/_tell on the study thread, journal excluded), the progress callback, journal appends
and reads (optuna's JournalFileBackend), the Tune controller (CPU of the driver's main thread in the
search phase), the rest of the driver process, the broker (lease round trip in the trial function; the
broker actor's CPU); Tune's trial-actor decisions (its controller's debug log: actors requested, trials
on a cached actor, requested actors dropped); CPU per kind of process; memory (RSS / PSS / USS, each
process's peak, median per kind) per worker actor, per Tune trial process and in all. What is measured
inside a run (process sampler, timers, the Tune log counter, the cluster) is in scripts/_scale_probe.py.

Memory: each worker is a Ray actor process and each trial slot a Tune trial process: ~2N processes.
Before each N the script projects its memory from the previous N's measured PSS (worker + trial
process) and skips an N above --memory-budget-gib, saying so; a run is stopped when MemAvailable falls
under --min-available-gib. Before the first N the projection uses PRIOR_GIB (measured here at N = 4..16).
For a skipped N nothing is extrapolated into a throughput: it gets bench_overhead's TPE-ask-alone
measurement with N - 1 trials RUNNING (constant liar) on the study of the largest N that ran, the one
driver cost that grows with N and needs no processes.

Processes: the script is a child subreaper and after every N (also on an error, Ctrl-C or SIGTERM) ends
every process it started, by pid (SIGINT to the child, then SIGTERM, then SIGKILL to what is left).
--record writes the section `bench_scale` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _benchdoc as bd  # noqa: E402
from _scale_probe import ProcessSampler, Timers, TuneActorLog, instrument, mem_available, start_ray  # noqa: E402

TARGET = 0.9
KINDS = ("worker", "trial", "broker", "idle", "starting", "driver", "ray-system")
PAIR = ("worker", "trial")  # the processes one more worker adds
PRIOR_GIB = (1.0, 0.31)  # (GiB not growing with N, GiB per worker actor + trial process), 2026-12-02, N = 4..16


# --------------------------------------------------------------------------------------------------
# One N (the child process)


def run_one(args, n: int, run_root: Path) -> dict:
    import bench_overhead as bo

    ray = start_ray(n)
    timers, marks, samplers, tune_log = Timers(), {}, [], TuneActorLog()
    instrument(timers, marks, samplers, tune_log)
    bo_args = argparse.Namespace(trials=args.trials, startup=args.startup, workers=n, shards=1,
                                 trial_seconds=args.trial_seconds, presample=args.presample, profile=None)
    try:
        facts = bo.run_driver(bo_args, run_root)
    finally:
        timers.restore()
        ray.shutdown()
    lines, summary = bo.analyse(facts, n)
    out = dict(n=n, ok=True, lines=lines, wall=facts["wall"], journal=str(facts["run_dir"]))
    out.update(throughput(summary, facts, n, args.trial_seconds))
    out.update(split(timers, marks, samplers[0], out["told"]), tune_actors=tune_log.counts)
    if args.ask_repeats > 0:
        out["ask_alone"] = bo.time_ask(summary["study"], n, args.startup, [summary["n"] - 1], args.ask_repeats, None)
    return out


def throughput(summary: dict, facts: dict, n: int, trial_s: float) -> dict:
    recs = summary["recs"]
    tells = sorted(r["tell"] for r in recs)
    first: dict = {}
    for r in recs:  # a slot (Tune trial process) starts with its first trial (Tune's on_trial_start)
        start = r.get("tune_start", r["ask"])
        first[r["pid"]] = min(first.get(r["pid"], start), start)
    starts = sorted(first.values())
    full_from = starts[n - 1] if len(starts) >= n else None
    after = [t for t in tells if full_from is not None and t >= full_from + trial_s]
    ideal, phase_s = n / trial_s, facts["marks"]["search_end"] - facts["marks"]["search_start"]
    steady = (len(tells) - 1) / (tells[-1] - tells[0])
    full = (len(after) - 1) / (after[-1] - after[0]) if len(after) > 2 else float("nan")
    lease = sorted(r["lease"] for r in recs)
    return dict(told=len(recs), ideal=ideal, steady=steady, full=full, ratio_steady=steady / ideal,
                ratio_full=full / ideal, ratio_phase=len(recs) / phase_s / ideal, phase_s=phase_s, slots=len(starts),
                ramp_s=(full_from - facts["marks"]["search_start"]) if full_from else None,
                lease_p50_ms=lease[len(lease) // 2] * 1000, lease_p99_ms=lease[int(len(lease) * 0.99)] * 1000,
                total_p50_ms=summary["total_p50"], ctrl_p50_ms=summary["ctrl_p50"], in_fn_p50_ms=summary["in_fn_p50"])


def split(timers: Timers, marks: dict, sampler: ProcessSampler, told: int) -> dict:
    """The driver's time per trial by part (ms), CPU of every kind of process, memory per kind."""
    ops = timers.ops

    def wall(op: str) -> float:
        return ops[op][1] if op in ops else 0.0

    def journal(kind: str, inside: str = "") -> float:
        return sum(v[1] for k, v in ops.items() if k.startswith("journal " + kind) and k.endswith(inside))

    phase = marks["t1"] - marks["t0"]
    main_cpu, proc_cpu = marks["main1"] - marks["main0"], marks["proc1"] - marks["proc0"]
    study_cpu = sum(ops[op][2] for op in ("ask", "tell") if op in ops)
    per = 1000.0 / max(told, 1)
    parts = {
        "TPE ask (wall, journal excluded)": (wall("ask") - journal("", " in ask")) * per,
        "tell (wall, journal and progress excluded)": (wall("tell") - journal("", " in tell") - wall("progress")) * per,
        "progress callback on_told (wall, in the tell)": wall("progress") * per,
        "journal appends (wall)": journal("append") * per,
        "journal reads (wall)": journal("read") * per,
        "Tune controller (main thread CPU)": main_cpu * per,
        "rest of the driver process (CPU: Ray threads, timers)": (proc_cpu - main_cpu - study_cpu) * per,
    }
    cpu = sampler.cpu_by_kind()
    seen: dict[str, int] = defaultdict(int)
    for kind in sampler.kinds.values():
        seen[kind] += 1
    return dict(parts_ms=parts, main_busy=main_cpu / phase, study_busy=(wall("ask") + wall("tell")) / phase,
                study_ms=(wall("ask") + wall("tell")) * per,
                appends=sum(v[0] for k, v in ops.items() if k.startswith("journal append")) / max(told, 1),
                cpu_ms={k: v * per for k, v in sorted(cpu.items())}, cores=sum(cpu.values()) / phase,
                gil_ms=(main_cpu + study_cpu) * per, all_cpu_ms=sum(cpu.values()) * per, memory=sampler.memory_by_kind(),
                max_trial_procs=sampler.max_trials, seen=dict(seen), min_available_gib=sampler.min_available)


def ask_only(args) -> dict:
    """TPE ask alone with N - 1 RUNNING, for Ns that were not run, on the study of a run that was."""
    import optuna

    import bench_overhead as bo
    from heretic_dist import rundir as st
    from heretic_dist.search.study import open_storage

    run_dir = Path(args.journal_from)
    run_id = json.loads((run_dir / st.MANIFEST).read_text())["run_id"]
    study = optuna.load_study(study_name=run_id, storage=open_storage(str(run_dir / st.JOURNAL)))
    n_complete = sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
    return {str(n): bo.time_ask(study, n, args.startup, [n_complete - 1], args.ask_repeats, None)
            for n in args.workers}


def child_main(args) -> int:
    def on_term(signum, frame):
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for kv in args.env:
        k, _, v = kv.partition("=")
        os.environ[k] = v
    try:
        result = ask_only(args) if args.journal_from else run_one(args, args.child_n, Path(args.run_root))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it in one line
        error = f"{type(exc).__name__}: {exc}"[:500]
        Path(args.out).write_text(json.dumps(dict(n=args.child_n, ok=False, error=error)))
        print(f"N={args.child_n}: {error}", file=sys.stderr)
        return 1
    Path(args.out).write_text(json.dumps(result, default=str))
    return 0


# --------------------------------------------------------------------------------------------------
# The parent: one child per N, the memory gate, cleanup


def set_subreaper() -> None:
    """Orphans of our children (Ray's processes, if a child dies) are re-parented to us: we find them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def end_descendants(grace_s: float = 5.0) -> int:
    """End every process this script started (its descendants), by pid: SIGTERM, then SIGKILL."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    for sig_all in ("terminate", "kill"):
        for p in procs:
            try:
                getattr(p, sig_all)()
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=grace_s)
    return len(procs)


def run_child(args, tmp: Path, tag: str, extra: list[str]) -> dict:
    out = tmp / f"result-{tag}.json"
    cmd = [sys.executable, __file__, "--out", str(out), "--trials", str(args.trials), "--trial-seconds",
           str(args.trial_seconds), "--startup", str(args.startup), "--presample", args.presample,
           "--ask-repeats", str(args.ask_repeats)] + [f"--env={e}" for e in args.env] + extra
    child = subprocess.Popen(cmd, start_new_session=True)  # Ctrl-C reaches us only; we stop it in order
    reason = None
    try:
        while child.poll() is None:
            time.sleep(2.0)
            if mem_available() < args.min_available_gib:
                reason = f"stopped: MemAvailable fell under {args.min_available_gib:g} GiB"
                break
    finally:
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGTERM, 20)):
            if child.poll() is None:
                child.send_signal(sig)
                try:
                    child.wait(wait_s)
                except subprocess.TimeoutExpired:
                    pass
        left = end_descendants()
        if left:
            print(f"  {left} process(es) of {tag} did not end on SIGKILL", file=sys.stderr)
    result = json.loads(out.read_text()) if out.exists() else dict(ok=False, error=f"exit code {child.returncode}")
    if reason:
        result.update(ok=False, error=reason + (f" ({result['error']})" if result.get("error") else ""))
    return result


def memory_model(run: dict) -> tuple[float, float]:
    """(GiB that do not grow with N, GiB per worker: its actor + its trial process), from measured PSS."""
    mem = run["memory"]
    per = sum(mem.get(k, {}).get("pss", 0.0) for k in PAIR) / 1024
    grows = sum(mem["all"]["by_kind"].get(k, 0.0) for k in PAIR) / 1024
    return mem["all"]["pss_total"] / 1024 - grows, per


def interrupt(signum, frame):
    raise KeyboardInterrupt


def parent_main(args) -> int:
    set_subreaper()
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (a job)
    command = "python scripts/bench_scale.py " + shlex.join(sys.argv[1:])
    _, quiet = bd.wait_for_quiet(args.max_load, args.wait)
    before, date, results, current = bd.load_text(), bd.now_utc(), [], None
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        try:
            for n in args.workers:
                measured = [r for r in results if r.get("ok") and memory_model(r)[1] > 0]
                base, per = memory_model(measured[-1]) if measured else PRIOR_GIB
                if base + n * per > args.memory_budget_gib:
                    source = f"measured at N={measured[-1]['n']}" if measured else "PRIOR_GIB, measured earlier"
                    results.append(dict(n=n, ok=False, skipped=True, error=(
                        f"not run: projected {base + n * per:.1f} GiB = {base:.1f} + N x {per * 1024:.0f} MiB (PSS of a "
                        f"worker actor + a trial process, {source}) > {args.memory_budget_gib:g} GiB")))
                    continue
                print(f"N={n}: {args.trials} trials x {args.trial_seconds:g} s", file=sys.stderr, flush=True)
                current = n
                (Path(tmp) / f"n{n}").mkdir()
                results.append(dict(run_child(args, Path(tmp), f"n{n}", ["--child-n", str(n), "--run-root",
                                                                          str(Path(tmp) / f"n{n}")]), n=n))
                current = None
            ran, skipped = [r for r in results if r.get("ok")], [r["n"] for r in results if r.get("skipped")]
            asks = {}
            if ran and skipped and args.ask_repeats > 0:
                print(f"TPE ask alone at N = {skipped} on the study of N={ran[-1]['n']}", file=sys.stderr, flush=True)
                asks = run_child(args, Path(tmp), "ask", ["--child-n", "0", "--journal-from", ran[-1]["journal"],
                                                          "--workers", ",".join(map(str, skipped))])
        except KeyboardInterrupt:
            print("interrupted: ending every process started", file=sys.stderr)
            end_descendants()
            results.append(dict(n=current if current is not None else "-", ok=False, interrupted=True,
                                error="interrupted (Ctrl-C or SIGTERM)"))
            asks = {}
    text = report(args, results, asks, quiet, before, bd.load_text())
    print(f"$ {command}\n{text}")
    if args.record and not any(r.get("interrupted") for r in results):  # an interrupted run is not recorded
        bd.write_section("bench_scale", record_body(text, command, date))
    return 0 if all(r.get("ok") or r.get("skipped") for r in results) else 1


# --------------------------------------------------------------------------------------------------
# Report


def columns(rows: list[tuple[str, object]], ok: list[dict], width: int = 14, label: int = 58) -> list[str]:
    return [f"  {name:<{label}}" + "".join(f"{fn(r):>{width}}" for r in ok) for name, fn in rows]


def throughput_table(results: list[dict]) -> list[str]:
    out = ["      N   ideal/s  steady/s   ratio  full-occ   phase   ramp s  slots  target"]
    for r in results:
        if not r.get("ok"):
            out.append(f"  {r['n']:>5}  {r.get('error', 'failed')}")
            continue
        ramp = f"{r['ramp_s']:.1f}" if r["ramp_s"] is not None else "never"
        out.append(f"  {r['n']:>5}  {r['ideal']:8.2f}  {r['steady']:8.2f}  {r['ratio_steady']:6.3f}  "
                   f"{r['ratio_full']:8.3f}  {r['ratio_phase']:6.3f}  {ramp:>7}  {r['slots']:>5}  "
                   f"{'MET' if r['ratio_steady'] >= TARGET else 'NOT met'}")
    return out


def split_table(ok: list[dict]) -> list[str]:
    rows = [(name, lambda r, name=name: f"{r['parts_ms'][name]:.2f}") for name in ok[0]["parts_ms"]]
    rows += [("broker: lease round trip p50 / p99 (in the trial function)",
              lambda r: f"{r['lease_p50_ms']:.1f} / {r['lease_p99_ms']:.1f}"),
             ("study thread busy (ask + tell wall / search phase)", lambda r: f"{r['study_busy']:.0%}"),
             ("Tune controller thread busy (CPU / search phase)", lambda r: f"{r['main_busy']:.0%}"),
             ("journal appends per trial", lambda r: f"{r['appends']:.1f}"),
             ("GIL-bound driver CPU (main + study thread)", lambda r: f"{r['gil_ms']:.1f}"),
             ("bench_overhead TOTAL p50 (slot cycle - engine)", lambda r: f"{r['total_p50_ms']:.1f}"),
             ("  its controller p50 / in-function p50", lambda r: f"{r['ctrl_p50_ms']:.0f} / {r['in_fn_p50_ms']:.0f}"),
             ("pids seen: Tune trial processes / worker processes starting",
              lambda r: f"{r['seen'].get('trial', 0)} / {r['seen'].get('starting', 0)}")]
    rows += [("Tune: " + name, lambda r, name=name: str(r["tune_actors"].get(name, "?")))
             for name in TuneActorLog.EVENTS.values()]
    kinds = sorted({k for r in ok for k in r["cpu_ms"]})
    cpu_rows = [(k, lambda r, k=k: f"{r['cpu_ms'].get(k, 0.0):.1f}") for k in kinds]
    cpu_rows.append(("all (cores used)", lambda r: f"{r['all_cpu_ms']:.0f} ({r['cores']:.2f})"))
    head = f"  {'':<58}" + "".join(f"{'N=' + str(r['n']):>14}" for r in ok)
    return (["driver time per told trial [ms] (wall on the study thread, CPU for the others):", head]
            + columns(rows, ok) + ["", "CPU of the run's processes in the search phase [ms per told trial]:", head]
            + columns(cpu_rows, ok))


def memory_table(ok: list[dict]) -> list[str]:
    def cell(kind):
        return lambda r: (lambda m: f"{m['rss']:.0f}/{m['pss']:.0f}/{m['uss']:.0f} x{m['n']}" if m else "-")(
            r["memory"].get(kind))

    rows = [(kind, cell(kind)) for kind in KINDS]
    rows += [("all (total PSS)", lambda r: f"{r['memory']['all']['pss_total'] / 1024:.2f} GiB, "
                                           f"{r['memory']['all']['n']} procs"),
             ("min MemAvailable", lambda r: f"{r['min_available_gib']:.1f} GiB")]
    return ["memory per process [MiB: median over the processes of a kind of each one's peak RSS / PSS / USS; x the "
            "most alive at once]:"] + \
        columns(rows, ok, width=22, label=20)


def ceilings(args, ok: list[dict]) -> list[str]:
    """The largest N in the memory budget; where CPU would stop throughput: projections from measured costs."""
    big = max(ok, key=lambda r: r["n"])
    base, per = memory_model(big)
    if per <= 0:
        return [f"no memory sample of worker and trial processes at N={big['n']} (the search was too short)"]
    cores, t_ms = len(os.sched_getaffinity(0)), args.trial_seconds * 1000
    out = [f"largest N within {args.memory_budget_gib:g} GiB: {int((args.memory_budget_gib - base) / per)} "
           f"(= ({args.memory_budget_gib:g} - {base:.2f} GiB not growing with N) / {per * 1024:.0f} MiB PSS per worker "
           f"actor + trial process, measured at N={big['n']})"]
    for r in ok:
        out.append(f"N={r['n']} projections (not measurements, {args.trial_seconds:g}-s trials): the study thread "
                   f"({r['study_ms']:.1f} ms wall per trial) caps N at {t_ms / max(r['study_ms'], 1e-9):.0f}; the "
                   f"driver's GIL-bound work ({r['gil_ms']:.1f} ms CPU) at {t_ms / max(r['gil_ms'], 1e-9):.0f}; all "
                   f"processes ({r['all_cpu_ms']:.0f} ms CPU) saturate {cores} cores at "
                   f"{cores * t_ms / max(r['all_cpu_ms'], 1e-9):.0f}")
    return out


def report(args, results: list[dict], asks: dict, quiet: bool, before: str, after: str) -> str:
    lines = [f"{args.trials} trials per N, FakeEngine sleeping {args.trial_seconds:g} s per trial, N workers x 1 CPU "
             f"on an embedded cluster advertising N CPUs, K = 1, {args.startup} TPE start-up trials, presample "
             f"{args.presample}", f"env: {' '.join(args.env) or '(defaults)'}",
             f"before: {before}{'' if quiet else ' (NOT quiet: waited the maximum)'}; after: {after}", "",
             f"throughput / (N / {args.trial_seconds:g} s): steady = first tell -> last tell; full-occ = once all N "
             f"trial processes ran a trial; phase = the search phase (Tune start-up included). Target >= {TARGET} (steady)"]
    lines += throughput_table(results)
    ok = [r for r in results if r.get("ok")]
    if ok:
        lines += [""] + split_table(ok) + [""] + memory_table(ok) + [""] + ceilings(args, ok)
    for n, ask_lines in (asks.items() if isinstance(asks, dict) and "error" not in asks else []):
        lines += ["", f"N = {n} (not run): bench_overhead's TPE ask alone"] + ask_lines
    for r in ok:
        lines += ["", f"--- N = {r['n']}: bench_overhead's analysis (driver.run {r['wall']:.0f} s) ---"] + r["lines"]
        lines += r.get("ask_alone", [])
    return "\n".join(lines)


def record_body(text: str, command: str, date: str) -> str:
    return "\n".join([
        "## Throughput vs number of workers (FakeEngine, real search path)", "",
        "What: `driver.run` (Ray Tune + StudySearcher + WorkerPool + WorkerBroker) with N FakeEngine workers "
        "sleeping a fixed time per trial, on an embedded cluster advertising N CPUs; achieved trials per second "
        "over N / trial time, and where the driver's time goes (definitions in scripts/bench_scale.py's "
        "docstring). Target: >= 0.9 for every N up to 256 with 5-s trials, or the measured ceiling and why.", "",
        f"- Machine: {bd.machine()}", f"- Command: `{command}`", f"- Date: {date}", "", "```", text, "```"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="8,32,128,256", help="comma-separated N values")
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--trial-seconds", type=float, default=5.0)
    p.add_argument("--startup", type=int, default=60, help="TPE start-up trials (production: 60)")
    p.add_argument("--presample", choices=["on", "off"], default="on")
    p.add_argument("--memory-budget-gib", type=float, default=12.0, help="skip an N projected above this")
    p.add_argument("--min-available-gib", type=float, default=2.0, help="stop a run when MemAvailable falls under")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set before Ray is imported")
    p.add_argument("--ask-repeats", type=int, default=3, help="bench_overhead's TPE-ask-alone repeats (0: skip)")
    p.add_argument("--max-load", type=float, default=1.5)
    p.add_argument("--wait", type=float, default=900, help="seconds to wait for the load to drop")
    p.add_argument("--record", action="store_true", help="write the section into docs/benchmarks.md")
    for hidden in ("--child-n", "--out", "--run-root", "--journal-from"):  # the parent's calls of itself
        p.add_argument(hidden, type=int if hidden == "--child-n" else str, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workers = [int(x) for x in str(args.workers).split(",") if x.strip()]
    return args


def main() -> int:
    args = parse_args()
    return child_main(args) if args.child_n is not None else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
