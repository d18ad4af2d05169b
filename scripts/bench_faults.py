#!/usr/bin/env python
"""Node losses in a real multi-node run: what a lost node costs in trials and in wall time.

Usage:
  python scripts/bench_faults.py [--trials 24] [--trial-seconds 2.0] [--losses 2] [--at 0.25,0.5]
      [--ray-health-defaults] [--keep DIR] [--max-load 1.5] [--wait 900] [--record]

Two scenarios, each a real `python -m heretic_dist run CONFIG --run-dir D --address HEAD` subprocess
against a fresh LocalCluster (tests/ray_cluster.py: a `ray start` head with 1 CPU, the driver's node,
and one worker node with 1 CPU; `[cluster] workers = 2, cpus_per_worker = 1`, engine = "fake" with
`fake_trial_seconds` = S, N trials):

  (a) baseline: no losses;
  (b) losses: SIGKILL of the worker node's raylet (LocalCluster.kill_node) K times, the i-th once
      N x at[i] trials are done (default at = i / (K + 2): 1/4 and 1/2 for K = 2) and, from the second
      on, once the previous replacement has served a trial (so that each loss takes a loaded worker
      with a trial in flight); 2 s after each loss a fresh node joins on its own loopback IP
      (127.0.0.2, .3, ...), where the replacement worker can go (the head's CPU is taken).

Both scenarios run with the same Ray health-check settings: by default FAST_NODE_DEATH of
tests/ray_cluster.py (GCS marks a lost node dead after 3 failed checks 1 s apart), with
--ray-health-defaults Ray's own (5 checks 3 s apart, the first after 5 s).

Measured per scenario: wall time of the run (driver process start to exit), split into start-up (to
the first trial done), the trial phase (first to last trial done) and the exit (last trial to exit);
trials COMPLETE / FAIL / total in the study (the run dir's journal, read with
heretic_dist.search.study.open_study); trial numbers moved to a finished state more than once (read
from the journal's own lines: should be 0); node losses done; model loads and replacements (the
driver's "N model loads (R replacements)" line); which worker ids served COMPLETE trials (user attr
worker_ids) and whether the replacements (w2, w3, ...: the only workers the fresh nodes can hold) are
among them; per loss, the time from the kill to the first trial finished by its replacement; the
"(ray) ..." notices the driver printed. Then the ratios losses / baseline (wall time, trial phase) and
what to expect: a loss throws away the lost worker's trial in flight (at most S of work, K x S in all,
re-run by whichever worker is free) and runs the pool one worker short until the replacement serves
(kill to its first trial finished, minus S; to the last trial if it never served); with 2 workers
either costs about half its length in wall time. The fresh nodes join through LocalCluster.add_node,
which polls the cluster with short-lived Ray drivers until the node is listed: a few CPU seconds the
losses run competes with and the baseline does not.
--record writes the section `bench_faults` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

import _benchdoc as bd  # noqa: E402
from ray_cluster import FAST_NODE_DEATH, LocalCluster  # noqa: E402

REJOIN_DELAY_S = 2.0
PROGRESS = re.compile(r"\s*\[(\d+)/(\d+)\]")
NODE_NAMES = re.compile(r"[0-9a-f]{12}|\([0-9.]+\)")  # "node 2c071be0d339 (192.0.2.2)" in Ray's notices
LOADS = re.compile(r"(\d+) model loads \((\d+) replacements\)")

CONFIG = """
engine = "fake"
model = "fake-faults"
n_trials = {trials}
n_startup_trials = {startup}
seed = 5
good_prompts = {{ dataset = "builtin:demo_harmless", split = "[:10]" }}
bad_prompts = {{ dataset = "builtin:demo_harmful", split = "[:10]" }}
good_evaluation_prompts = {{ dataset = "builtin:demo_harmless", split = "[10:20]" }}
bad_evaluation_prompts = {{ dataset = "builtin:demo_harmful", split = "[10:20]" }}
[cluster]
workers = 2
cpus_per_worker = 1
[engine_options]
fake_trial_seconds = {seconds}
"""


@dataclasses.dataclass
class Loss:
    done: int  # trials done when the node was killed
    at: float  # time.time() of the kill
    fresh_ip: str


@dataclasses.dataclass
class Outcome:
    name: str
    wall_s: float = float("nan")
    returncode: int | None = None
    timed_out: bool = False
    losses: list[Loss] = dataclasses.field(default_factory=list)
    states: Counter = dataclasses.field(default_factory=Counter)
    told_twice: list[int] = dataclasses.field(default_factory=list)
    loads: int | None = None
    replacements: int | None = None
    served: set[str] = dataclasses.field(default_factory=set)
    first_done: dict[str, float] = dataclasses.field(default_factory=dict)  # worker id -> first COMPLETE
    last_done: float = float("nan")  # time.time() of the last COMPLETE
    progress_s: tuple[float, float] | None = None  # first and last trial progress line, s after the start
    extra_lines: list[str] = dataclasses.field(default_factory=list)
    ray_notices: Counter = dataclasses.field(default_factory=Counter)  # the driver's "(ray) ..." lines
    problems: list[str] = dataclasses.field(default_factory=list)


class DriverRun:
    """The `heretic-dist run` subprocess, its output read on a thread (progress parsed as it comes)."""

    def __init__(self, cluster: LocalCluster, work: Path):
        cmd = [sys.executable, "-m", "heretic_dist", "run", "run.toml", "--run-dir", "run", "--address",
               cluster.address]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=work, env=dict(cluster.env, PYTHONUNBUFFERED="1"),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.t_end: float | None = None
        self.entries: list[tuple[float, str]] = []  # (seconds since the start, line)
        self.done = 0  # the highest "[done/total]" progress line so far
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        self.proc.wait()
        self.t_end = time.monotonic()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.entries.append((time.monotonic() - self.t0, line.rstrip("\n")))
            found = PROGRESS.match(line)
            if found:
                self.done = max(self.done, int(found.group(1)))

    def note(self, text: str) -> None:
        """A line of this script's own in the saved driver output (not parsed)."""
        self.entries.append((time.monotonic() - self.t0, text))

    @property
    def lines(self) -> list[str]:
        return [x for _, x in self.entries]

    def running(self) -> bool:
        return self.t_end is None

    def wait(self, timeout_s: float) -> bool:
        """Until the process exits (True) or timeout_s passes (False)."""
        deadline = time.monotonic() + timeout_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not self.running():
            self.reader.join(timeout=10)
        return not self.running()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)


def wait_until(run: DriverRun, ready: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while run.running() and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.3)
    return False


def read_study(run_dir: Path) -> list:
    import optuna

    from heretic_dist import rundir as st
    from heretic_dist.search.study import open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "Using an existing study" each time
    manifest = json.loads((run_dir / st.MANIFEST).read_text())
    return open_study(str(run_dir / st.JOURNAL), manifest["run_id"]).trials


def served_now(run_dir: Path) -> set[str]:
    """Worker ids that served a COMPLETE trial so far (from the live journal)."""
    with contextlib.suppress(Exception):
        return {w for t in read_study(run_dir) if t.state.name == "COMPLETE" for w in t.user_attrs["worker_ids"]}
    return set()


def finishing_tells(journal: Path) -> Counter:
    """How many times each trial id was moved to a finished state, from the journal's lines (as
    tests/test_search.py reads it): op 6 = SET_TRIAL_STATE_VALUES; states 1, 3, 4 = COMPLETE, PRUNED, FAIL."""
    told: Counter = Counter()
    for line in journal.read_text().splitlines():
        op = json.loads(line)
        if op["op_code"] == 6 and op["state"] in (1, 3, 4):
            told[op["trial_id"]] += 1
    return told


def kill_points(args: argparse.Namespace) -> list[int]:
    fractions = ([float(x) for x in args.at.split(",")] if args.at
                 else [i / (args.losses + 2) for i in range(1, args.losses + 1)])
    if len(fractions) != args.losses:
        raise SystemExit(f"--at gives {len(fractions)} fractions for --losses {args.losses}")
    points = [max(1, round(args.trials * f)) for f in fractions]
    if points != sorted(points) or points[-1] >= args.trials:
        raise SystemExit(f"kill points {points} must rise and stay below --trials {args.trials}")
    return points


def inject_losses(cluster: LocalCluster, run: DriverRun, run_dir: Path, points: list[int],
                  outcome: Outcome) -> None:
    """Kill the newest worker node at each point (after the previous replacement served), then a
    fresh node joins on its own loopback IP."""
    for i, point in enumerate(points):
        previous = f"w{i + 1}"  # the replacement after loss i - 1 (w0, w1 are the first two workers)

        def ready(point: int = point, previous: str = previous, i: int = i) -> bool:
            return run.done >= point and (i == 0 or previous in served_now(run_dir))

        if not wait_until(run, ready, timeout_s=300):
            outcome.problems.append(f"loss {i + 1} not done: the run ended or stalled first "
                                    f"({run.done} trials done)")
            return
        outcome.losses.append(Loss(run.done, time.time(), f"127.0.0.{i + 2}"))
        run.note(f"(bench) killing the worker node after {run.done} trials")
        cluster.kill_node(len(cluster.procs) - 1)
        print(f"  killed the worker node after {run.done} trials", file=sys.stderr, flush=True)
        time.sleep(REJOIN_DELAY_S)
        try:  # blocks until the cluster lists the node (LocalCluster polls with short-lived drivers)
            cluster.add_node(node_ip=outcome.losses[-1].fresh_ip)
        except AssertionError as exc:
            outcome.problems.append(f"fresh node {outcome.losses[-1].fresh_ip}: {exc}")
        run.note(f"(bench) fresh node {outcome.losses[-1].fresh_ip} up")
        print(f"  fresh node {outcome.losses[-1].fresh_ip} joined", file=sys.stderr, flush=True)


def collect(outcome: Outcome, run: DriverRun, run_dir: Path) -> None:
    """Fill the outcome from the driver's output and the study."""
    from heretic_dist import rundir as st

    outcome.returncode = run.proc.returncode
    if run.t_end is not None:
        outcome.wall_s = run.t_end - run.t0
    text = "\n".join(run.lines)
    stamps = [t for t, x in run.entries if PROGRESS.match(x)]
    if stamps:
        outcome.progress_s = (stamps[0], stamps[-1])
    found = LOADS.findall(text)
    if found:
        outcome.loads, outcome.replacements = (int(x) for x in found[-1])
    outcome.ray_notices = Counter(NODE_NAMES.sub("*", x) for x in run.lines if x.startswith("(ray) "))
    outcome.extra_lines = [x for x in run.lines if "Traceback" in x or "(raylet)" in x or "Error" in x
                           or "WARNING" in x or "warning" in x.lower()]
    try:
        trials = read_study(run_dir)
    except Exception as exc:  # a run that died before it wrote its study
        outcome.problems.append(f"study not readable: {exc!r}")
        return
    outcome.states = Counter(t.state.name for t in trials)
    twice = {tid for tid, n in finishing_tells(run_dir / st.JOURNAL).items() if n > 1}
    outcome.told_twice = sorted(t.number for t in trials if t._trial_id in twice)
    for t in sorted((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.datetime_complete):
        for w in t.user_attrs.get("worker_ids", []):
            outcome.served.add(w)
            outcome.first_done.setdefault(w, t.datetime_complete.timestamp())
        outcome.last_done = t.datetime_complete.timestamp()


def stop_cluster(cluster: LocalCluster) -> None:
    """LocalCluster.stop (every node's process group), then any process left that names this cluster's own
    temp dir (a Ray worker runs in a process group of its own: one that a raylet was starting when the
    cluster stopped outlives it for a minute and writes into the removed folder), killed by pid."""
    import psutil

    try:
        cluster.stop()
    finally:
        if cluster.temp_dir:
            left = []
            for proc in psutil.process_iter(["cmdline"]):
                if any(cluster.temp_dir + "/" in x or x.endswith(cluster.temp_dir) for x in proc.info["cmdline"] or []):
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
                        left.append(proc)
            psutil.wait_procs(left, timeout=30)
            if left:
                print(f"  killed {len(left)} leftover Ray process(es) of the stopped cluster", file=sys.stderr)
            shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def run_scenario(name: str, args: argparse.Namespace, points: list[int], root: Path) -> Outcome:
    """One fresh cluster, one driver run, the losses if any; every cluster process stopped after."""
    outcome = Outcome(name)
    work = root / name
    work.mkdir()
    (work / "run.toml").write_text(CONFIG.format(trials=args.trials, startup=min(6, args.trials),
                                                 seconds=args.trial_seconds))
    print(f"{name}: starting a cluster", file=sys.stderr, flush=True)
    cluster = LocalCluster()
    if not args.ray_health_defaults:
        cluster.env.update(FAST_NODE_DEATH)
    run: DriverRun | None = None
    try:
        cluster.start_head(own_temp_dir=True)  # 1 CPU: the driver's node and one worker
        cluster.add_node()  # 1 CPU: the other worker
        print(f"{name}: running {args.trials} trials", file=sys.stderr, flush=True)
        run = DriverRun(cluster, work)
        if points:
            inject_losses(cluster, run, work / "run", points, outcome)
        limit = 180 + 3 * args.trials * args.trial_seconds + 120 * len(points)
        if not run.wait(limit):
            outcome.timed_out = True
            outcome.problems.append(f"the run did not end within {limit:.0f} s; killed")
    finally:
        if run is not None:
            run.kill()
        stop_cluster(cluster)
    assert run is not None
    collect(outcome, run, work / "run")
    (work / "driver-output.txt").write_text("".join(f"{t:7.1f} {x}\n" for t, x in run.entries))
    unserved = [f"w{i + 2}" for i in range(len(outcome.losses)) if f"w{i + 2}" not in outcome.served]
    if unserved:
        outcome.problems.append(f"replacement(s) {', '.join(unserved)} served no trial")
    if outcome.returncode != 0:
        outcome.problems.append(f"driver exit code {outcome.returncode}; last lines:\n    "
                                + "\n    ".join(run.lines[-15:]))
    return outcome


def scenario_lines(o: Outcome, args: argparse.Namespace) -> list[str]:
    total = sum(o.states.values())
    replacements = [f"w{i + 2}" for i in range(len(o.losses))]
    fresh = (f"; replacements on the fresh nodes ({', '.join(replacements)}) served trials: "
             f"{'yes' if set(replacements) <= o.served else 'NO'}" if replacements else "")
    lines = [f"{o.name}: wall {o.wall_s:.1f} s (driver start to exit), exit code {o.returncode}"
             + (" (TIMED OUT)" if o.timed_out else ""),
             f"  trials in the study: {o.states.get('COMPLETE', 0)} COMPLETE, {o.states.get('FAIL', 0)} FAIL, "
             f"{total} total (of {args.trials}); trial numbers told twice: {len(o.told_twice)}"
             + (f" {o.told_twice}" if o.told_twice else ""),
             f"  node losses: {len(o.losses)}"
             + (" (after " + ", ".join(f"{x.done}" for x in o.losses) + " trials done)" if o.losses else "")
             + f"; model loads {o.loads}, replacements {o.replacements} (driver's summary line)",
             f"  {phases(o)}",
             f"  workers that served COMPLETE trials: {', '.join(sorted(o.served)) or '-'}{fresh}"]
    for i, loss in enumerate(o.losses):
        w = f"w{i + 2}"
        rec = o.first_done.get(w)
        lines.append(f"  loss {i + 1}: kill -> first trial finished by its replacement {w} (on {loss.fresh_ip}): "
                     + (f"{rec - loss.at:.1f} s" if rec else "never"))
    lines += [f"  driver printed {n} x: {x}" for x, n in sorted(o.ray_notices.items())]
    lines += [f"  problem: {p}" for p in o.problems]
    if o.extra_lines:
        lines.append(f"  driver lines with Traceback/(raylet)/Error/warning: {len(o.extra_lines)}")
        lines += [f"    | {x}" for x in o.extra_lines[:10]]
    return lines


def phases(o: Outcome) -> str:
    if o.progress_s is None:
        return "phases: no trial reported"
    first, last = o.progress_s
    return (f"phases: start -> first trial done {first:.1f} s, first -> last trial done {last - first:.1f} s, "
            f"last trial -> exit {o.wall_s - last:.1f} s")


def compare_lines(base: Outcome, hit: Outcome, args: argparse.Namespace) -> list[str]:
    """The ratios and what to expect of them (see the module docstring)."""
    s, k = args.trial_seconds, len(hit.losses)
    short, never = 0.0, []  # the pool one worker short: from a loss until its replacement starts serving
    for i, loss in enumerate(hit.losses):
        w = f"w{i + 2}"
        if w in hit.first_done:
            short += max(0.0, hit.first_done[w] - loss.at - s)
        else:  # short until the last trial
            never.append(w)
            short += max(0.0, hit.last_done - loss.at)
    lines = [f"wall time losses / baseline: {hit.wall_s:.1f} / {base.wall_s:.1f} s = {hit.wall_s / base.wall_s:.2f} "
             f"({hit.wall_s - base.wall_s:+.1f} s)"]
    if hit.progress_s and base.progress_s:
        a, b = (o.progress_s[1] - o.progress_s[0] for o in (hit, base))
        lines.append(f"trial phase (first -> last trial done) losses / baseline: {a:.1f} / {b:.1f} s = {a / b:.2f} "
                     f"({a - b:+.1f} s; start-up and exit left out)")
    lines += [f"expected extra: the lost trials in flight, at most losses x trial seconds = {k} x {s:g} = {k * s:g} s "
              "of worker time, re-run by whichever worker is free,",
              f"  and the pool one worker short until each replacement serves: {short:.1f} s in all "
              "(kill -> replacement's first trial finished, minus one trial"
              + (f"; {', '.join(never)} never served: kill -> last trial" if never else "") + ");",
              f"  with 2 workers each costs about half its length in wall time: about {short / 2:.1f} to "
              f"{(short + k * s) / 2:.1f} s extra expected"]
    return lines


def report(outcomes: list[Outcome], args: argparse.Namespace, env_text: str, loads: tuple[str, str, bool]) -> str:
    before, after, quiet = loads
    header = [f"{args.trials} trials, FakeEngine ({args.trial_seconds:g} s per trial), 2 workers x 1 CPU on 2 Ray "
              "nodes (head 1 CPU: the driver and one worker; worker node 1 CPU); "
              f"{args.losses} loss(es) in the losses run, a fresh node joining {REJOIN_DELAY_S:g} s after each",
              f"Ray health checks: {env_text}",
              f"before: {before}{'' if quiet else ' (NOT quiet: waited the maximum)'}; after: {after}", ""]
    body = [line for o in outcomes for line in [*scenario_lines(o, args), ""]]
    if len(outcomes) == 2 and all(o.wall_s == o.wall_s for o in outcomes):  # no NaN
        body += compare_lines(outcomes[0], outcomes[1], args)
    return "\n".join(header + body).rstrip()


def record(text: str, command: str, date: str, loads: tuple[str, str, bool]) -> None:
    body = "\n".join([
        "## Node losses mid-run on a real multi-node cluster (`scripts/bench_faults.py`)",
        "",
        "What: the same `heretic-dist run` (FakeEngine, 2 workers on a 2-node `ray start` cluster on this "
        "machine) without losses and with the worker node's raylet SIGKILLed mid-run, a fresh node joining "
        "after each loss: trials lost, trials told twice, replacements, whether the fresh nodes' workers "
        "served, and the wall time against the run without losses. Details in the script's docstring.",
        "",
        f"- Machine: {bd.machine()}",
        f"- Load: {loads[0]} before, {loads[1]} after",
        f"- Command: `{command}`",
        f"- Date: {date}",
        "",
        "```",
        text,
        "```",
    ])
    bd.write_section("bench_faults", body)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--trial-seconds", type=float, default=2.0, help="FakeEngine sleep per trial")
    p.add_argument("--losses", type=int, default=2, help="node losses in the losses run")
    p.add_argument("--at", help="fractions of the trials done at each loss, comma-separated "
                                "(default i / (losses + 2): 0.25,0.5 for 2 losses)")
    p.add_argument("--ray-health-defaults", action="store_true",
                   help="Ray's own health-check settings instead of FAST_NODE_DEATH (both runs)")
    p.add_argument("--max-load", type=float, default=1.5)
    p.add_argument("--wait", type=float, default=900, help="seconds to wait for the load to drop")
    p.add_argument("--keep", metavar="DIR", help="run in DIR (must not exist) and keep the run dirs and the "
                                                 "driver output of both runs")
    p.add_argument("--record", action="store_true", help="write the section into docs/benchmarks.md")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    points = kill_points(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks stop the clusters
    command = "python scripts/bench_faults.py " + shlex.join(sys.argv[1:])
    fast = " ".join(f"{k}={v}" for k, v in FAST_NODE_DEATH.items())
    env_text = "Ray's defaults" if args.ray_health_defaults else f"FAST_NODE_DEATH of tests/ray_cluster.py: {fast}"
    _, quiet = bd.wait_for_quiet(args.max_load, args.wait)
    before, date = bd.load_text(), bd.now_utc()
    with contextlib.ExitStack() as stack:
        root = Path(args.keep or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-faults-")))
        root.mkdir(parents=True, exist_ok=not args.keep)
        outcomes = [run_scenario("baseline", args, [], root), run_scenario("losses", args, points, root)]
    loads = (before, bd.load_text(), quiet)
    text = report(outcomes, args, env_text, loads)
    print(f"$ {command}")
    print(text)
    if args.record:
        record(text, command, date, loads)
    ok = all(o.returncode == 0 and not o.problems and not o.told_twice for o in outcomes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
