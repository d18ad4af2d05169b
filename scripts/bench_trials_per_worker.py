#!/usr/bin/env python
"""Trials per minute of one engine scoring K trials per batched pass (cluster.trials_per_worker = K).

Usage:
  python scripts/bench_trials_per_worker.py [--model bench|smollm2] [--trials 8] [--ks 1,2,4]
      [--good-eval 20] [--bad-eval 20] [--max-response-length 30] [--batch-size 128] [--seed 42]
      [--max-load 1.0] [--wait 300] [--record]

1. Our Engine in this process (no Ray) on the benchmark model (Qwen2.5-Coder-0.5B-Instruct GGUF, float32
   on the CPU, as scripts/bench_limit.py) with the benchmark prompt sets, loaded once with
   trials_per_worker = max(K) adapters. `--trials` parameter sets are sampled from the search space with
   a seeded random sampler; the same list is scored for every K in this one run.
2. K = 1 is run_trial per trial (the one-trial path: the extra adapters are not active and take no part);
   K > 1 is run_trials on consecutive groups of K. Each K scores the whole list once, after one untimed
   warm-up trial; trials per minute = trials / wall seconds x 60, ratio = that over K = 1's.
3. Each trial's result under K > 1 is checked against its K = 1 result: refusals equal, and the largest
   relative KL deviation |kl_K - kl_1| / kl_1 (acceptance: 1e-4) is printed.
4. --batch-size is the row limit of one forward; at the default, K x the evaluation prompts fit in one
   batch, so the K trials really share each forward and each decode step.

What to expect on a GPU (a formula, not a measurement): one decode step costs about
    max(weight bytes / memory bandwidth, K x per-trial FLOPs of the step / FLOP rate)
so while a step is memory-bound (small models, a few dozen rows) K trials cost about one: trials per
minute grow about K-fold until the K x per-trial compute term reaches the weight-read term. On a CPU
the compute term dominates already at K = 1, so the ratios here stay near 1 (the batch only saves the
per-call overhead and the tail of the slowest rows).
--record writes the section `bench_trials_per_worker` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import _benchdoc as bd  # noqa: E402
import parity_with_upstream as par  # noqa: E402

GPU_FORMULA = ("decode step time ~ max(weight bytes / memory bandwidth, K x per-trial FLOPs / FLOP rate): "
               "while memory-bound, K trials cost about one")


def add_engine_arguments(p: argparse.ArgumentParser, trials: int) -> None:
    """The benchmark model and settings load_engine() reads (scripts/bench_ray_penalty.py takes them too)."""
    p.add_argument("--model", choices=["bench", "smollm2"], default="bench")
    p.add_argument("--trials", type=int, default=trials)
    p.add_argument("--good-dir", type=int, default=24)
    p.add_argument("--bad-dir", type=int, default=24)
    p.add_argument("--good-eval", type=int, default=20)
    p.add_argument("--bad-eval", type=int, default=20)
    p.add_argument("--max-response-length", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)


def load_engine(args, k_max: int):
    """The engine, its directions and evaluation prompts, and the fixed list of parameter sets."""
    import optuna
    import transformers

    from heretic_dist.config import PromptSetSpec, Settings
    from heretic_dist.config.schema import ClusterSettings
    from heretic_dist.engine.ablation import directions_from_sums
    from heretic_dist.engine.engine import Engine
    from heretic_dist.prompts import load_prompt_set
    from heretic_dist.search.space import SearchSpace, decode_trial_params

    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    gguf = par.model_gguf(args.model)
    specs = {k: PromptSetSpec(dataset=path, split=split) for k, (path, split) in par.prompt_sets(args).items()}
    settings = Settings(model=str(gguf), dtypes=["float32"], device_map="cpu", batch_size=args.batch_size,
                        max_response_length=args.max_response_length, seed=args.seed,
                        cluster=ClusterSettings(trials_per_worker=k_max), **specs)
    sets = {k: load_prompt_set(spec, settings.system_prompt, label=k) for k, spec in specs.items()}
    engine = Engine(settings)
    engine.set_response_prefix(engine.detect_response_prefix(sets["good_prompts"] + sets["bad_prompts"]))
    gs, gn = engine.residual_sums(sets["good_prompts"])
    bs, bn = engine.residual_sums(sets["bad_prompts"])
    engine.set_directions(directions_from_sums(gs, gn, bs, bn, settings.orthogonalize_direction))
    engine.set_eval_prompts(sets["good_evaluation_prompts"], sets["bad_evaluation_prompts"])
    info = engine.info()
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(args.seed))
    space = SearchSpace(info["n_layers"], settings.allow_mlp_off, tuple(info["components"]))
    params = [decode_trial_params(space(study.ask()), info["n_layers"], settings.allow_mlp_off)
              for _ in range(args.trials)]
    return engine, params, gguf.name


def score_all(engine, params: list, k: int) -> tuple[list, float]:
    """Every parameter set scored K to a pass (K = 1: run_trial); (results in order, wall seconds)."""
    from heretic_dist.engine.types import Shard

    t0 = time.perf_counter()
    if k == 1:
        results = [engine.run_trial(p, Shard()) for p in params]
    else:
        results = []
        for start in range(0, len(params), k):
            results += engine.run_trials([(p, Shard()) for p in params[start : start + k]])
    return results, time.perf_counter() - t0


def compare(reference: list, results: list) -> tuple[int, float]:
    """(trials whose refusals equal K = 1's, largest relative KL deviation from K = 1)."""
    equal = sum(a.refusals == b.refusals for a, b in zip(reference, results))
    deviation = max((abs(b.kl_sum - a.kl_sum) / abs(a.kl_sum) if a.kl_sum else abs(b.kl_sum))
                    for a, b in zip(reference, results))
    return equal, deviation


def run(args) -> dict:
    import torch

    from heretic_dist.engine.types import Shard

    torch.set_grad_enabled(False)
    ks = sorted({int(k) for k in args.ks.split(",")} | {1})
    engine, params, model = load_engine(args, max(ks))
    engine.run_trial(None, Shard())  # the base model's reference log-probs, computed once per run
    engine.run_trial(params[0], Shard())  # warm-up, untimed
    rows, reference = [], None
    for k in ks:
        results, seconds = score_all(engine, params, k)
        reference = reference or results  # K = 1 comes first
        equal, deviation = compare(reference, results)
        rows.append({"k": k, "seconds": seconds, "per_min": 60 * len(params) / seconds, "equal": equal,
                     "deviation": deviation, "refusals": [r.refusals for r in results],
                     "kl": [r.kl_sum / r.good_scored if r.good_scored else 0.0 for r in results]})
    return {"rows": rows, "model": model, "n": len(params), "threads": torch.get_num_threads()}


def report(args, facts: dict) -> list[str]:
    base = facts["rows"][0]["per_min"]
    lines = [f"model {facts['model']}, float32 on the CPU, torch threads {facts['threads']}; {facts['n']} trials "
             f"(random parameters, seed {args.seed}), {args.good_eval} harmless + {args.bad_eval} harmful prompts "
             f"per trial, {args.max_response_length} new tokens, batch size {args.batch_size}", "",
             f"{'K':>3} {'wall s':>8} {'trials/min':>10} {'vs K=1':>7} {'refusals = K=1':>15} {'max KL rel dev':>15}"]
    for r in facts["rows"]:
        lines.append(f"{r['k']:>3} {r['seconds']:8.2f} {r['per_min']:10.2f} {r['per_min'] / base:7.2f} "
                     f"{r['equal']:>8}/{facts['n']:<6} {r['deviation']:15.2e}")
    lines += ["", "refusals per trial: " + "; ".join(f"K={r['k']}: {r['refusals']}" for r in facts["rows"]),
              "KL per trial (K=1): " + ", ".join(f"{kl:.4g}" for kl in facts["rows"][0]["kl"]),
              "", f"GPU expectation: {GPU_FORMULA}"]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_arguments(p, trials=8)
    p.add_argument("--ks", default="1,2,4", help="comma-separated K values (1 is always measured)")
    p.add_argument("--max-load", type=float, default=1.0)
    p.add_argument("--wait", type=float, default=300)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    command = "python scripts/bench_trials_per_worker.py " + shlex.join(sys.argv[1:])
    _, quiet = bd.wait_for_quiet(args.max_load, args.wait)
    before, date = bd.load_text(), bd.now_utc()
    facts = run(args)
    after = bd.load_text()
    text = "\n".join([bd.load_line(before, quiet, after), ""] + report(args, facts))
    print(f"$ {command}\n{text}")
    if args.record:
        bd.record("bench_trials_per_worker", "Several trials per batched pass (trials_per_worker)",
                  "our Engine in one process on the benchmark model; one fixed list of seeded random parameter "
                  "sets scored with K = 1 (run_trial) and K > 1 (run_trials, K trials per batched KL pass and "
                  "generation, one LoRA adapter per trial chosen per row), in one run; each K's per-trial "
                  "results checked against K = 1's (definitions in the script's docstring).", command, date, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
