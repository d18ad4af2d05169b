"""Where the time of the edit goes, and what the CPU forward path gains from prepacked weights.

On the benchmark model (../shared/scripts/get-bench-model.sh, float32, CPU), prints:
- the full-normalization LoRA factors of one o_proj and one down_proj: written out (build the
  edited matrix, then torch.svd_lowrank) vs heretic-dist's direct path, with the difference of B A;
- one whole edit (every layer, both components) in float32 and with NF4 4-bit weights, and the part
  of it that is dequantization, next to the memory a per-worker cache of dequantized weights would
  take (the reason it is not cached);
- a 16-row decode step and a 16 x 31-token prefill with plain and prepacked linear weights.

Usage: python scripts/bench_edit.py [--model FOLDER] [--record]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchdoc import load_text, machine, now_utc, write_section  # noqa: E402

from heretic_dist.config import Settings  # noqa: E402
from heretic_dist.engine.ablation import (  # noqa: E402
    decode_trial_params,
    full_normalization_factors,
    reference_full_normalization_factors,
)
from heretic_dist.engine.engine import Engine  # noqa: E402

BENCH = Path.home() / ".cache/heretic-bench/hf/qwen2.5-coder-0.5b-instruct.Q4_K_M-float32"


def best_ms(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def every_layer_params(n_layers: int):
    raw = {"direction_scope": "global", "direction_index": n_layers / 2}
    for c in ("attn.o_proj", "mlp.down_proj"):
        raw |= {f"{c}.max_weight": 1.0, f"{c}.max_weight_position": n_layers / 2, f"{c}.min_weight": 0.5,
                f"{c}.min_weight_distance": float(n_layers)}
    return decode_trial_params(raw, n_layers)


def edit_timing(model: str, quantization: str) -> tuple[float, float, int, int]:
    """(edit ms, dequantization ms within it, edited modules, bytes a dequantized-weight cache takes)."""
    engine = Engine(Settings(model=model, dtypes=["float32"], device_map="cpu", quantization=quantization,
                             prepack_weights=False))
    config = engine.model.config.get_text_config()
    engine.set_directions(F.normalize(torch.randn(config.num_hidden_layers + 1, config.hidden_size), dim=1))
    params = every_layer_params(config.num_hidden_layers)
    edit = best_ms(lambda: engine.apply(params), 3)
    weights = {}
    dequant = best_ms(lambda: weights.update({n: engine._base_weight(n, m) for n, m in engine._lora.items()}), 3)
    cache_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    return edit, dequant, len(engine._lora), cache_bytes


def forward_timing(model: str) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, DynamicCache

    from heretic_dist.engine.prepack import prepack_linears

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    torch.manual_seed(0)
    prompt, step_ids = torch.randint(0, 1000, (16, 31)), torch.randint(0, 1000, (16, 1))
    result = {}
    for label in ("plain", "prepacked"):
        if label == "prepacked":
            prepack_linears(lm)
        with torch.inference_mode():
            result[f"prefill {label}"] = best_ms(lambda: lm(input_ids=prompt, logits_to_keep=1), 3)
            cache = DynamicCache()
            lm(input_ids=torch.randint(0, 1000, (16, 45)), past_key_values=cache, logits_to_keep=1)

            def step():
                lm(input_ids=step_ids, past_key_values=cache, logits_to_keep=1)
                for layer in cache.layers:  # back to 45 positions: every step sees the same cache
                    layer.keys, layer.values = layer.keys[:, :, :45], layer.values[:, :, :45]

            result[f"decode {label}"] = best_ms(step, 5)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(BENCH))
    parser.add_argument("--record", action="store_true", help="write the result into docs/benchmarks.md")
    args = parser.parse_args()
    if not Path(args.model).is_dir():
        print(f"error: {args.model} is not a model folder; run ../shared/scripts/get-bench-model.sh", file=sys.stderr)
        return 2
    lines = [f"threads: {torch.get_num_threads()}", "", "full-normalization factors (rank 3), one module:"]
    lines.append(f"{'shape':>12} {'written out ms':>15} {'direct ms':>10} {'rel diff of B A':>16}")
    torch.manual_seed(0)
    for shape in [(896, 896), (896, 4864)]:
        weight, v = torch.randn(*shape) * 0.02, F.normalize(torch.randn(shape[0]), dim=0)
        times, deltas = [], []
        for factors in (reference_full_normalization_factors, full_normalization_factors):
            a, b = factors(weight, v, 0.8, 3, 0)
            deltas.append(b @ a)
            times.append(best_ms(lambda: factors(weight, v, 0.8, 3, 0)))
        diff = float((deltas[0] - deltas[1]).norm() / deltas[0].norm())
        lines.append(f"{str(shape):>12} {times[0]:15.1f} {times[1]:10.1f} {diff:16.1e}")
    lines += ["", "one whole edit (every layer, both components, row_normalization full):"]
    for quantization in ("none", "bnb_4bit"):
        edit, dequant, modules, cache = edit_timing(args.model, quantization)
        if quantization == "none":
            lines.append(f"{quantization:>8}: edit {edit:.0f} ms over {modules} modules (weights used as they are)")
        else:
            lines.append(f"{quantization:>8}: edit {edit:.0f} ms, of which dequantizing the {modules} edited weights "
                         f"{dequant:.0f} ms; a per-worker cache of them would take {cache / 2**20:.0f} MiB")
    lines += ["", "forward with plain vs prepacked linear weights (best of 3-5):"]
    for key, value in forward_timing(args.model).items():
        lines.append(f"  {key:>18}: {value:7.1f} ms" + ("  (16 rows, 31 tokens)" if "prefill" in key else
                                                          "  (16 rows, one token, 45 cached)"))
    text = "\n".join(lines)
    print(text)
    if args.record:
        write_section("bench_edit", f"""## Edit and forward path details (`scripts/bench_edit.py`)

- model: {Path(args.model).name}, float32 (and NF4 4-bit for the edit), CPU
- machine: {machine()}; {load_text()}
- command: `python scripts/bench_edit.py --record`
- date: {now_utc()}

```
{text}
```
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
