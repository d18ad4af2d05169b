"""GPU check of the engine, in process (no Ray): seconds per trial next to the memory-bandwidth limit.

Run it through scripts/gpu_check.sh (which installs the wheels first). Steps, each in its own process
with its own time limit inside one overall budget, each printed and saved as it ends:

  device            GPU facts, measured device-to-device copy bandwidth, bf16 matmul rate
  build-0.5b        random-weight bf16 folder of the benchmark model's shape (Qwen2.5-0.5B)
  bf16-0.5b         seconds per trial, bf16, default prompt counts, every reply full length
  nf4-0.5b          the same with quantization = "bnb_4bit"
  two-workers-0.5b  two plain processes sharing the GPU (0.5 each): aggregate trials/min vs one
  build-8b, bf16-8b, nf4-8b   the same for an 8B-class shape (Llama-3.1-8B)
  tp2-8b            T = 2 tensor parallel (DeepSpeed's launcher, Engine with cluster.tensor_parallel = 2);
                    skipped with fewer than 2 GPUs

--dry-run checks all of this on CPU without a GPU (scripts/gpu_check_dry.py) and exits 0 when it holds.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_proc as proc  # noqa: E402
import gpu_check_report as report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HARD_LIMIT_S = 480  # the whole check, wheel installation included (gpu_check.sh)


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int  # at most this long
    min_s: int  # not started with less left
    shape: str = ""
    needs: tuple[str, ...] = ()


PLAN = [
    Step("device", 45, 15),
    Step("build-0.5b", 60, 20, "qwen2.5-0.5b", ("device",)),
    Step("bf16-0.5b", 100, 30, "qwen2.5-0.5b", ("build-0.5b",)),
    Step("nf4-0.5b", 100, 30, "qwen2.5-0.5b", ("build-0.5b",)),
    Step("two-workers-0.5b", 120, 40, "qwen2.5-0.5b", ("build-0.5b",)),
    Step("build-8b", 120, 40, "llama-3.1-8b", ("device",)),
    Step("bf16-8b", 120, 45, "llama-3.1-8b", ("build-8b",)),
    Step("nf4-8b", 150, 60, "llama-3.1-8b", ("build-8b",)),
    Step("tp2-8b", 150, 60, "llama-3.1-8b", ("build-8b",)),
]
STEP_NAMES = [s.name for s in PLAN]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="check the steps on CPU; no GPU needed")
    p.add_argument("--wheels", type=Path, help="wheel folder (tokenizer/ and prompts/ inside it are used)")
    p.add_argument("--json", type=Path, default=REPO / "runs" / "gpu_check.json", help="JSON summary")
    p.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    p.add_argument("--trials", type=int, default=3, help="timed trials per 0.5B step (after one warm-up)")
    p.add_argument("--trials-8b", type=int, default=2, help="timed trials per 8B step")
    p.add_argument("--n-good", type=int, default=100, help="harmless evaluation prompts (KL)")
    p.add_argument("--n-bad", type=int, default=100, help="harmful evaluation prompts (refusal replies)")
    p.add_argument("--tokens", type=int, default=100, help="new tokens per reply")
    p.add_argument("--batch-size", type=int, default=0, help="0: the engine's default")
    p.add_argument("--only", type=_names, help=f"comma-separated steps of: {','.join(STEP_NAMES)}")
    p.add_argument("--skip", type=_names, default=[], help="comma-separated steps to leave out")
    p.add_argument("--budget-s", type=float, default=HARD_LIMIT_S - 20, help="overall time budget")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "heretic-gpu-check",
                   help="model folders and step results (removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: WHEELS/tokenizer, else tiny BPE)")
    p.add_argument("--prompts", type=Path, help="folder with harmless.txt and harmful.txt")
    args = p.parse_args(argv)
    if args.wheels is not None:
        args.tokenizer = args.tokenizer or _existing(args.wheels / "tokenizer")
        args.prompts = args.prompts or _existing(args.wheels / "prompts")
    return args


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown steps {unknown}; steps: {','.join(STEP_NAMES)}")
    return names


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


# --- the GPU run ------------------------------------------------------------------------------

def trial_args(args: argparse.Namespace, step: Step, folder: Path) -> dict:
    return {"folder": str(folder), "dtype": "bfloat16", "tokens": args.tokens, "n_good": args.n_good,
            "n_bad": args.n_bad, "batch_size": args.batch_size, "prompts": _str(args.prompts),
            "trials": args.trials_8b if step.shape == "llama-3.1-8b" else args.trials,
            "quantization": "bnb_4bit" if step.name.startswith("nf4") else "none",
            "tensor_parallel": 2 if step.name.startswith("tp2") else 1}


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def skip_reason(step: Step, state: dict) -> str | None:
    """Why a step cannot run here (None: it can)."""
    for need in step.needs:
        if state["steps"].get(need, {}).get("status") != "ok":
            return f"needs step {need}"
    if step.name.startswith("nf4") and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (give the wheel folder: --wheels DIR)"
    if step.name.startswith("tp2"):
        gpus = state["device"].get("count", 0)
        if gpus < 2:
            return f"T = 2 needs 2 GPUs, this machine has {gpus}"
        if importlib.util.find_spec("deepspeed") is None:
            return "deepspeed is not installed (give the wheel folder: --wheels DIR)"
    return None


def run_step(step: Step, args: argparse.Namespace, state: dict, timeout_s: float) -> dict:
    workdir = args.workdir
    folder = workdir / step.shape
    if step.name == "device":
        return proc.run_child("device", {}, timeout_s, workdir=workdir)
    if step.name.startswith("build"):
        return proc.run_child("build", {"shape": step.shape, "folder": str(folder),
                                        "tokenizer": _str(args.tokenizer)}, timeout_s, workdir=workdir)
    if step.name.startswith("two-workers"):
        return proc.two_workers(trial_args(args, step, folder), timeout_s, workdir)
    if step.name.startswith("tp2"):
        return proc.run_child("trials", trial_args(args, step, folder), timeout_s, single_gpu=False,
                              launcher=proc.deepspeed_launcher(), workdir=workdir)
    return proc.run_child("trials", trial_args(args, step, folder), timeout_s, workdir=workdir)


def describe(step: Step, outcome: dict, state: dict) -> list[str]:
    """The step's printed lines; adds its limits to `outcome`."""
    if outcome["status"] != "ok":
        return [f"{step.name}: {outcome['status'].upper()} after {outcome.get('seconds', 0):.0f} s: {outcome['note']}"]
    result, device = outcome.get("result", {}), state["device"]
    if step.name == "device":
        return [report.device_line(result)]
    if step.name.startswith("build"):
        return [f"{step.name}: {result['params'] / 1e9:.3f}B parameters, {result['disk_bytes'] / 1e9:.2f} GB "
                f"on disk, tokenizer {result['tokenizer']} ({result['tokenizer_vocab']} tokens), "
                f"{result['seconds']:.0f} s"]
    if step.name.startswith("two-workers"):
        agg, one = outcome["aggregate"], state["steps"].get("bf16-0.5b", {}).get("limits")
        versus = (f" vs one worker {one['trials_per_min']:.1f} trials/min (x{agg['trials_per_min'] / one['trials_per_min']:.2f})"
                  if one else " (no one-worker figure: bf16-0.5b did not run)")
        outcome["note"] = f"x{agg['trials_per_min'] / one['trials_per_min']:.2f} vs one worker" if one else ""
        return [f"{step.name}: {agg['trials']} trials in {agg['span_s']:.1f} s = {agg['trials_per_min']:.1f} "
                f"trials/min aggregate{versus}; start skew {agg['start_skew_s']:.2f} s"]
    lines, outcome["limits"] = report.trial_lines(step.name, result, device)
    base = state["steps"].get("bf16-8b", {}).get("limits")
    if step.name.startswith("tp2") and base:
        lines.append(f"  vs 1 GPU: {base['seconds_per_trial']:.2f} s/trial "
                     f"(x{base['seconds_per_trial'] / outcome['limits']['seconds_per_trial']:.2f})")
    return lines


def cuda_gpus() -> int:
    """CUDA devices torch sees; 0 (with the reason printed) when there are none."""
    try:
        import torch
    except ImportError as error:
        print(f"gpu_check: torch cannot be imported ({error}); this check needs torch with CUDA")
        return 0
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}: torch.cuda.is_available() is False); "
              "`scripts/gpu_check.sh --dry-run` checks the steps without one")
        return 0
    return torch.cuda.device_count()


def real_run(args: argparse.Namespace) -> int:
    if not cuda_gpus():
        return 3
    if importlib.util.find_spec("pydantic") is None:
        print("gpu_check: pydantic is not installed (heretic_dist.config needs it): give the wheel folder, "
              "scripts/gpu_check.sh --wheels DIR")
        return 2
    begin = time.monotonic()
    deadline = begin + args.budget_s
    state = {"args": {k: _str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
             "device": {}, "steps": {}, "formula": report.FORMULA}
    chosen = [s for s in PLAN if (args.only is None or s.name in args.only) and s.name not in args.skip]
    chosen = [s for s in PLAN if s.name == "device"] + [s for s in chosen if s.name != "device"]
    print(f"gpu_check: {len(chosen)} steps, budget {args.budget_s:.0f} s; JSON summary {args.json}", flush=True)
    for step in chosen:
        left = deadline - time.monotonic()
        reason = skip_reason(step, state) or (f"{left:.0f} s left, it needs {step.min_s} s" if left < step.min_s else None)
        if reason:
            outcome = {"status": "skipped", "note": reason}
        else:
            print(f"-- {step.name} (limit {min(step.budget_s, left):.0f} s)", flush=True)
            outcome = run_step(step, args, state, min(step.budget_s, left))
        if step.name == "device" and outcome["status"] == "ok":
            state["device"] = outcome["result"]
        lines = describe(step, outcome, state) if outcome["status"] != "skipped" else [
            f"{step.name}: skipped: {outcome['note']}"]
        print("\n".join(lines), flush=True)
        outcome.pop("output", None)
        state["steps"][step.name] = {**outcome, "lines": lines}
        _first_run_facts(state, outcome)
        state["elapsed_s"] = time.monotonic() - begin
        report.write_summary(args.json, state)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)  # the model folders (8B: 16 GB)
    return finish(args, state)


def _first_run_facts(state: dict, outcome: dict) -> None:
    result = outcome.get("result") or {}
    for key in ("tokenizer", "prompts"):
        if key in result:
            state.setdefault(key, result[key])


def finish(args: argparse.Namespace, state: dict) -> int:
    failed = [n for n, s in state["steps"].items() if s["status"] in ("failed", "timeout")]
    print(f"gpu_check: done in {state['elapsed_s']:.0f} s; {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
          f"summary {args.json}", flush=True)
    if args.record:
        from _benchdoc import now_utc, write_section

        command = "bash scripts/gpu_check.sh " + shlex.join(sys.argv[1:])
        write_section("gpu_check", report.section(state, command, now_utc()))
    return 1 if failed or state["steps"].get("device", {}).get("status") != "ok" else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        from gpu_check_dry import dry_run

        return dry_run(args)
    return real_run(args)


if __name__ == "__main__":
    sys.exit(main())
