"""Several trials in one batched pass (`cluster.trials_per_worker = K > 1`).

Each trial of a pass gets its own LoRA adapter on the one PEFT model ("default", "t1" .. "t{K-1}",
created at load with B = 0), and every row of the batched KL forward and of the batched refusal
generation names its trial's adapter through PEFT's mixed-adapter batch inference: `adapter_names`,
one per row, given to the PeftModel call, reaches each LoraLayer's forward, which adds B A x only to
the rows of that adapter ("__base__": none, the unedited model). A trial's result is the one
`run_trial` gives it alone, up to the last bits that a different batch composition changes.

Routed experts edited beside fused tensors (engine/experts.py) and tensor-parallel shards see no
per-row adapter, so such a model refuses K > 1 at load.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

import torch

from heretic_dist.errors import UserError

from .scoring import kl_per_prompt
from .types import PartialResult, Prompt, Shard, TrialParams

if TYPE_CHECKING:
    from .engine import Engine

BASE = "__base__"  # PEFT's adapter name for "no adapter on this row"
Item = tuple[TrialParams | None, Shard]


def adapter_names(k: int) -> list[str]:
    return ["default"] + [f"t{i}" for i in range(1, k)]


def refuse_unsupported(engine: Engine, k: int) -> None:
    """K > 1 needs every edited module to take a per-row adapter: one line saying what to set otherwise."""
    if k == 1:
        return
    where = ("this model's fused MoE experts" if engine.fused else
             "a tensor-parallel replica" if engine.tensor_parallel else None)
    if where:
        raise UserError(f"cluster.trials_per_worker = {k}: {where} cannot take one LoRA adapter per row; "
                        "set cluster.trials_per_worker = 1")


def add_adapters(peft_model, make_config, k: int) -> None:
    """The adapters "t1".."t{K-1}" beside "default", same targets and rank; not active, so a forward
    without adapter_names (run_trial, baselines) sees "default" only."""
    for name in adapter_names(k)[1:]:
        peft_model.add_adapter(name, make_config())


def check_mixed_batch(engine: Engine) -> None:
    """One tiny forward with two adapters: a LoRA layer that sees tokens rather than rows (e.g. MoE
    experts kept as module lists get the routed tokens) fails PEFT's row check here, at load, instead
    of in the middle of a trial."""
    inputs = engine.tokenizer(["Hello", "Hello there, how are you"], return_tensors="pt", padding=True,
                              return_token_type_ids=False).to(engine.model.device)
    try:
        with torch.inference_mode():
            engine.model(**inputs, use_cache=False, logits_to_keep=1, adapter_names=engine.adapters[:2])
    except ValueError as error:
        raise UserError(f"cluster.trials_per_worker = {len(engine.adapters)}: a LoRA layer of this model cannot "
                        f"take one adapter per row ({error}); set cluster.trials_per_worker = 1") from None


def run_trials(engine: Engine, items: list[Item]) -> list[PartialResult]:
    """Score the items' trials in one batched KL pass and one batched generation (see module doc)."""
    if len(items) > len(engine.adapters):
        raise ValueError(f"{len(items)} trials in one pass, but this engine holds {len(engine.adapters)} "
                         "adapters (cluster.trials_per_worker)")
    if len(items) <= 1:
        return [engine.run_trial(*item) for item in items]  # exactly the one-trial path
    goods = [shard.take(engine.good_eval) for _, shard in items]
    bases = [engine.baseline(shard) if good else None for (_, shard), good in zip(items, goods)]  # may reset
    names, edit_s = _write_adapters(engine, items)
    t0 = time.perf_counter()
    kl_sums = _kl_sums(engine, goods, bases, names)
    kl_s = (time.perf_counter() - t0) / len(items)
    results = [PartialResult(refusals=0, bad_scored=len(shard.take(engine.bad_eval)), kl_sum=kl, good_scored=len(g),
                             timings={"edit_s": e, "kl_s": kl_s, "generation_s": 0.0, "batched_with": float(len(items))},
                             host=socket.gethostname())
               for (_, shard), g, kl, e in zip(items, goods, kl_sums, edit_s)]
    _score_refusals(engine, items, names, results)
    return results


def _write_adapters(engine: Engine, items: list[Item]) -> tuple[list[str], list[float]]:
    """Item i's factors into adapter i; an unedited item (None) uses no adapter. Returns each item's
    adapter name for its rows and its own edit time."""
    names, seconds = [], []
    for adapter, (params, _) in zip(engine.adapters, items):
        t = time.perf_counter()
        if params is None:
            names.append(BASE)
        else:
            engine.apply(params, adapter)
            names.append(adapter)
        seconds.append(time.perf_counter() - t)
    return names, seconds


def _kl_sums(engine: Engine, goods: list[list[Prompt]], bases: list, names: list[str]) -> list[float]:
    """Every item's harmless prompts in one pass of first-token log-probs, each row on its adapter."""
    prompts = [p for good in goods for p in good]
    if not prompts:
        return [0.0] * len(goods)
    logprobs = engine.logprobs(prompts, [name for good, name in zip(goods, names) for _ in good])
    sums, start = [], 0
    for good, base in zip(goods, bases):
        part = logprobs[start : start + len(good)]
        start += len(good)
        sums.append(float(kl_per_prompt(base, part).sum()) if good else 0.0)
    return sums


def _score_refusals(engine: Engine, items: list[Item], names: list[str], results: list[PartialResult]) -> None:
    """One generation over the harmful prompts of every item under the KL gate (an item over it scores
    all its prompts as refusals and is not generated for); fills refusals or replies_to_judge."""
    judged = engine.settings.refusal_judge is not None
    chosen: list[tuple[int, list[Prompt]]] = []
    for i, ((_, shard), result) in enumerate(zip(items, results)):
        bad = shard.take(engine.bad_eval)
        if engine.over_kl_gate(result.kl_sum, result.good_scored):
            result.refusals = len(bad)  # as run_trial: too far from the original, refusing all
        elif bad:
            chosen.append((i, bad))
    if not chosen:
        return
    t0 = time.perf_counter()
    prompts = [p for _, bad in chosen for p in bad]
    adapters = [names[i] for i, bad in chosen for _ in bad]
    replies = engine.full_replies(prompts, adapters) if judged else engine.refusal_replies(prompts, adapters)
    share = (time.perf_counter() - t0) / len(chosen)
    start = 0
    for i, bad in chosen:
        mine, start = replies[start : start + len(bad)], start + len(bad)
        result = results[i]
        result.timings["generation_s"] = share
        if judged:  # the worker judges, as after run_trial
            result.replies_to_judge = list(zip((p.user for p in bad), mine))
        else:
            result.refusals = sum(engine.scorer.is_refusal(r) for r in mine)
