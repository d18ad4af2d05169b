"""What `evaluate-front` measures of one candidate on a worker: long replies, multi-token KL, perplexity.

- Long replies: greedy, `max_response_length` new tokens, special tokens removed, no early stop at a
  refusal marker (a reply still ends at EOS), rendered like the search renders prompts.
- Multi-token KL ("damage"): the base model's own greedy reply to each harmless prompt, its first
  N = kl_tokens tokens (fewer when it ends sooner; the EOS token counts as a position), teacher-forced:
  input = rendered prompt + reply[:n-1], left-padded like the first-token path. At each of the n positions
  KL(base || edited) = sum_v p_base (log p_base - log p_edit) over the full vocabulary, float32 from
  log_softmax; per prompt the mean over its positions, `kl` the mean over prompts. With N = 1 it is the
  search's first-token KL (same rendering, padding, batching and sort, logits_to_keep=1).
- Perplexity: exp(mean token NLL) over all texts: raw text, no chat template, BOS as the tokenizer adds
  it, each text truncated to its first PERPLEXITY_MAX_TOKENS tokens, padding masked out.

Base log-probs and memory: the base model's (n, vocab) float32 log-probs per prompt are kept on the CPU
with the reference (one reference per engine: the latest request key) only while all of them take at
most BASE_LOGPROBS_CACHE_BYTES (512 MiB; e.g. 100 prompts x 20 tokens fit for a 49k vocabulary, not for a
128k one). Then a candidate costs one edited forward per batch. Above the limit they are recomputed per
candidate in chunks of batches whose base log-probs fit the limit: per chunk reset, base forward, apply,
edited forward, so a candidate costs twice the forwards plus one `apply` per chunk.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from . import passes
from .scoring import kl_per_prompt
from .types import EvaluationRequest, EvaluationResult, Prompt, TrialParams

if TYPE_CHECKING:
    from .engine import Engine

BASE_LOGPROBS_CACHE_BYTES = 512 << 20
PERPLEXITY_MAX_TOKENS = 512


@dataclass
class DamageReference:
    """The base model's greedy replies to the damage prompts, as teacher-forcing inputs."""

    prompts: list[Prompt]
    kl_tokens: int
    inputs: list[list[int]]  # rendered prompt ids + the first n-1 reply tokens
    counts: list[int]  # n: the positions scored per prompt (kl_tokens, or fewer when the reply ended)
    base: list[torch.Tensor] | None = None  # (n, vocab) float32 CPU log-probs, kept while they are small
    base_batch: int = 0  # the batch size they were computed with (batching changes the last bits)


# --- pure passes over a model ----------------------------------------------------------------------


def left_pad(rows: list[list[int]], pad_id: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows, left-padded as the tokenizer pads prompts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def encode(tokenizer, texts: list[str], max_length: int | None = None) -> list[list[int]]:
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    return [tokenizer(t, return_token_type_ids=False, **kwargs)["input_ids"] for t in texts]


@torch.inference_mode()
def greedy_reply_ids(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int,
                     eos: set[int]) -> list[list[int]]:
    """Greedy reply tokens per text, cut after the first EOS token (which is kept)."""
    replies: list[list[int]] = []
    for batch in passes.batches(texts, batch_size):
        inputs = passes.tokenize(tokenizer, batch, model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
            replies.append(row[:end])
    return replies


@torch.inference_mode()
def position_logprobs(model, rows: list[list[int]], counts: list[int], pad_id: int | None) -> list[torch.Tensor]:
    """Float32 log-probs (count, vocab) on the CPU at each row's last `count` positions (one batch).
    With every count 1 this is passes.first_token_logprobs of the same left-padded batch."""
    ids, mask = left_pad(rows, pad_id, model.device)
    keep = max(counts)
    out = model(input_ids=ids, attention_mask=mask, position_ids=passes.position_ids(mask), use_cache=False,
                logits_to_keep=keep)
    logprobs = F.log_softmax(out.logits[:, -keep:, :].to(torch.float32), dim=-1).cpu()
    return [logprobs[r, keep - n:].clone() for r, n in enumerate(counts)]  # a kept row holds only itself


def mean_kl(base: torch.Tensor, edited: torch.Tensor) -> float:
    """Mean over positions of KL(base || edited) (kl_per_prompt per position)."""
    return float(kl_per_prompt(base, edited).mean())


@torch.inference_mode()
def nll_total(model, rows: list[list[int]], batch_size: int, pad_id: int | None) -> tuple[float, int]:
    """(sum of the token NLLs, number of predicted tokens) over token rows, in length-sorted batches."""
    total, count = 0.0, 0
    for batch in passes.sorted_batches([len(r) for r in rows], batch_size, True):
        part = [rows[i] for i in batch]
        ids, mask = left_pad(part, pad_id, model.device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=passes.position_ids(mask),
                       use_cache=False).logits
        width = ids.shape[1]
        for r, row in enumerate(part):
            if len(row) < 2:
                continue
            logprobs = F.log_softmax(logits[r, width - len(row): width - 1].to(torch.float32), dim=-1)
            targets = ids[r, width - len(row) + 1:]
            total -= float(logprobs.gather(-1, targets[:, None]).sum(dtype=torch.float64))
            count += len(row) - 1
    return total, count


# --- the measures, on an engine (its batch sizes and out-of-memory halving) -----------------------------


def long_replies(engine: Engine, prompts: list[Prompt], max_new_tokens: int) -> list[str]:
    """Greedy replies without special tokens, in prompt order; no early stop (EOS still ends one)."""
    if not prompts:
        return []
    model, tokenizer = engine.model, engine.tokenizer
    if engine.fast_generation and engine._plain_greedy:
        from .generation import greedy_replies

        texts = passes.render(tokenizer, prompts, engine.response_prefix)
        return engine._with_batch("generate", lambda b: greedy_replies(
            model, tokenizer, texts, max_new_tokens, b, None, share_prefix=engine.share_prefix,
            drafts=engine._drafts if engine.draft_replies else None))
    return engine._with_batch("generate", lambda b: passes.generate_replies(
        model, tokenizer, prompts, engine.response_prefix, max_new_tokens, b, True))


def _vocab_size(engine: Engine) -> int:
    return int(engine.model.get_output_embeddings().weight.shape[0])


def _forward(engine: Engine, ref: DamageReference, indices: list[int]) -> list[torch.Tensor]:
    return position_logprobs(engine.model, [ref.inputs[i] for i in indices], [ref.counts[i] for i in indices],
                             engine.tokenizer.pad_token_id)


def damage_reference(engine: Engine, prompts: list[Prompt], kl_tokens: int, limit: int) -> DamageReference:
    """Reset the model; its greedy replies to `prompts`, and their base log-probs when they fit `limit`."""
    from .generation import _eos_ids

    engine.reset()
    texts = passes.render(engine.tokenizer, prompts, engine.response_prefix)
    eos = _eos_ids(engine.model, engine.tokenizer)
    replies = engine._with_batch("generate", lambda b: greedy_reply_ids(
        engine.model, engine.tokenizer, texts, kl_tokens, b, eos))
    prompt_ids = encode(engine.tokenizer, texts)
    ref = DamageReference(list(prompts), kl_tokens, [p + r[:-1] for p, r in zip(prompt_ids, replies)],
                          [len(r) for r in replies])
    if 4 * _vocab_size(engine) * sum(ref.counts) <= limit:
        def base(b: int):
            batches = passes.sorted_batches([len(x) for x in ref.inputs], b, engine.sort_by_length, engine.call_tokens())
            rows: list[torch.Tensor | None] = [None] * len(ref.inputs)
            for batch in batches:
                for i, lp in zip(batch, _forward(engine, ref, batch)):
                    rows[i] = lp
            return rows, b

        ref.base, ref.base_batch = engine._with_batch("forward", base)
    return ref


def _chunks(batches: list[list[int]], counts: list[int], vocab: int, limit: int) -> list[list[list[int]]]:
    """Consecutive batches grouped so that each group's base log-probs take at most `limit` bytes."""
    chunks: list[list[list[int]]] = []
    size = limit + 1
    for batch in batches:
        need = 4 * vocab * sum(counts[i] for i in batch)
        if not chunks or size + need > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(batch)
        size += need
    return chunks


def damage_kl(engine: Engine, ref: DamageReference, edit: Callable[[], None], limit: int) -> list[float]:
    """Per-prompt mean KL(base || edited) over the reply positions. Expects the edit applied; leaves it
    applied (recomputing the base log-probs resets and re-applies it, chunk by chunk)."""
    def run(b: int) -> list[float]:
        batches = passes.sorted_batches([len(x) for x in ref.inputs], b, engine.sort_by_length, engine.call_tokens())
        kl = [0.0] * len(ref.inputs)
        if ref.base is not None and ref.base_batch == b:
            for batch in batches:
                for i, lp in zip(batch, _forward(engine, ref, batch)):
                    kl[i] = mean_kl(ref.base[i], lp)
            return kl
        chunks = _chunks(batches, ref.counts, _vocab_size(engine), limit)
        for chunk in chunks:
            engine.reset()
            base = {i: lp for batch in chunk for i, lp in zip(batch, _forward(engine, ref, batch))}
            edit()
            for batch in chunk:
                for i, lp in zip(batch, _forward(engine, ref, batch)):
                    kl[i] = mean_kl(base[i], lp)
            if len(chunks) == 1:
                ref.base, ref.base_batch = [base[i] for i in range(len(ref.inputs))], b
        return kl

    return engine._with_batch("forward", run)


def perplexity(engine: Engine, texts: list[str], max_tokens: int = PERPLEXITY_MAX_TOKENS) -> float | None:
    """exp(mean token NLL) over all texts (None when they have no token to predict)."""
    rows = encode(engine.tokenizer, texts, max_tokens)
    total, count = engine._with_batch("forward", lambda b: nll_total(
        engine.model, rows, b, engine.tokenizer.pad_token_id))
    return math.exp(total / count) if count else None


def evaluate(engine: Engine, params: TrialParams | None, request: EvaluationRequest,
             cache: dict, limit: int | None = None) -> EvaluationResult:
    """All measures `request` enables for `params` (None = the base model); see the module docstring.
    `cache` keeps the latest damage reference (by request key, response prefix and batching path)."""
    limit = BASE_LOGPROBS_CACHE_BYTES if limit is None else limit
    result = EvaluationResult(host=socket.gethostname())
    ref = None
    if request.damage and request.kl_tokens > 0:
        key = (request.key, engine.response_prefix, engine.sort_by_length, bool(engine.prepacked_bytes))
        ref = cache.get(key)
        if ref is None or ref.prompts != list(request.damage) or ref.kl_tokens != request.kl_tokens:
            t0 = time.perf_counter()
            cache.clear()  # one reference at a time: its base log-probs may take up to `limit` bytes
            ref = cache[key] = damage_reference(engine, request.damage, request.kl_tokens, limit)
            result.timings["kl_reference_s"] = time.perf_counter() - t0

    def edit() -> None:
        if params is None:
            engine.reset()
        else:
            engine.apply(params)

    t0 = time.perf_counter()
    edit()
    result.timings["edit_s"] = time.perf_counter() - t0
    if request.harmful or request.over_refusal:
        t0 = time.perf_counter()
        replies = long_replies(engine, list(request.harmful) + list(request.over_refusal),
                               request.max_response_length)
        result.harmful_replies = replies[: len(request.harmful)]
        result.over_refusal_replies = replies[len(request.harmful):]
        result.timings["replies_s"] = time.perf_counter() - t0
    if ref is not None:
        t0 = time.perf_counter()
        result.kl_per_prompt = damage_kl(engine, ref, edit, limit)
        result.kl = sum(result.kl_per_prompt) / len(result.kl_per_prompt)
        result.timings["kl_s"] = time.perf_counter() - t0
    if request.texts:
        t0 = time.perf_counter()
        result.perplexity = perplexity(engine, list(request.texts))
        result.timings["perplexity_s"] = time.perf_counter() - t0
    return result
