"""Running the GPU check's steps, each in its own process group with a time limit (gpu_check.py)."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gpu_check_report as report

REPO = Path(__file__).resolve().parents[1]
STEPS_PY = REPO / "scripts" / "gpu_check_steps.py"
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def child_env(single_gpu: bool) -> dict:
    env = {**os.environ, **QUIET_ENV}
    if single_gpu:  # like Ray's assignment: one device visible
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def step_command(kind: str, args: dict, result: Path, launcher: list[str] | None = None) -> list[str]:
    head = launcher or [sys.executable]
    return [*head, str(STEPS_PY), kind, "--args", json.dumps(args), "--result", str(result)]


def run_processes(commands: list[list[str]], timeout_s: float, env: dict, capture: bool) -> tuple[list, str]:
    """Start all commands at once (each its own process group) and wait at most timeout_s for all.
    Their output is kept (the last 200 lines each) and, unless `capture`, echoed as it comes.
    Returns the exit codes (all None when the limit stopped them) and the kept output."""
    procs = [subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1, start_new_session=True) for c in commands]
    kept = [collections.deque(maxlen=200) for _ in procs]

    def pump(i: int) -> None:
        tag = f"w{i}" if len(procs) > 1 else " "
        for line in procs[i].stdout:
            kept[i].append(line)
            if not capture and line.strip():
                print(f"   {tag}| {line.rstrip()}", flush=True)

    threads = [threading.Thread(target=pump, args=(i,), daemon=True) for i in range(len(procs))]
    for t in threads:
        t.start()
    deadline, stopped = time.monotonic() + timeout_s, False
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped = True
            break
    if stopped:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for t in threads:
        t.join(timeout=5)
    codes = [None if stopped else proc.returncode for proc in procs]
    return codes, "".join(line for lines in kept for line in lines)


def run_child(kind: str, args: dict, timeout_s: float, *, single_gpu: bool = True, capture: bool = False,
              launcher: list[str] | None = None, workdir: Path) -> dict:
    """One step process; its result file is read back. {"status", "seconds", "result"|"note", "output"}."""
    result = workdir / "results" / f"{kind}-{time.monotonic_ns()}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    codes, output = run_processes([step_command(kind, args, result, launcher)], timeout_s,
                                  child_env(single_gpu), capture)
    seconds = time.monotonic() - start
    if codes[0] is None:
        return {"status": "timeout", "seconds": seconds, "note": f"stopped at its {timeout_s:.0f} s limit",
                "output": output}
    if codes[0] != 0 or not result.exists():
        last = [line for line in output.splitlines() if line.strip()][-1:] or [f"exit code {codes[0]}"]
        return {"status": "failed", "seconds": seconds, "note": last[0][:300], "output": output}
    return {"status": "ok", "seconds": seconds, "result": json.loads(result.read_text()), "output": output}


def two_workers(args: dict, timeout_s: float, workdir: Path, capture: bool = False) -> dict:
    """Two plain worker processes on one GPU (0.5 of its memory each), timed sections behind a barrier."""
    barrier = Path(tempfile.mkdtemp(prefix="barrier-", dir=workdir))
    results = [workdir / "results" / f"worker-{i}-{time.monotonic_ns()}.json" for i in range(2)]
    results[0].parent.mkdir(parents=True, exist_ok=True)
    commands = [step_command("worker", {**args, "barrier": str(barrier), "worker": i, "workers": 2,
                                        "memory_fraction": 0.5}, results[i]) for i in range(2)]
    start = time.monotonic()
    codes, output = run_processes(commands, timeout_s, child_env(True), capture)
    seconds = time.monotonic() - start
    shutil.rmtree(barrier, ignore_errors=True)
    if any(c is None for c in codes):
        return {"status": "timeout", "seconds": seconds, "note": f"stopped at its {timeout_s:.0f} s limit",
                "output": output}
    if any(c != 0 for c in codes) or not all(r.exists() for r in results):
        last = [line for line in output.splitlines() if line.strip()][-1:] or [f"exit codes {codes}"]
        return {"status": "failed", "seconds": seconds, "note": last[0][:300], "output": output}
    loaded = [json.loads(r.read_text()) for r in results]
    return {"status": "ok", "seconds": seconds, "workers": loaded, "aggregate": report.overlap(loaded)}


def deepspeed_launcher() -> list[str]:
    """DeepSpeed's own launcher for two local ranks (no --local_rank argument; ranks read RANK etc.)."""
    exe = shutil.which("deepspeed")
    head = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*head, "--num_gpus", "2", "--no_local_rank"]
