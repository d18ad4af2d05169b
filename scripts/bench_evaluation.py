"""How judged refusal counts change with reply length: one SmolLM2 run's front evaluated with the
keyword judge at 30 and at 150 tokens per reply (`evaluate-front`, configs/evaluation.toml's sets).

Steps: a demo run (configs/demo.toml, SmolLM2-135M, 8 trials; reused when --run-dir already holds it),
then `evaluate-front --config configs/evaluation.toml` with max_response_length 30 and 150 (everything
else as that file says: 40 held-out AdvBench test prompts, 30 over-refusal prompts, 40 damage prompts
at 20 tokens, 40 perplexity texts; the 3 front trials nearest the best point, plus the base model).

Usage: python scripts/bench_evaluation.py [--run-dir runs/bench-evaluation] [--record]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchdoc import REPO, load_text, machine, now_utc, wait_for_quiet, write_section  # noqa: E402

from heretic_dist.evaluation.front import EvaluateOptions, evaluate_front  # noqa: E402

LENGTHS = (30, 150)


def ensure_run(run_dir: Path) -> float:
    """The demo run (seconds it took; 0 when it was already complete)."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "heretic_dist", "run", str(REPO / "configs" / "demo.toml"),
                           "--run-dir", str(run_dir)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"demo run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t


def evaluate(run_dir: Path, length: int) -> tuple[list[dict], float]:
    text = (REPO / "configs" / "evaluation.toml").read_text()
    text = text.replace("max_response_length = 150", f"max_response_length = {length}")
    text = text.replace('"../../shared/', f'"{REPO.parent}/shared/')  # the copy lives elsewhere
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    t = time.perf_counter()
    outcome = evaluate_front(EvaluateOptions(run_dir=str(run_dir), config=f.name, progress=print))
    return outcome.rows, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bench-evaluation")
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--record", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    wait_for_quiet(args.max_load, 300)
    load = load_text()
    run_dir = Path(args.run_dir)
    run_s = ensure_run(run_dir)
    results = {n: evaluate(run_dir, n) for n in LENGTHS}
    by_trial = {n: {r["trial"]: r for r in rows} for n, (rows, _) in results.items()}
    trials = sorted(by_trial[LENGTHS[0]])
    lines = []
    for t in trials:
        a, b = by_trial[LENGTHS[0]][t], by_trial[LENGTHS[1]].get(t, {})
        search = "-" if a.get("search_refusals") is None else f"{a['search_refusals']}/20"
        lines.append(
            f"| {a['label']} | {search} | {a.get('search_kl') or 0:.4f} | {a['refusals']}/{a['n_harmful']} | "
            f"{b.get('refusals')}/{b.get('n_harmful')} | {a['over_refusals']}/{a['n_over_refusal']} | "
            f"{b.get('over_refusals')}/{b.get('n_over_refusal')} | {a['degenerate']} / {b.get('degenerate')} | "
            f"{a['kl']:.4f} | {a['perplexity']:.2f} |")
    seconds = ", ".join(f"{n} tokens {results[n][1]:.0f} s" for n in LENGTHS)
    body = f"""## Evaluation of a front at two reply lengths (`scripts/bench_evaluation.py`)

- what: configs/demo.toml's run (SmolLM2-135M Q4_1 gguf as float32, 8 trials, refusals scored on 20
  mild builtin prompts with 24-token replies), then `evaluate-front --config configs/evaluation.toml`
  (keyword judge, thinking blocks removed; 40 held-out AdvBench test prompts; 30 over-refusal prompts
  (builtin:over_refusal_mild); KL over the base model's first 20 reply tokens on 40 Alpaca test prompts;
  perplexity on 40 Alpaca instructions) at max_response_length {LENGTHS[0]} and {LENGTHS[1]}
- machine: {machine()}; {load}; 2 workers x 1 CPU
- command: `python scripts/bench_evaluation.py --record`, {now_utc()}; demo run {run_s:.0f} s; evaluations: {seconds}

| candidate | search refusals | search KL | refusals @{LENGTHS[0]} | refusals @{LENGTHS[1]} | over-refusals @{LENGTHS[0]} | over-refusals @{LENGTHS[1]} | degenerate @{LENGTHS[0]} / @{LENGTHS[1]} | KL @20 tokens | perplexity |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
""" + "\n".join(lines) + "\n"
    print(body)
    if args.record:
        write_section("bench_evaluation", body)


if __name__ == "__main__":
    main()
