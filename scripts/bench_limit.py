#!/usr/bin/env python
"""How close a trial gets to this machine's compute limit (issue #15, item 1).

Usage:
  python scripts/bench_limit.py [--model bench|smollm2] [--trials 3] [--good-eval 20] [--bad-eval 20]
      [--max-response-length 30] [--batch-size 16] [--seed 42] [--draft-tokens 4] [--max-load 1.0] [--wait 300] [--record]

1. Our Engine runs in this process on the benchmark model (Qwen2.5-Coder-0.5B-Instruct GGUF, float32 on
   the CPU, as scripts/bench_vs_upstream.py) with the benchmark settings, for `--trials` random trial
   parameters (seeded). Forward hooks count the work each trial does: every nn.Linear call (rows x in x
   out, LoRA factors and the LM head included: only the rows it projects) and, per decoder call, batch x
   new tokens x context for the attention products. Calls are split into the KL pass (prefill of the
   harmless prompts), the refusal prefill and the decode steps actually taken (early stops included),
   and padded rows are counted apart from real tokens.
2. FLOPs = 2 x multiply-adds: the Linears exactly as called (an LM head answering greedy decoding
   through its bfloat16 screen, engine/head_screen.py, counts as float32: the limit is the float32
   computation's); attention as 2 x 2 x heads x head_dim x
   (new tokens x context) per layer (scores and weighted sum, the full rectangle as SDPA computes it).
   Not counted: embeddings, norms, activations, rotary, sampling (memory-bound and small here).
3. This machine's sustained fp32 matmul rate, with torch's thread count as the engine runs: torch.mm and
   the engine's prepacked nn.Linear (engine/prepack.py; the faster of the two counts) at the model's
   Linear shapes, for the row counts of a prefill call (batch x prompt tokens) and of a decode step
   (batch rows), each the work-weighted median over the trials' calls. The compute limit of a phase is
   its FLOPs over the prefill-shape rate (the best this CPU sustains); the decode steps are also shown against the rate at their own row count (a
   decode step re-reads every weight for a few rows: memory-bound, not compute-bound).
4. The memory floor of the decode steps: every decode call streams all weights of the model's Linears
   (LM head included) from memory, so it takes at least their bytes over this machine's read bandwidth
   (measured: summing a 1 GiB float32 tensor, torch's threads), or its FLOPs over the compute rate if
   that is longer. Summed over the decode calls actually made (draft blocks included).
5. The GEMM floor as measured: every nn.Linear call of the trials (module, row count) is recorded and
   replayed alone afterwards, in order, on random inputs (replay_linears): the time the kernels need for
   exactly this work here; ours minus it is what the rest of a forward (attention, norms, cache, Python)
   costs.
6. Printed: per phase FLOPs, real vs padded rows, the limit in seconds and ours (the engine's own
   kl_s / generation_s timings), and the trial as a whole: ours / limit.
--record writes the section `bench_limit` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import _benchdoc as bd  # noqa: E402
import parity_with_upstream as par  # noqa: E402

PHASES = ("kl", "refusal_prefill", "decode")


class WorkCounter:
    """Forward hooks that add up the FLOPs and rows of each phase of a trial."""

    def __init__(self, model, n_heads: int, head_dim: int, n_layers: int):
        import torch.nn as nn

        self.phase: str | None = None  # the engine's pass: "kl" or "refusal_prefill" (generation)
        self.in_decode = False  # inside generation._decode: a decode step (one token, or a draft block)
        self.call_phase: str | None = None  # that pass's current decoder call: prefill or a decode step
        self.flops = defaultdict(float)  # phase -> FLOPs (linear + attention)
        self.attn_flops = defaultdict(float)
        self.rows = defaultdict(int)  # phase -> token rows through the decoder (padding included)
        self.real_rows = defaultdict(int)  # ... without padding
        self.calls = defaultdict(int)
        self.row_shapes: dict[str, list[int]] = defaultdict(list)  # rows per decoder call
        # phase -> (Linear, rows, screened: an LM head answering through its bfloat16 screen)
        self.linear_calls: dict[str, list[tuple[object, int, bool]]] = defaultdict(list)
        self.n_heads, self.head_dim, self.n_layers = n_heads, head_dim, n_layers
        self.handles = [m.register_forward_hook(self._linear) for m in model.modules() if isinstance(m, nn.Linear)]
        self.handles.append(_decoder(model).register_forward_pre_hook(self._decoder, with_kwargs=True))

    def _linear(self, module, inputs, output) -> None:
        if self.phase is not None and self.call_phase is not None:
            x = inputs[0]
            rows = x.numel() // module.in_features
            self.flops[self.call_phase] += 2.0 * rows * module.in_features * module.out_features
            screen = getattr(module, "_head_screen", None)
            self.linear_calls[self.call_phase].append((module, rows, bool(screen and screen.applies(module, x))))

    def _decoder(self, module, args, kwargs) -> None:
        if self.phase is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, new = (ids.shape[:2] if ids is not None else embeds.shape[:2])
        mask = kwargs.get("attention_mask")
        context = int(mask.shape[-1]) if mask is not None else int(new)
        phase = self.phase
        if phase == "refusal_prefill" and (new == 1 or self.in_decode):
            phase = "decode"  # generate(): the prompt's prefill, then one token a step; ours may check drafts
        self.call_phase = phase  # the Linears that follow (layers, LM head) belong to this call
        attn = 2.0 * 2.0 * self.n_heads * self.head_dim * batch * new * context * self.n_layers
        self.attn_flops[phase] += attn
        self.flops[phase] += attn
        self.rows[phase] += int(batch * new)
        real = int(mask[:, -new:].sum()) if mask is not None else int(batch * new)
        self.real_rows[phase] += real
        self.calls[phase] += 1
        self.row_shapes[phase].append(int(batch * new))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _decoder(model):
    """The decoder stack under the LM head (model.model for Llama/Qwen-style models, PEFT-wrapped or not)."""
    m = model
    for attr in ("base_model", "model"):
        while hasattr(m, attr) and not hasattr(m, "layers"):
            m = getattr(m, attr)
    if not hasattr(m, "layers"):
        raise SystemExit("bench_limit: cannot find the decoder layers of this model")
    return m


def matmul_rate(shapes: list[tuple[int, int]], rows: int, seconds: float = 1.5) -> dict[str, float]:
    """Sustained fp32 FLOP/s over the given (in, out) weight shapes for `rows` input rows, for each kernel:
    torch.mm, and the engine's own prepacked nn.Linear (engine/prepack.py) where this CPU has it."""
    import torch

    from heretic_dist.engine.prepack import prepack_linears, prepack_supported

    inputs = [torch.randn(rows, i) for i, _ in shapes]
    weights = [torch.randn(i, o) for i, o in shapes]
    kernels = {"torch.mm": [lambda a, b=b: torch.mm(a, b) for b in weights]}
    if prepack_supported():
        linears = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False) for i, o in shapes)
        prepack_linears(linears)
        kernels["prepacked"] = list(linears)
    rates = {}
    with torch.inference_mode():
        for name, calls in kernels.items():
            for call, a in zip(calls, inputs):  # warm-up
                call(a)
            flops, t0 = 0.0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                for (i, o), call, a in zip(shapes, calls, inputs):
                    call(a)
                    flops += 2.0 * rows * i * o
            rates[name] = flops / (time.perf_counter() - t0)
    return rates


def read_bandwidth(gib: float = 1.0, seconds: float = 1.5) -> float:
    """Sustained read bandwidth [bytes/s]: torch.sum over a tensor far larger than any cache."""
    import torch

    big = torch.ones(int(gib * (1 << 30)) // 4)
    big.sum()  # warm-up (pages touched)
    reads, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        big.sum()
        reads += big.numel() * 4
    return reads / (time.perf_counter() - t0)


def run(args) -> dict:
    import optuna
    import torch
    import transformers

    from heretic_dist.config import PromptSetSpec, Settings
    from heretic_dist.engine.ablation import directions_from_sums
    from heretic_dist.engine.engine import Engine
    from heretic_dist.engine.types import Shard
    from heretic_dist.prompts import load_prompt_set
    from heretic_dist.search.space import SearchSpace, decode_trial_params

    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_grad_enabled(False)
    gguf = par.model_gguf(args.model)
    specs = {k: PromptSetSpec(dataset=path, split=split) for k, (path, split) in par.prompt_sets(args).items()}
    settings = Settings(model=str(gguf), dtypes=["float32"], device_map="cpu", batch_size=args.batch_size,
                        max_response_length=args.max_response_length, n_trials=args.trials,
                        n_startup_trials=args.trials, seed=args.seed, draft_tokens=args.draft_tokens, **specs)
    sets = {k: load_prompt_set(spec, settings.system_prompt, label=k) for k, spec in specs.items()}
    engine = Engine(settings)
    engine.set_response_prefix(engine.detect_response_prefix(sets["good_prompts"] + sets["bad_prompts"]))
    gs, gn = engine.residual_sums(sets["good_prompts"])
    bs, bn = engine.residual_sums(sets["bad_prompts"])
    engine.set_directions(directions_from_sums(gs, gn, bs, bn, settings.orthogonalize_direction))
    engine.set_eval_prompts(sets["good_evaluation_prompts"], sets["bad_evaluation_prompts"])
    engine.run_trial(None, Shard())  # the base model's reference log-probs, computed once per run
    info = engine.info()
    config = engine.loaded.model.config
    n_heads, head_dim = config.num_attention_heads, getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads)
    counter = WorkCounter(engine.model, n_heads, head_dim, info["n_layers"])
    engine._drafts.policy.calls = engine._drafts.policy.wide_calls = 0  # count the trials' calls only
    _phase_wrappers(engine, counter)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(args.seed))
    space = SearchSpace(info["n_layers"], settings.allow_mlp_off, tuple(info["components"]))
    trials = []
    for _ in range(args.trials):
        trial = study.ask()
        params = decode_trial_params(space(trial), info["n_layers"], settings.allow_mlp_off)
        before = {p: counter.flops[p] for p in PHASES}
        t = time.perf_counter()
        result = engine.run_trial(params, Shard())
        seconds = time.perf_counter() - t
        trials.append({"seconds": seconds, **result.timings, "refusals": result.refusals,
                       "flops": {p: counter.flops[p] - before[p] for p in PHASES}})
        study.tell(trial, [float(result.refusals), result.kl_sum])
    counter.close()
    replay = replay_linears(counter, len(trials))
    # the layer's own weights; LoRA factors (rank-wide) are counted in the FLOPs but would drag the rate down
    linear_shapes = sorted({(m.in_features, m.out_features) for m in _decoder(engine.model).layers[0].modules()
                            if isinstance(m, torch.nn.Linear) and min(m.in_features, m.out_features) >= 64})
    policy = engine._drafts.policy if engine.draft_replies else None
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for name, m in engine.model.named_modules()
                       if isinstance(m, torch.nn.Linear) and ".lora_" not in name)  # what a decode call streams
    return {"trials": trials, "counter": counter, "replay": replay, "shapes": linear_shapes, "threads": torch.get_num_threads(),
            "weight_bytes": weight_bytes,
            "drafts": None if policy is None else {"acceptance": policy.acceptance(), "cost": policy.measured_cost(),
                                                   "calls": policy.calls, "wide_calls": policy.wide_calls},
            "model": gguf.name, "n_layers": info["n_layers"], "draft_tokens": settings.draft_tokens}


def _phase_wrappers(engine, counter: WorkCounter) -> None:
    """Set the counter's phase while the engine runs its KL pass and its refusal generation."""
    for name, phase in (("logprobs", "kl"), ("count_refusals", "refusal_prefill")):
        original = getattr(engine, name)

        def wrapped(*a, _original=original, _phase=phase, **kw):
            counter.phase, counter.call_phase = _phase, None
            try:
                return _original(*a, **kw)
            finally:
                counter.phase = counter.call_phase = None

        setattr(engine, name, wrapped)
    from heretic_dist.engine import generation

    original_decode = generation._decode

    def decode(*a, **kw):
        counter.in_decode = True
        try:
            return original_decode(*a, **kw)
        finally:
            counter.in_decode = False

    generation._decode = decode


def replay_linears(counter: WorkCounter, n_trials: int) -> dict[str, float]:
    """Seconds per trial of each phase's nn.Linear calls replayed alone: the same modules (their own
    forwards: prepacked weights, LoRA factors, the LM head, through its bfloat16 screen where the trial
    used it), the same row counts, in the trials' order, on random inputs. What the GEMM kernels need
    for this work on this machine, without attention, norms, cache handling or Python between them
    (run after counter.close(): no hooks). The screened head's cost depends a little on its input (how
    many tokens it recomputes), so on random inputs its share is close, not exact."""
    import torch

    inputs: dict[tuple[int, int], torch.Tensor] = {}
    seconds = {}
    with torch.inference_mode():
        for phase in PHASES:
            calls = counter.linear_calls[phase]
            for module, rows, _ in calls:
                if (rows, module.in_features) not in inputs:
                    inputs[rows, module.in_features] = torch.randn(rows, module.in_features)
            started = time.perf_counter()
            for module, rows, screened in calls:
                if screened:
                    module._head_screen.active += 1
                try:
                    module(inputs[rows, module.in_features])
                finally:
                    if screened:
                        module._head_screen.active -= 1
            seconds[phase] = (time.perf_counter() - started) / n_trials
    return seconds


def work_median(rows_per_call: list[int]) -> int:
    """The row count of the call that holds the median row of all calls: half the work runs in calls of
    at most this many rows (a plain median would let the many small calls, e.g. the shared prompt head
    prefilled once per pass, stand for the few large ones that do most of the work)."""
    ordered = sorted(rows_per_call) or [1]
    half, seen = sum(ordered) / 2, 0
    for rows in ordered:
        seen += rows
        if seen >= half:
            return rows
    return ordered[-1]


def report(facts: dict) -> list[str]:
    c, trials = facts["counter"], facts["trials"]
    n = len(trials)
    prefill_rows = work_median(c.row_shapes["kl"] + c.row_shapes["refusal_prefill"])
    decode_rows = work_median(c.row_shapes["decode"])
    prefill_rates = matmul_rate(facts["shapes"], prefill_rows)
    decode_rates = matmul_rate(facts["shapes"], decode_rows)
    peak, decode_rate = max(prefill_rates.values()), max(decode_rates.values())

    def rates(measured: dict[str, float]) -> str:
        return ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in measured.items())

    lines = [f"model {facts['model']}, {facts['n_layers']} layers, float32, torch threads {facts['threads']}; "
             f"{n} trials with random parameters (seeded)",
             f"fp32 matmul rate at the layers' Linear shapes {facts['shapes']} [GFLOP/s], the faster kernel counts:",
             f"  {prefill_rows} rows (work-median prefill call): {rates(prefill_rates)}  <- the compute limit below",
             f"  {decode_rows} rows (work-median decode step):  {rates(decode_rates)}", "",
             f"per trial (mean of {n}):  {'GFLOP':>8} {'attn':>6} {'rows':>7} {'real':>7} {'calls':>6} "
             f"{'limit s':>8} {'ours s':>7} {'ours/limit':>10}"]
    ours = {"kl": statistics.mean(t["kl_s"] for t in trials),
            "generation": statistics.mean(t["generation_s"] for t in trials)}
    limit_total = 0.0
    for phase in PHASES:
        flops = statistics.mean(t["flops"][phase] for t in trials)
        limit = flops / peak
        limit_total += limit
        mine = ours["kl"] if phase == "kl" else None
        lines.append(f"  {phase:<22} {flops / 1e9:8.2f} {c.attn_flops[phase] / n / 1e9:6.2f} {c.rows[phase] // n:7d} "
                     f"{c.real_rows[phase] // n:7d} {c.calls[phase] // n:6d} {limit:8.3f} "
                     + (f"{mine:7.3f} {mine / limit:10.2f}" if mine else f"{'':7} {'':10}"))
    gen_flops = statistics.mean(t["flops"]["refusal_prefill"] + t["flops"]["decode"] for t in trials)
    gen_limit = gen_flops / peak
    lines.append(f"  {'generation (prefill+decode)':<22} {gen_flops / 1e9:8.2f} {'':6} {'':7} {'':7} {'':6} "
                 f"{gen_limit:8.3f} {ours['generation']:7.3f} {ours['generation'] / gen_limit:10.2f}")
    decode_flops = statistics.mean(t["flops"]["decode"] for t in trials)
    lines.append(f"  decode steps at their own row count's rate: {decode_flops / decode_rate:.3f} s "
                 f"(memory-bound shape: the realistic floor for that phase)")
    whole = statistics.mean(t["seconds"] for t in trials)
    floor = limit_total - decode_flops / peak + decode_flops / decode_rate
    lines += ["", f"trial (edit + KL + generation): ours {whole:.3f} s, compute limit {limit_total:.3f} s: "
              f"ours / limit = {whole / limit_total:.2f} (edit {statistics.mean(t['edit_s'] for t in trials):.3f} s)",
              f"with the decode steps at their own row count's rate instead: limit {floor:.3f} s, "
              f"ours / limit = {whole / floor:.2f} (where the time over the compute limit goes: decoding "
              f"{decode_flops / decode_rate - decode_flops / peak:.3f} s, memory-bound)"]
    bandwidth = read_bandwidth()
    per_call = facts["weight_bytes"] / bandwidth
    decode_rows_total = max(sum(c.row_shapes["decode"]), 1)
    memory_floor = sum(max(per_call, decode_flops * rows / decode_rows_total / peak)
                       for rows in c.row_shapes["decode"]) / n
    real_floor = limit_total - decode_flops / peak + memory_floor
    lines += [f"memory floor of the decode steps: {c.calls['decode'] // n} calls x {facts['weight_bytes'] / 1e9:.2f} GB "
              f"of Linear weights / {bandwidth / 1e9:.1f} GB/s read bandwidth = {memory_floor:.3f} s per trial; "
              f"with it: limit {real_floor:.3f} s, ours / limit = {whole / real_floor:.2f}"]
    replay = facts["replay"]
    gemm = sum(replay.values())
    lines += [f"the trials' own Linear calls replayed alone (same modules and row counts, in order): "
              + ", ".join(f"{phase} {replay[phase]:.3f} s" for phase in PHASES)
              + f" = {gemm:.3f} s per trial; ours / that = {whole / gemm:.2f}; the rest (attention, norms, "
              f"cache, Python) {whole - gemm:.3f} s"]
    drafts = facts["drafts"]
    if drafts:  # engine/drafts.py: decode calls that also checked draft tokens (their FLOPs count above)
        a, b = drafts["cost"]
        lines.append(f"draft tokens (draft_tokens = {facts['draft_tokens']}): {drafts['wide_calls']} of "
                     f"{drafts['calls']} decode calls checked drafts, {drafts['acceptance']:.2f} of draft tokens "
                     f"kept; fitted decode call cost {a * 1e3:.1f} ms + {b * 1e3:.2f} ms per query position")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["bench", "smollm2"], default="bench")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--good-dir", type=int, default=24)
    p.add_argument("--bad-dir", type=int, default=24)
    p.add_argument("--good-eval", type=int, default=20)
    p.add_argument("--bad-eval", type=int, default=20)
    p.add_argument("--max-response-length", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--draft-tokens", type=int, default=4, help="the engine's draft_tokens (0 = off)")
    p.add_argument("--max-load", type=float, default=1.0)
    p.add_argument("--wait", type=float, default=300)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    command = "python scripts/bench_limit.py " + shlex.join(sys.argv[1:])
    _, quiet = bd.wait_for_quiet(args.max_load, args.wait)
    before, date = bd.load_text(), bd.now_utc()
    facts = run(args)
    lines = report(facts)
    after = bd.load_text()
    text = "\n".join([bd.load_line(before, quiet, after), ""] + lines)
    print(f"$ {command}\n{text}")
    if args.record:
        bd.record("bench_limit", "A trial next to this CPU's compute limit",
                  "our Engine in one process on the benchmark model with the benchmark settings; forward hooks "
                  "count each trial's FLOPs (every Linear as called, attention products per decoder call) per "
                  "phase; the limit is those FLOPs at the fp32 matmul rate this CPU sustains at the model's "
                  "Linear shapes (definitions in the script's docstring).", command, date, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
