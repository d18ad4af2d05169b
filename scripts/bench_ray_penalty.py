#!/usr/bin/env python
"""The same trials in a plain process, on a second thread of it, and in a Ray actor: the Ray-worker penalty.

Usage:
  python scripts/bench_ray_penalty.py [--model bench|smollm2] [--trials 4] [--rounds 2]
      [--max-load 1.0] [--wait 300] [--record]

One function (`measure`: load our Engine on the benchmark model with the benchmark settings of
scripts/bench_trials_per_worker.py, compute directions, one untimed warm-up trial, then --trials seeded
random parameter sets with run_trial) runs in this process ("plain"), in this process with the trials
scored on a second thread after loading on the first ("second thread": how a Ray actor ran trials
before heretic_dist/distributed/engine_thread.py, __init__ on its main thread and methods on a
concurrency group's), and as a Ray task reserving all of this machine's CPUs ("ray":
`ray.init(num_cpus=os.cpu_count())`), alternating --rounds times so that drift of a shared machine
hits all alike. Printed: seconds per trial and per phase (edit, KL, generation) for each, the cores
it kept busy (process CPU seconds over wall seconds), its ratio to plain, and what differs between the
processes that could explain one: thread settings (torch intra/inter-op threads, OMP/MKL/OpenBLAS
variables), CPU affinity, niceness, allocator variables (LD_PRELOAD, MALLOC_*), and the environment
variables Ray added. Same results are checked (refusals equal, KL equal).
--record writes the section `bench_ray_penalty` of docs/benchmarks.md.
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
import bench_trials_per_worker as btw  # noqa: E402

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KMP_AFFINITY", "OMP_PROC_BIND",
               "GOMP_CPU_AFFINITY", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_CONF", "PYTHONMALLOC")


def process_facts() -> dict:
    import torch

    return {
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "nice": os.nice(0),
        "vars": {k: os.environ.get(k) for k in THREAD_VARS if os.environ.get(k) is not None},
        "env_keys": sorted(os.environ),
    }


def measure(args_dict: dict) -> dict:
    """Load, warm up, score the trials; per-trial timings and results, and this process's facts. With
    `score_thread` the trials are scored on a second thread (the model loaded on this one), as a Ray actor
    did before its engine thread (heretic_dist/distributed/engine_thread.py)."""
    import threading

    import torch

    from heretic_dist.engine.types import Shard

    args = argparse.Namespace(**{k: v for k, v in args_dict.items() if k != "score_thread"})
    torch.set_grad_enabled(False)
    t = time.perf_counter()
    engine, params, model = btw.load_engine(args, 1)
    load_s = time.perf_counter() - t
    trials: list[dict] = []

    def score() -> None:
        torch.set_grad_enabled(False)  # per thread
        engine.run_trial(None, Shard())
        engine.run_trial(params[0], Shard())  # warm-up, untimed
        for p in params:
            t, cpu = time.perf_counter(), time.process_time()
            r = engine.run_trial(p, Shard())
            wall = time.perf_counter() - t
            trials.append({"wall": wall, "cores": (time.process_time() - cpu) / wall, **r.timings,
                           "refusals": r.refusals, "kl_sum": r.kl_sum})

    if args_dict.get("score_thread"):
        worker = threading.Thread(target=score)
        worker.start()
        worker.join()
    else:
        score()
    return {"trials": trials, "load_s": load_s, "model": model, "facts": process_facts()}


def in_ray(args_dict: dict) -> dict:
    import ray

    cpus = os.cpu_count() or 1
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False, object_store_memory=200 * 1024**2)
    probe = ray.remote(num_cpus=cpus)(measure)
    return ray.get(probe.remote(args_dict))


def mean(rows: list[dict], key: str) -> float:
    return sum(r.get(key, 0.0) for r in rows) / len(rows)


def report(runs: dict[str, list[dict]]) -> list[str]:
    keys = ("wall", "cores", "edit_s", "kl_s", "generation_s")
    lines = [f"{'where':<13} {'s/trial':>8} {'cores':>6} {'edit s':>7} {'kl s':>7} {'gen s':>7}   "
             "(mean over all rounds' trials; cores = process CPU seconds / wall seconds)"]
    stats = {}
    for where, results in runs.items():
        rows = [t for res in results for t in res["trials"]]
        stats[where] = s = {k: mean(rows, k) for k in keys}
        lines.append(f"{where:<13} {s['wall']:8.3f} {s['cores']:6.2f} {s['edit_s']:7.3f} {s['kl_s']:7.3f} "
                     f"{s['generation_s']:7.3f}")
    for where in [w for w in runs if w != "plain"]:
        r = {k: stats[where][k] / stats["plain"][k] if stats["plain"][k] else float("nan") for k in keys}
        lines.append(f"{where + '/plain':<13} {r['wall']:8.2f} {r['cores']:6.2f} {r['edit_s']:7.2f} "
                     f"{r['kl_s']:7.2f} {r['generation_s']:7.2f}")
    per_round = [f"{w} " + ", ".join(f"{mean(res['trials'], 'wall'):.3f}" for res in results)
                 for w, results in runs.items()]
    lines += ["s/trial per round: " + "; ".join(per_round)]
    same = all(a["refusals"] == b["refusals"] and a["kl_sum"] == b["kl_sum"]
               for other in runs.values() for a, b in zip(runs["plain"][0]["trials"], other[0]["trials"]))
    lines += [f"same refusals and KL in all: {same}", "", "process facts:"]
    plain, ray_ = runs["plain"][0]["facts"], runs["ray"][0]["facts"]
    for key in ("torch_threads", "interop_threads", "affinity", "nice", "vars"):
        lines.append(f"  {key:<16} plain {plain[key]!s:<40} ray {ray_[key]!s}")
    added = sorted(set(ray_["env_keys"]) - set(plain["env_keys"]))
    lines.append(f"  env vars only in the Ray actor ({len(added)}): {', '.join(added)}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    btw.add_engine_arguments(p, trials=4)  # the benchmark settings of bench_trials_per_worker
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-load", type=float, default=1.0)
    p.add_argument("--wait", type=float, default=300)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    engine_args = {k: v for k, v in vars(args).items() if k not in ("rounds", "max_load", "wait", "record")}
    command = "python scripts/bench_ray_penalty.py " + shlex.join(sys.argv[1:])
    _, quiet = bd.wait_for_quiet(args.max_load, args.wait)
    before, date = bd.load_text(), bd.now_utc()
    runs: dict[str, list[dict]] = {"plain": [], "second thread": [], "ray": []}
    for _ in range(args.rounds):
        runs["plain"].append(measure(engine_args))
        runs["second thread"].append(measure({**engine_args, "score_thread": True}))
        runs["ray"].append(in_ray(engine_args))
    after = bd.load_text()
    head = [bd.load_line(before, quiet, after), "",
            f"model {runs['plain'][0]['model']}, float32 on the CPU; {args.trials} trials per round (random "
            f"parameters, seed {args.seed}), {args.rounds} rounds alternating plain / second thread / "
            f"ray, {args.good_eval} + {args.bad_eval} prompts, {args.max_response_length} new tokens", ""]
    text = "\n".join(head + report(runs))
    print(f"$ {command}\n{text}")
    if args.record:
        bd.record("bench_ray_penalty", "The same trials in a plain process and in a Ray actor "
                  "(`scripts/bench_ray_penalty.py`)",
                  "one function loads our Engine and scores the same seeded trials, run in this process (scoring "
                  "on the loading thread or on a second one) and as a Ray task holding all CPUs, alternating "
                  "rounds; what differs between the processes is printed (definitions in the script's "
                  "docstring).", command, date, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
