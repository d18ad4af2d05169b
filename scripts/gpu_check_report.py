"""The GPU check's arithmetic and wording: the memory-bandwidth limit, the step lines, the JSON summary
and the docs/benchmarks.md section. Pure Python (the dry run checks it on made-up numbers too)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

FORMULA = (
    "decode limit per trial = sum over decode steps of (weight bytes read per forward + KV-cache bytes "
    "read) / measured bandwidth; weight bytes = every parameter once per step (the input embedding left "
    "out when it is not the output head; NF4: packed weights + scales); KV bytes = rows x context x "
    "layers x 2 x kv_heads x head_dim x 2 (bf16 cache); bandwidth = a measured device-to-device copy "
    "(bytes read + written / time). Prompt forwards (prefill, KL) are bounded by compute instead: "
    "2 x matmul parameters x prompt tokens (padding included) / measured bf16 matmul rate."
)

SPEC_LABELS = {  # the makers' figures, printed as labels only; the limit uses the measured copy
    "H200": "H200 spec 4.8 TB/s",
    "H100": "H100 spec 3.35 TB/s (SXM) / 2.0 TB/s (PCIe)",
}


def spec_label(name: str) -> str:
    return next((label for key, label in SPEC_LABELS.items() if key in name), "no spec label for this GPU")


def trial_means(result: dict) -> dict:
    rows = result["trials"]
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))]
    return {k: statistics.fmean(r[k] for r in rows) for k in keys}


def limits(result: dict, device: dict) -> dict:
    """The per-trial lower bounds from the counted forwards (means over the timed trials)."""
    m = trial_means(result)
    weight = m["decode_calls"] * result["read_bytes_per_forward"]
    kv = m["decode_row_context"] * result["kv_bytes_per_token"]
    decode_s = (weight + kv) / device["bandwidth_Bps"]
    prompt_s = 2 * result["matmul_params"] * m["prompt_tokens"] / device["bf16_flops"]
    return {"decode_limit_s": decode_s, "prompt_limit_s": prompt_s, "decode_weight_bytes": weight,
            "decode_kv_bytes": kv, "decode_steps": m["decode_calls"],
            "seconds_per_trial": m["seconds"], "trials_per_min": 60 / m["seconds"],
            "full_length": all(r["decode_rows"] == result["expected_decode_rows"] for r in result["trials"])}


def trial_lines(label: str, result: dict, device: dict) -> tuple[list[str], dict]:
    """Two lines: the measured seconds per trial, and its memory-bandwidth limit next to it."""
    m, lim = trial_means(result), limits(result, device)
    rows = result["trials"][0]
    peak = result.get("peak_memory_bytes")
    lines = [
        f"{label}: {m['seconds']:.2f} s/trial = {lim['trials_per_min']:.1f} trials/min "
        f"(edit {m['edit_s']:.2f} s, KL {m['kl_s']:.2f} s, generation {m['generation_s']:.2f} s; "
        f"mean of {len(result['trials'])}); {result['n_good']}+{result['n_bad']} prompts, "
        f"{result['tokens']} new tokens, every reply full length: "
        f"{'yes' if lim['full_length'] else 'NO'} ({rows['decode_rows']}/{result['expected_decode_rows']} "
        f"decode rows); load {result['load_s']:.1f} s"
        + (f", peak {peak / 2**30:.1f} GiB" if peak else ""),
        f"  memory-bandwidth limit of its generation: {lim['decode_limit_s']:.3f} s = "
        f"{lim['decode_steps']:.0f} decode steps x {result['read_bytes_per_forward'] / 1e9:.3f} GB weights "
        f"+ {lim['decode_kv_bytes'] / 1e9:.2f} GB KV reads, / {device['bandwidth_Bps'] / 1e12:.2f} TB/s "
        f"measured ({spec_label(device['name'])}); prompt forwards >= {lim['prompt_limit_s']:.3f} s at "
        f"{device['bf16_flops'] / 1e12:.0f} TFLOP/s; measured / decode limit = "
        f"{m['generation_s'] / lim['decode_limit_s']:.1f}x",
    ]
    return lines, lim


def overlap(results: list[dict]) -> dict:
    """Several workers' timed sections: their trials over the span from the first start to the last end."""
    span = max(r["wall_end"] for r in results) - min(r["wall_start"] for r in results)
    n = sum(len(r["trials"]) for r in results)
    late_start = max(r["wall_start"] for r in results) - min(r["wall_start"] for r in results)
    return {"trials": n, "span_s": span, "trials_per_min": 60 * n / span, "start_skew_s": late_start}


def device_line(device: dict) -> str:
    return (f"GPU: {device['count']} x {device['name']} ({device['memory_bytes'] / 2**30:.0f} GiB), torch "
            f"{device['torch']} (CUDA {device['cuda']}), transformers {device['transformers']}; measured copy "
            f"{device['bandwidth_Bps'] / 1e12:.2f} TB/s ({spec_label(device['name'])}), bf16 matmul "
            f"{device['bf16_flops'] / 1e12:.0f} TFLOP/s")


def write_summary(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, path)


def section(summary: dict, command: str, date: str) -> str:
    """The docs/benchmarks.md section of one GPU run."""
    rows = []
    for name, step in summary["steps"].items():
        lim = step.get("limits")
        if lim:
            rows.append(f"| {name} | {lim['seconds_per_trial']:.2f} | {lim['trials_per_min']:.1f} | "
                        f"{lim['decode_limit_s']:.3f} | {lim['prompt_limit_s']:.3f} | "
                        f"{'yes' if lim['full_length'] else 'no'} |")
        elif step.get("aggregate"):
            a = step["aggregate"]
            rows.append(f"| {name} | | {a['trials_per_min']:.1f} (aggregate) | | | {step.get('note', '')} |")
        elif step.get("status") != "ok":
            rows.append(f"| {name} | {step.get('status')}: {step.get('note', '')} | | | | |")
    device = summary.get("device") or {}
    table = "\n".join(rows)
    return f"""## GPU check (engine in process, no Ray)

- what: seconds per trial of the real engine on random-weight models of the benchmark model's shape
  (Qwen2.5-0.5B) and an 8B-class shape (Llama-3.1-8B), bf16 and NF4, {summary['args']['n_good']}+{summary['args']['n_bad']}
  evaluation prompts, {summary['args']['tokens']} new tokens, every reply forced to full length (no marker
  early stop, no end-of-sequence), default batch size; two plain worker processes sharing one GPU;
  T = 2 tensor parallel where 2 GPUs exist. Tokenizer: {summary.get('tokenizer', '?')}; prompts:
  {summary.get('prompts', '?')}.
- machine: {device_line(device) if device.get('name') else 'no device facts'}
- command: `{command}`
- date: {date}; whole check {summary.get('elapsed_s', 0):.0f} s

| step | s/trial | trials/min | decode limit (s) | prompt-forward limit (s) | full length |
|---|---|---|---|---|---|
{table}

{FORMULA}
"""
