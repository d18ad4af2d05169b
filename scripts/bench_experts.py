"""Fused routed experts: memory and time of the edit on the forward path, against the alternatives.

On a Qwen3-MoE-shaped model built from a config (random weights, float32, CPU), prints:
- peak RSS of a worker's engine over 20 trials against the unedited model's peak over the same
  scoring passes, next to the size of the expert weights (target: overhead <= 5% of them);
- the bytes the per-expert factors hold while a trial is applied;
- time per trial with the routed experts edited vs the same model with experts skipped
  (attention_only: the model has no dense or shared MLP, so only the experts differ);
- the rejected alternative, an in-place edit W += B A undone by W -= B A (no copy either): time per
  edit+undo and how far the weights drift from the originals after 20 trials (not bit-exact).

Usage: python scripts/bench_experts.py [--layers 4] [--hidden 512] [--experts 32] [--record]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
from _benchdoc import load_text, machine, now_utc, write_section  # noqa: E402
from tiny_models import tiny_model_folder  # noqa: E402

from heretic_dist.config import PromptSetSpec, Settings  # noqa: E402
from heretic_dist.engine import experts  # noqa: E402
from heretic_dist.engine.ablation import directions_from_sums  # noqa: E402
from heretic_dist.engine.engine import Engine  # noqa: E402
from heretic_dist.engine.types import Shard  # noqa: E402
from heretic_dist.prompts import load_prompt_set  # noqa: E402
from heretic_dist.search.space import decode_trial_params  # noqa: E402


class PeakRss:
    """Samples this process's RSS every 2 ms while active."""

    def __init__(self) -> None:
        self.proc, self.peak, self._on = psutil.Process(), 0, False

    def __enter__(self) -> "PeakRss":
        self.peak, self._on = self.proc.memory_info().rss, True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while self._on:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._on = False
        self._thread.join()


def random_params(rng: random.Random, n_layers: int):
    raw = {"direction_scope": rng.choice(["global", "per layer"]),
           "direction_index": rng.uniform(0.4, 0.9) * (n_layers - 1)}
    for c in ("attn.o_proj", "mlp.down_proj"):
        raw |= {f"{c}.max_weight": rng.uniform(0.8, 1.5), f"{c}.max_weight_position": rng.uniform(0.6, 1.0) * n_layers,
                f"{c}.min_weight": rng.uniform(0, 1), f"{c}.min_weight_distance": rng.uniform(1, 0.6 * n_layers + 1)}
    return decode_trial_params(raw, n_layers)


def ready(folder: Path, **overrides) -> Engine:
    settings = Settings(model=str(folder), dtypes=["float32"], device_map="cpu", max_response_length=8,
                        batch_size=8, seed=1, **overrides)
    engine = Engine(settings)
    good = load_prompt_set(PromptSetSpec(dataset="builtin:demo_harmless", split="[:16]"), "You are a helpful assistant.")
    bad = load_prompt_set(PromptSetSpec(dataset="builtin:demo_harmful", split="[:16]"), "You are a helpful assistant.")
    (gs, gn), (bs, bn) = engine.residual_sums(good[:8]), engine.residual_sums(bad[:8])
    engine.set_directions(directions_from_sums(gs, gn, bs, bn, True))
    engine.set_eval_prompts(good[8:], bad[8:])
    engine.baseline(Shard())
    return engine


def timed_trials(engine: Engine, params: list) -> tuple[list[float], int]:
    times, peak_factors = [], 0
    for p in params:
        t0 = time.perf_counter()
        engine.run_trial(p, Shard())
        times.append(time.perf_counter() - t0)
        peak_factors = max(peak_factors, experts.edit_bytes(engine.fused))
    return times, peak_factors


def in_place_alternative(engine: Engine, params: list) -> tuple[float, float]:
    """W += B A, then W -= B A, per trial: (ms per edit+undo, max relative drift after all trials)."""
    originals = [e.module.down_proj.detach().clone() for e in engine.fused]  # only to measure the drift
    times = []
    for p in params:
        engine.apply(p)
        edits = [(e, experts.edit_of(e.module)) for e in engine.fused]
        t0 = time.perf_counter()
        with torch.no_grad():
            for entry, (a, b) in (x for x in edits if x[1] is not None):
                delta = b @ a
                entry.module.down_proj.add_(delta.mT if entry.transposed else delta)
            for entry, (a, b) in (x for x in edits if x[1] is not None):
                delta = b @ a
                entry.module.down_proj.sub_(delta.mT if entry.transposed else delta)
        times.append(time.perf_counter() - t0)
    drift = max(float((e.module.down_proj - o).abs().max() / o.abs().max()) for e, o in zip(engine.fused, originals))
    engine.reset()
    return 1000 * statistics.mean(times), drift


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    folder = tiny_model_folder(Path(tempfile.mkdtemp()) / "moe", "qwen3_moe", layers=args.layers, hidden=args.hidden,
                               scale_experts=True, num_experts=args.experts, num_experts_per_tok=4,
                               moe_intermediate_size=args.moe_intermediate, head_dim=64, num_attention_heads=8)
    rng = random.Random(0)
    params = [random_params(rng, args.layers) for _ in range(args.trials)]

    engine = ready(folder)
    expert_bytes = engine.info()["edited"]["fused_expert_bytes"]
    engine.run_trial(None, Shard())  # warm both paths before measuring
    engine.run_trial(params[0], Shard())
    with PeakRss() as unedited:
        base_times = [timed_trials(engine, [None])[0][0] for _ in range(3)]
    with PeakRss() as edited:
        times, factor_bytes = timed_trials(engine, params)
    place_ms, drift = in_place_alternative(engine, params)
    del engine
    gc.collect()
    skipped = ready(folder, attention_only=True)
    skipped.run_trial(params[0], Shard())
    skipped_times, _ = timed_trials(skipped, params)

    over = edited.peak - unedited.peak
    mib = 2**20
    lines = [
        f"model: qwen3_moe from a config, {args.layers} layers, hidden {args.hidden}, {args.experts} experts "
        f"(top 4), moe_intermediate {args.moe_intermediate}, float32, CPU; {args.trials} trials, "
        "8 harmless + 8 harmful prompts, 8 new tokens, row_normalization full (rank 3)",
        f"expert weights (fused gate_up + down, all layers): {expert_bytes / mib:.1f} MiB",
        f"peak RSS, unedited model over 3 scoring passes: {unedited.peak / mib:.1f} MiB",
        f"peak RSS over {args.trials} edited trials: {edited.peak / mib:.1f} MiB "
        f"(+{over / mib:.2f} MiB = {100 * over / expert_bytes:.2f}% of the expert weights; target <= 5%)",
        f"per-expert factors held while a trial is applied: {factor_bytes / 1024:.0f} KiB "
        f"({100 * factor_bytes / expert_bytes:.3f}% of the expert weights)",
        f"time per trial, unedited: {1000 * statistics.median(base_times):.0f} ms (median)",
        f"time per trial, routed experts edited: {1000 * statistics.median(times):.0f} ms (median)",
        f"time per trial, experts skipped (attention_only): {1000 * statistics.median(skipped_times):.0f} ms (median)",
        f"rejected alternative, in-place W += BA / W -= BA: {place_ms:.1f} ms per edit+undo on top of the "
        f"edit, drift after {args.trials} trials {drift:.1e} of max |W| (not bit-exact; the forward path is)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        write_section("bench_experts", f"""## Fused MoE experts: memory and time of the edit (`scripts/bench_experts.py`)

- machine: {machine()}; {load_text()}
- command: `python scripts/bench_experts.py --record`
- date: {now_utc()}

```
{text}
```

The edit of fused routed experts rides on the forward path (engine/experts.py): the base expert
tensors are never written, so reset is bit-exact, and what a trial adds is E x r x (d_in + d_out)
factor floats per layer.""")


if __name__ == "__main__":
    main()
