#!/usr/bin/env python
"""Speed and front quality: upstream Heretic 1.4.0 vs heretic-dist, same model, prompts and settings.

Usage:
  python scripts/bench_vs_upstream.py [--trials 8] [--good-dir 24 --bad-dir 24 --good-eval 20 --bad-eval 20]
      [--max-response-length 30] [--batch-size 16] [--seed 42] [--workers-all 2]
      [--max-load 2.5] [--wait 300] [--out-dir DIR] [--record]

Model: the benchmark model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, from get-bench-model.sh): our engine
loads the .gguf, upstream the float32 HF folder converted from it (parity_with_upstream.hf_folder); both
run float32 on the CPU. Prompts: the shared sets in ../shared/data/prompts (first N of each file).
Both tools get identical settings, and n_startup_trials = n_trials, so both samplers draw every trial at
random (no TPE): the two searches are equally blind and the fronts compare luck plus speed, not
search strategy.

Phases (each after _benchdoc.wait_for_quiet; the load average is printed before and after each):
  1. upstream: ../shared/scripts/upstream-heretic.sh with parity_with_upstream.upstream_config; its
     log lines are timestamped as they appear (upstream logs no times), which gives its directions
     time and, per trial, reset+abliterate / KL / refusal-generation seconds; per-trial seconds come
     from its Optuna journal, end-to-end wall from the runner (the heretic process only).
  2. ours, 1 worker x 2 CPUs and all workers (2 x 1 CPU on this machine): the real CLI
     (`python -m heretic_dist run CONFIG --run-dir DIR --workers W --cpus-per-worker C`) in a
     subprocess; its directions line, per-trial lines and wall time are captured; per-trial seconds
     (duration_s) and engine phase timings come from the run's trials.parquet.
  3. replay: upstream's exact trial params through our Engine in this process
     (parity_with_upstream.run_ours): both refusal counts and KLs per trial (refusals must be equal,
     KL within 2 % relative) and both per-trial times.

Targets: ours 1 worker mean s/trial <= 0.3 x upstream's (#15); ours all-workers end-to-end wall <= 0.4 x
upstream's (same trial count); ours directions time <= upstream's. On a miss a per-phase breakdown of
both tools is printed. Front quality: hypervolume of the raw (refusals/n_bad, KL) Pareto front with
reference point (1, 1) (points beyond it dropped), and the fewest refusals reached at KL <= 0.05.
--record writes the section "bench_vs_upstream" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import _benchdoc as bd  # noqa: E402
import parity_with_upstream as par  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KL_LIMIT = 0.05
TARGET_TRIAL = 0.3  # issue #15 (was 0.6 before it)
TARGET_WALL = 0.4

OUT: list[str] = []  # everything printed to stdout, for --record


def say(line: str = "") -> None:
    print(line, flush=True)
    OUT.append(line)


def note(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load3() -> str:
    return "%.2f/%.2f/%.2f" % bd.loadavg()


def gate(args, what: str) -> dict:
    one, quiet = bd.wait_for_quiet(args.max_load, args.wait)
    note(f"{what}: starting at load {load3()}{'' if quiet else ' (NOT quiet)'}")
    samples: list[float] = []
    stop = threading.Event()

    def sample():  # the 1-min load every 5 s while the phase runs: other jobs may start meanwhile
        while not stop.is_set():
            samples.append(bd.loadavg()[0])
            stop.wait(5)

    threading.Thread(target=sample, daemon=True).start()
    return {"load_start": load3(), "quiet": quiet, "_stop": stop, "_samples": samples}


def finish(env: dict) -> dict:
    env.pop("_stop").set()
    samples = env.pop("_samples")
    env["load_end"] = load3()
    env["load_max"] = max(samples + [bd.loadavg()[0]])
    return env


# --- timestamped log lines ---------------------------------------------------------------------


class LineClock:
    """Timestamps each new line of a growing file (poll), or of a stream (a reader thread)."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []
        self._stop = False
        self._thread: threading.Thread | None = None

    def follow_file(self, path: Path, poll: float = 0.05) -> None:
        def run():
            pos, buf = 0, ""
            while True:
                try:
                    with open(path, "r", errors="replace") as f:
                        f.seek(pos)
                        chunk = f.read()
                        pos = f.tell()
                except OSError:
                    chunk = ""
                now = time.perf_counter()
                if chunk:
                    buf += chunk
                    *done, buf = buf.split("\n")
                    self.lines.extend((now, line) for line in done)
                if self._stop and not chunk:
                    if buf:
                        self.lines.append((now, buf))
                    return
                time.sleep(poll)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def follow_stream(self, stream, echo: bool = True) -> None:
        def run():
            for line in stream:
                self.lines.append((time.perf_counter(), line.rstrip("\n")))
                if echo:
                    print(f"    | {line.rstrip()}", file=sys.stderr, flush=True)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        if self._thread:
            self._thread.join(timeout=10)


# --- 1. upstream -------------------------------------------------------------------------------


def upstream_phases(lines: list[tuple[float, str]]) -> dict:
    """Directions seconds and per-trial phase seconds from upstream's timestamped log lines."""
    first = lambda mark, after=0.0: next((t for t, s in lines if mark in s and t >= after), None)  # noqa: E731
    out: dict = {"trials": []}
    t_dir = first("Calculating per-layer refusal directions")
    t_trial1 = first("Running trial 1 of")
    if t_dir is not None and t_trial1 is not None:
        out["directions_s"] = t_trial1 - t_dir
    t_prefix = first("Checking for common response prefix")
    t_base = first("Loading good evaluation prompts")
    if t_prefix is not None and t_base is not None:
        out["prefix_s"] = t_base - t_prefix
    if t_base is not None and t_dir is not None:
        out["baseline_s"] = t_dir - t_base
    # segments by line index, not by time: one trial's last lines and the next trial's first ones
    # are written in one burst and share a timestamp
    starts = [i for i, (_, s) in enumerate(lines) if re.search(r"Running trial \d+ of", s)]
    for n, i in enumerate(starts):
        s = lines[i][1]
        seg = lines[i:starts[n + 1] if n + 1 < len(starts) else len(lines)]
        mark = lambda m: next((t for t, s2 in seg if m in s2), None)  # noqa: E731
        reset, evaluating = mark("* Resetting model"), mark("* Evaluating")
        kl_done, ref_done = mark("* KL divergence:"), mark("* Refusals:")
        if None in (reset, evaluating, kl_done, ref_done):
            continue
        out["trials"].append({"trial": int(re.search(r"Running trial (\d+)", s).group(1)),
                              "edit_s": evaluating - reset, "kl_s": kl_done - evaluating,
                              "generation_s": ref_done - kl_done})
    return out


def run_upstream(args, folder: Path, out_dir: Path) -> dict:
    cfg = out_dir / "upstream-config.toml"
    saved = out_dir / "upstream.json"
    text = par.upstream_config(args, folder)
    if args.reuse_upstream and saved.exists() and cfg.exists() and cfg.read_text() == text:
        note(f"reusing the upstream results in {saved} (--reuse-upstream)")
        return json.loads(saved.read_text())
    cfg.write_text(text)
    run_dir = out_dir / "upstream-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = gate(args, "upstream")
    note(f"upstream Heretic 1.4.0: {args.trials} trials in {run_dir}")
    clock = LineClock()
    clock.follow_file(run_dir / "heretic.log")  # the runner recreates run_dir; the poller waits for it
    t = time.perf_counter()
    proc = subprocess.run(["bash", str(par.SCRIPTS / "upstream-heretic.sh"), str(cfg), str(run_dir)],
                          stdout=subprocess.PIPE, text=True)
    runner_wall = time.perf_counter() - t
    time.sleep(0.3)
    clock.stop()
    finish(env)
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.strip().startswith("{")]
    if proc.returncode != 0 or any("error" in r for r in rows) or not rows:
        tail = (run_dir / "heretic.log").read_text(errors="replace")[-3000:] if (run_dir / "heretic.log").exists() else ""
        sys.exit(f"upstream run failed (rc {proc.returncode}):\n{proc.stdout}\n--- heretic.log tail ---\n{tail}")
    (out_dir / "upstream-trials.jsonl").write_text(proc.stdout)
    summary = next(r for r in rows if r.get("summary"))
    trials = sorted((r for r in rows if not r.get("summary") and r["state"] == "COMPLETE"), key=lambda r: r["trial"])
    phases = upstream_phases(clock.lines)
    (out_dir / "upstream-phases.json").write_text(json.dumps(phases, indent=1))
    note(f"upstream done: {len(trials)} trials, wall {summary['wall_seconds']:.1f} s, "
         f"directions {phases.get('directions_s', float('nan')):.1f} s")
    result = {"summary": summary, "trials": trials, "phases": phases, "runner_wall_s": runner_wall,
              "wall_s": summary["wall_seconds"], "env": env,
              "prefix": par.upstream_prefix((run_dir / "heretic.log").read_text(errors="replace"))}
    saved.write_text(json.dumps(result, indent=1))
    return result


# --- 2. ours through the CLI -------------------------------------------------------------------


def ours_config(args, gguf: Path) -> str:
    return par.config_text(
        args, gguf, "# heretic-dist config written by scripts/bench_vs_upstream.py (same settings as upstream's)")


def run_ours_cli(args, gguf: Path, out_dir: Path, workers: int, cpus: float) -> dict:
    from heretic_dist import rundir as st

    label = f"{workers}x{cpus:g}"
    cfg = out_dir / "ours-config.toml"
    cfg.write_text(ours_config(args, gguf))
    saved = out_dir / f"ours-{label}.json"
    if args.reuse_ours and saved.exists():
        note(f"reusing ours {label} from {saved} (--reuse-ours)")
        return json.loads(saved.read_text())
    run_dir = out_dir / f"ours-run-{label}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "heretic_dist", "run", str(cfg), "--run-dir", str(run_dir),
           "--workers", str(workers), "--cpus-per-worker", f"{cpus:g}"]
    env = gate(args, f"ours {label}")
    note("$ " + shlex.join(cmd[1:]))
    clock = LineClock()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    clock.follow_stream(proc.stdout)
    proc.wait()
    wall = time.perf_counter() - t
    clock.stop()
    finish(env)
    text = [s for _, s in clock.lines]
    (out_dir / f"ours-{label}.log").write_text("\n".join(text) + "\n")
    if proc.returncode != 0:
        sys.exit(f"ours {label} failed (rc {proc.returncode}):\n" + "\n".join(text[-40:]))
    grab = lambda pat: next((float(m.group(1)) for s in text if (m := re.search(pat, s))), None)  # noqa: E731
    rows = [r for r in st.RunDir(str(run_dir)).read_parquet(st.TRIALS) if r["state"] == "COMPLETE"]
    info = json.loads((run_dir / "run_info.json").read_text())
    manifest = json.loads((run_dir / st.MANIFEST).read_text())
    trials = []
    for r in rows:
        tm = r.get("timings") or [{}]
        tm = json.loads(tm) if isinstance(tm, str) else tm
        trials.append({"trial": r["number"], "refusals": r["refusals"], "kl": r["kl"], "seconds": r["duration_s"],
                       "params": json.loads(r["params"]) if isinstance(r["params"], str) else r["params"],
                       **{k: sum(t.get(k, 0.0) for t in tm) for k in ("edit_s", "kl_s", "generation_s")}})
    note(f"ours {label} done: {len(trials)} trials, wall {wall:.1f} s")
    result = {"label": label, "workers": workers, "cpus": cpus, "wall_s": wall, "trials": trials,
            "directions_s": grab(r"directions: computed over \d+ workers in ([\d.]+) s"),
            "load_s": grab(r"model loaded once per worker in ([\d.]+) s"),
            "prefix_s": grab(r"response prefix: .* \(([\d.]+) s\)"),
            "baseline_s": grab(r"base model: .* \(([\d.]+) s\)"),
            "n_bad": manifest.get("n_bad_prompts"), "base_refusals": manifest.get("base_refusals"),
            "prefix": manifest.get("response_prefix"), "run_info": info, "env": env, "log": text}
    saved.write_text(json.dumps(result, indent=1))
    return result


# --- front quality -----------------------------------------------------------------------------


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    pts = sorted(set(points))
    out, best_y = [], float("inf")
    for x, y in pts:
        if y < best_y:
            out.append((x, y))
            best_y = y
    return out


def hypervolume(points: list[tuple[float, float]], ref=(1.0, 1.0)) -> float:
    """2-D hypervolume (both minimized) dominated by `points` up to `ref`; points beyond ref dropped."""
    f = front([(x, y) for x, y in points if x <= ref[0] and y <= ref[1]])
    hv = 0.0
    for i, (x, y) in enumerate(f):
        x_next = f[i + 1][0] if i + 1 < len(f) else ref[0]
        hv += (x_next - x) * (ref[1] - y)
    return hv


def quality(trials: list[dict], n_bad: int) -> dict:
    pts = [(t["refusals"] / n_bad, t["kl"]) for t in trials]
    ok = [t for t in trials if t["kl"] <= KL_LIMIT]
    best = min(ok, key=lambda t: (t["refusals"], t["kl"])) if ok else None
    return {"hv": hypervolume(pts), "front": [(round(x * n_bad), y) for x, y in front(pts)],
            "best": best, "n_bad": n_bad}


# --- report ------------------------------------------------------------------------------------


def fmt(v, spec=".1f", unit=" s"):
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def verdict(r, limit) -> str:
    if r is None:
        return "n/a"
    return f"{'PASS' if r <= limit else 'MISS'} (ratio {r:.2f} vs target <= {limit:.2f}: " \
           f"{'margin' if r <= limit else 'over by'} {abs(limit - r):.2f}, i.e. {abs(limit - r) / limit:.0%} of the target)"


def phase_table(name: str, trials: list[dict], seconds_key="seconds") -> list[str]:
    lines = [f"{name}:", f"  {'trial':>5}  {'total':>6}  {'edit':>6}  {'KL':>6}  {'gen':>6}  {'overhead':>8}"]
    for t in trials:
        if t.get("edit_s") is None or t.get(seconds_key) is None:
            continue
        over = t[seconds_key] - t["edit_s"] - t["kl_s"] - t["generation_s"]
        lines.append(f"  {t['trial']:>5}  {t[seconds_key]:>6.2f}  {t['edit_s']:>6.2f}  {t['kl_s']:>6.2f}  "
                     f"{t['generation_s']:>6.2f}  {over:>8.2f}")
    ok = [t for t in trials if t.get("edit_s") is not None and t.get(seconds_key) is not None]
    if ok:
        m = lambda k: statistics.fmean(t[k] for t in ok)  # noqa: E731
        lines.append(f"  {'mean':>5}  {m(seconds_key):>6.2f}  {m('edit_s'):>6.2f}  {m('kl_s'):>6.2f}  "
                     f"{m('generation_s'):>6.2f}  {m(seconds_key) - m('edit_s') - m('kl_s') - m('generation_s'):>8.2f}")
    return lines


def report(args, up: dict, ours: list[dict], replay: dict | None) -> None:
    up_trial = mean([t["seconds"] for t in up["trials"]])
    up_dir = up["phases"].get("directions_s")
    one, allw = ours[0], ours[-1]
    rows = [("upstream 1.4.0", up_dir, up_trial, up["wall_s"], len(up["trials"]), up["env"])]
    for o in ours:
        rows.append((f"ours {o['workers']} worker{'s' if o['workers'] > 1 else ''} x {o['cpus']:g} CPU",
                     o["directions_s"], mean([t["seconds"] for t in o["trials"]]), o["wall_s"], len(o["trials"]), o["env"]))
    say("== speed (same model, prompts, settings and trial count) ==")
    say(f"{'':<26} {'directions':>10} {'s/trial':>8} {'end-to-end':>10} {'trials':>6}  "
        f"{'dir ratio':>9} {'trial ratio':>11} {'wall ratio':>10}  load avg (1/5/15) start -> end, max 1-min")
    for name, d, tr, w, n, env in rows:
        rs = "" if name.startswith("upstream") else \
            f"{fmt(ratio(d, up_dir), '.2f', 'x'):>9} {fmt(ratio(tr, up_trial), '.2f', 'x'):>11} {fmt(ratio(w, up['wall_s']), '.2f', 'x'):>10}"
        rs = rs or f"{'':>9} {'':>11} {'':>10}"
        say(f"{name:<26} {fmt(d):>10} {fmt(tr, '.2f'):>8} {fmt(w):>10} {n:>6}  {rs}  "
            f"{env['load_start']} -> {env['load_end']}, max {env.get('load_max', float('nan')):.1f}"
            f"{'' if env['quiet'] else ' (not quiet at start)'}")
    say("(ratios are ours / upstream; s/trial is the mean wall time of one trial: for 2 workers two trials run at once,"
        " each on 1 CPU)")
    say("")
    say("== setup phases ==")
    ph = up["phases"]
    say(f"upstream: prefix {fmt(ph.get('prefix_s'))}, baseline (eval prompts, base logprobs + refusals) "
        f"{fmt(ph.get('baseline_s'))}, directions {fmt(ph.get('directions_s'))} (log-line times, +-0.1 s)")
    for o in ours:
        say(f"ours {o['label']}: model load {fmt(o['load_s'])}, prefix {fmt(o['prefix_s'])}, directions "
            f"{fmt(o['directions_s'])}, base scores {fmt(o['baseline_s'])}")
    say("")
    r_trial = ratio(mean([t["seconds"] for t in one["trials"]]), up_trial)
    r_wall = ratio(allw["wall_s"], up["wall_s"]) if len(allw["trials"]) == len(up["trials"]) else None
    say("== targets ==")
    say(f"ours 1 worker mean s/trial <= {TARGET_TRIAL}x upstream: {verdict(r_trial, TARGET_TRIAL)}")
    say(f"ours all workers ({allw['label']}) end-to-end wall <= {TARGET_WALL}x upstream: {verdict(r_wall, TARGET_WALL)}")
    missed = r_trial is None or r_trial > TARGET_TRIAL or r_wall is None or r_wall > TARGET_WALL
    for o in ours:
        r = ratio(o["directions_s"], up_dir)
        ok = r is not None and r <= 1.0
        missed |= not ok
        say(f"ours {o['label']} directions time <= upstream: {verdict(r, 1.0)}")
    say("")
    say("== front quality (raw refusals/n_bad vs KL; hypervolume to reference point (1, 1)) ==")
    for name, trials, n_bad in [("upstream", up["trials"], up["trials"][0]["n_prompts"])] + \
            [(f"ours {o['label']}", o["trials"], o["n_bad"]) for o in ours]:
        q = quality(trials, n_bad)
        b = q["best"]
        best = f"{b['refusals']}/{n_bad} at KL {b['kl']:.4f}" if b else f"none at KL <= {KL_LIMIT}"
        say(f"{name:<14} HV {q['hv']:.4f}; best refusals at KL <= {KL_LIMIT}: {best}; front (refusals, KL): "
            + ", ".join(f"({r}, {k:.4f})" for r, k in q["front"]))
    say(f"base refusals: upstream {up['trials'][0]['base_refusals']}/{up['trials'][0]['n_prompts']}, "
        + ", ".join(f"ours {o['label']} {o['base_refusals']}/{o['n_bad']}" for o in ours)
        + f"; response prefix: upstream {up['prefix']!r}, ours {ours[0]['prefix']!r}")
    same = [o["label"] for o in ours if [t["params"] for t in o["trials"]] == [t["params"] for t in up["trials"]]]
    say("trial params drawn: " + (f"identical to upstream's for {', '.join(same)}" if same else
                                  "different from upstream's (different samplers/space order): fronts are from different random draws"))
    say("")
    if replay is not None:
        say("== replay: upstream's trial params through our engine (in this process, torch default threads) ==")
        say(f"{'trial':>5}  {'scope':<9}  {'ref up':>6}  {'ref ours':>8}  {'KL up':>9}  {'KL ours':>9}  {'rel':>7}  "
            f"{'s up':>6}  {'s ours':>6}  {'edit':>5}  {'KL s':>5}  {'gen':>5}")
        ref_ok = kl_ok = True
        max_rel = 0.0
        for row, mine in zip(up["trials"], replay["trials"]):
            rel = par.rel_diff(mine["kl"], row["kl"])
            close = rel <= par.KL_REL_TOL or abs(mine["kl"] - row["kl"]) < par.KL_ABS_TOL
            ref_ok &= mine["refusals"] == row["refusals"]
            kl_ok &= close
            max_rel = max(max_rel, rel)
            bad = "" if close and mine["refusals"] == row["refusals"] else "  <- differs"
            say(f"{row['trial']:>5}  {row['params'].get('direction_scope', '?'):<9}  {row['refusals']:>6}  "
                f"{mine['refusals']:>8}  {row['kl']:>9.5f}  {mine['kl']:>9.5f}  {rel:>7.1e}  {row['seconds']:>6.2f}  "
                f"{mine['seconds']:>6.2f}  {mine['edit_s']:>5.2f}  {mine['kl_s']:>5.2f}  {mine['generation_s']:>5.2f}{bad}")
        base_ok = replay["base_refusals"] == up["trials"][0]["base_refusals"]
        say(f"replay: base refusals equal {'yes' if base_ok else 'NO'}; refusals equal in all trials "
            f"{'yes' if ref_ok else 'NO'}; KL within 2% {'yes' if kl_ok else 'NO'} (max rel diff {max_rel:.1e}); "
            f"mean s/trial ours {mean([t['seconds'] for t in replay['trials']]):.2f} vs upstream {up_trial:.2f} "
            f"({ratio(mean([t['seconds'] for t in replay['trials']]), up_trial):.2f}x); load {replay['env']['load_start']}"
            f" -> {replay['env']['load_end']}, max {replay['env'].get('load_max', float('nan')):.1f}")
        say(f"replay setup (single process): directions {replay['timings']['directions_s']:.1f} s, prefix "
            f"{replay['timings']['prefix_s']:.1f} s, baseline {replay['timings']['baseline_s']:.1f} s")
        say("")
    if missed or args.breakdown:
        say("== per-phase breakdown (seconds; overhead = trial seconds - edit - KL - generation) ==")
        ph_by = {p["trial"]: p for p in up["phases"]["trials"]}
        up_rows = [dict(t, **ph_by.get(t["trial"], {})) for t in up["trials"]]
        for line in phase_table("upstream (phases from log-line times; edit = reset + abliterate)", up_rows):
            say(line)
        for o in ours:
            for line in phase_table(f"ours {o['label']} (engine timings; overhead = Tune/Ray/lease)", o["trials"]):
                say(line)
        if replay is not None:
            rp = [dict(t, trial=row["trial"]) for t, row in zip(replay["trials"], up["trials"])]
            for line in phase_table("ours, replay in-process (overhead = baseline lookup, Python)", rp):
                say(line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--good-dir", type=int, default=24)
    p.add_argument("--bad-dir", type=int, default=24)
    p.add_argument("--good-eval", type=int, default=20)
    p.add_argument("--bad-eval", type=int, default=20)
    p.add_argument("--max-response-length", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers-all", type=int, default=None,
                   help="workers for the 'all workers' run (default: one per usable core, 1 CPU each)")
    p.add_argument("--max-load", type=float, default=2.5, help="wait for a 1-min load below this before each phase")
    p.add_argument("--wait", type=float, default=300, help="longest wait for a quiet machine per phase (s)")
    p.add_argument("--no-replay", action="store_true")
    p.add_argument("--reuse-upstream", action="store_true",
                   help="reuse upstream's results from --out-dir if its config is unchanged")
    p.add_argument("--reuse-ours", action="store_true",
                   help="reuse our saved CLI runs and replay from --out-dir where present (a run whose JSON was "
                   "removed is measured again)")
    p.add_argument("--breakdown", action="store_true", help="print the per-phase breakdown even if all targets pass")
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/heretic-bench-vs-upstream"))
    p.add_argument("--record", action="store_true", help="write the section bench_vs_upstream of docs/benchmarks.md")
    args = p.parse_args()
    args.model = "qwen"  # what parity_with_upstream's helpers read
    command = "python scripts/bench_vs_upstream.py " + shlex.join(sys.argv[1:])
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    n_all = args.workers_all or cores
    load_at_start = load3()

    gguf = par.model_gguf("qwen")
    folder = par.hf_folder(gguf)
    up = run_upstream(args, folder, out_dir)
    ours = [run_ours_cli(args, gguf, out_dir, 1, float(cores))]
    if n_all > 1:
        ours.append(run_ours_cli(args, gguf, out_dir, n_all, max(cores / n_all, 1.0) if cores >= n_all else 1.0))
    replay = None
    if not args.no_replay and args.reuse_ours and (out_dir / "replay.json").exists():
        note(f"reusing the replay from {out_dir / 'replay.json'} (--reuse-ours)")
        replay = json.loads((out_dir / "replay.json").read_text())
    elif not args.no_replay:
        env = gate(args, "replay")
        replay = par.run_ours(args, gguf, up["trials"])
        replay["env"] = finish(env)
        (out_dir / "replay.json").write_text(json.dumps(replay, indent=1))

    say(f"$ {command}")
    say(f"model: {gguf.name} (ours) / {folder.name} (upstream); float32, CPU, batch {args.batch_size}, "
        f"{args.max_response_length} new tokens, direction prompts {args.good_dir}+{args.bad_dir}, evaluation prompts "
        f"{args.good_eval}+{args.bad_eval}, seed {args.seed}, {args.trials} trials, n_startup_trials = n_trials "
        f"(both samplers draw every trial at random)")
    say(f"machine: {bd.machine()}; load average at start {load_at_start}, at end {load3()} (1/5/15 min)")
    say("")
    report(args, up, ours, replay)
    if args.record:
        body = "\n".join([
            "## Speed and front quality vs upstream Heretic 1.4.0 (`scripts/bench_vs_upstream.py`)",
            "",
            "Same model, prompts, settings and trial count for both tools; every trial random "
            "(n_startup_trials = n_trials) for both. Ours runs through the real CLI (`heretic-dist run`); "
            "upstream through `../shared/scripts/upstream-heretic.sh`. The machine is shared with other jobs: "
            "the load average is printed per phase, and seconds are only as good as it allows.",
            "",
            f"- Machine: {bd.machine()}",
            f"- Load average: {load_at_start} at start, {load3()} at end (1/5/15 min); per phase in the table",
            f"- Command: `{command}`",
            f"- Date: {bd.now_utc()}",
            "",
            "```",
            *OUT,
            "```",
        ])
        bd.write_section("bench_vs_upstream", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
