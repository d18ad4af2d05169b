"""Greedy generation that stops paying for a reply once its verdict is known.

transformers' generate() keeps every row of a batch until all rows are done. For refusal counting a
reply is decided as soon as it contains a marker (or ends), so this loop drops decided rows from the
batch (and from the KV cache) and refills their slots with waiting prompts, longest prompts first.
It computes exactly what greedy generate() computes for each row when the model's generation config
has no logits processors; otherwise (e.g. a repetition penalty) the caller falls back to generate().
With draft tokens (engine/drafts.py) a decode call also checks each row's draft, so a row may gain
several tokens in one call; they are the tokens one-at-a-time decoding gives, and the row stops where
it would have stopped. Only argmaxes of the logits are read, so a CPU head with a bfloat16 screen
(engine/head_screen.py) serves them.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .drafts import Drafts


def plain_greedy_supported(model) -> bool:
    """True when greedy generate() would apply no logits processor and the cache is a plain one."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_dict({**model.generation_config.to_dict(), "do_sample": False})
        processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=1,
                                                 device="cpu", model_kwargs={})
    except Exception:  # private API changed: stay on the safe path
        return False
    from .prefix import supported as plain_cache_fits

    return len(processors) == 0 and plain_cache_fits(model)


def cache_kwarg(model) -> str:
    """transformers 5 renamed the forward argument past_key_values to cache."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None and not ids:
        ids.add(tokenizer.eos_token_id)
    return ids


class _Rows:
    """The active batch: per-row ids, attention mask, generated tokens and the KV cache."""

    def __init__(self):
        self.index: list[int] = []  # prompt index of each row
        self.generated: list[list[int]] = []
        self.mask: torch.Tensor | None = None
        self.cache = None
        self.next_tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.index)

    def keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.index):
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.index = [self.index[i] for i in keep]
        self.generated = [self.generated[i] for i in keep]
        self.mask = self.mask[idx]
        self.next_tokens = self.next_tokens[idx]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        # columns that are padding in every remaining row (left of the prompts, between a shared prefix
        # and the prompts' own tokens, or draft tokens only the rows that left kept): drop them
        used = self.mask.any(dim=0)
        if len(self.index) and not bool(used.all()):
            columns = used.nonzero().squeeze(-1)
            self.mask = self.mask[:, columns]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, columns], layer.values[:, :, columns]

    def trim(self, width: int) -> None:
        """Keep the first `width` columns (the ones after are masked in every row)."""
        if width < self.mask.shape[1]:
            self.mask = self.mask[:, :width]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]

    def merge(self, other: _Rows) -> None:
        """Append other's rows; the shorter history is left-padded (mask 0), so rows stay left-padded."""
        if not other.index:
            return
        if not self.index:
            self.__dict__.update(other.__dict__)
            return
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = width - t.shape[-dim_from_end]
            if missing == 0:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return F.pad(t, spec)

        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.index += other.index
        self.generated += other.generated


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax over the vocabulary (the first maximum, as argmax), read as the logits are (no float
    copy). max(dim) rather than argmax: on CPU it is several times faster over a 150k vocabulary."""
    return logits.max(dim=-1).indices


def _prefill_inputs(head, sequences: list[list[int]], pad_id: int, device, row_adapters: list[str] | None):
    """Model inputs and a fresh cache for prefilling `sequences` (after `head`, a SharedPrefix, if given)."""
    from transformers import DynamicCache

    from .prefix import left_padded

    if head is None:
        return left_padded(sequences, pad_id, device), DynamicCache()
    return left_padded(sequences, pad_id, device, head.length), head.cache(row_adapters, len(sequences))


def _decode(model, rows: _Rows, drafts: list[list[int]], pad_id: int, cache_arg: str,
            adapter_args: dict) -> list[list[int]]:
    """One decode call: each row's pending token, then its draft tokens (a causal block), left-aligned so
    that every row's pending token sits in the same column (shorter drafts end in masked filler).
    Returns each row's emitted tokens: the draft tokens greedy decoding agrees with, then the model's
    token after them. The draft tokens not kept are masked out of the cache; the block's columns that
    no row kept are dropped at once."""
    from .drafts import accepted_length

    n, width, device = len(rows), 1 + max((len(d) for d in drafts), default=0), rows.mask.device
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    fresh = torch.zeros((n, width), dtype=rows.mask.dtype)
    positions = torch.ones((n, width), dtype=torch.long)
    # each row's tokens so far (the pending token's position) and its pending token, in one sync
    facts = torch.stack([rows.mask.sum(dim=-1), rows.next_tokens.to(rows.mask.dtype)]).tolist()
    for r, draft in enumerate(drafts):
        block = [facts[1][r]] + draft
        ids[r, :len(block)] = torch.tensor(block, dtype=torch.long)
        fresh[r, :len(block)] = 1
        positions[r, :len(block)] = torch.arange(facts[0][r], facts[0][r] + len(block))
    start = rows.mask.shape[1]
    rows.mask = torch.cat([rows.mask, fresh.to(device)], dim=1)
    out = model(input_ids=ids.to(device), attention_mask=rows.mask, position_ids=positions.to(device),
                use_cache=True, logits_to_keep=width, **{cache_arg: rows.cache}, **adapter_args)
    predicted = greedy_tokens(out.logits).tolist()
    kept = [accepted_length(d, p) for d, p in zip(drafts, predicted)]
    if width > 1:
        block_mask = torch.zeros((n, width), dtype=rows.mask.dtype)
        for r, k in enumerate(kept):
            block_mask[r, :k + 1] = 1
        rows.mask[:, start:] = block_mask.to(device)
        rows.trim(start + 1 + max(kept))
    return [p[:k + 1] for p, k in zip(predicted, kept)]


def _advance(tokenizer, generated: list[int], tokens: list[int], eos: set[int], max_new_tokens: int,
             decided: Callable[[str], bool] | None) -> int | None:
    """Append a row's emitted tokens one at a time, stopping where one-token decoding would. Returns
    None while the row goes on, else the EOS token that ended it, or -1 (full length, or decided)."""
    for token in tokens:
        if token in eos:
            return token
        generated.append(token)
        if len(generated) >= max_new_tokens or (
                decided is not None and decided(tokenizer.decode(generated, skip_special_tokens=True))):
            return -1
    return None


def _drafted_decode(model, rows: _Rows, keys: list[tuple[int, ...]], drafts: Drafts | None, max_new_tokens: int,
                    pad_id: int, cache_arg: str, adapter_args: dict) -> list[list[int]]:
    """One decode call with each row's draft (none without `drafts`); the call's cost and the drafts'
    fate are reported to the policy."""
    if drafts is None:
        return _decode(model, rows, [[] for _ in rows.index], pad_id, cache_arg, adapter_args)
    started = time.perf_counter()
    proposed = drafts.for_rows(keys, rows.generated, [max_new_tokens - len(g) - 1 for g in rows.generated])
    emitted = _decode(model, rows, proposed, pad_id, cache_arg, adapter_args)
    drafts.policy.observe_call(len(rows) * (1 + max(map(len, proposed), default=0)), time.perf_counter() - started)
    drafts.policy.observe_drafts(sum(map(len, proposed)), sum(len(e) - 1 for e in emitted))
    return emitted


@torch.inference_mode()
def greedy_replies(
    model,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    batch_size: int,
    decided: Callable[[str], bool] | None = None,
    adapters: list[str] | None = None,
    share_prefix: bool = False,
    drafts: Drafts | None = None,
) -> list[str]:
    """Greedy replies (decoded without special tokens), stopping each row at EOS, at max_new_tokens,
    or once decided(reply so far) is true. `adapters`: the LoRA adapter of each text (several trials
    in one batch); each call names the adapters of the rows it holds, so a row that leaves takes its
    adapter with it. `share_prefix`: the texts' common leading tokens are prefilled once
    (engine/prefix.py) and each prefill starts from them. `drafts`: earlier replies to the same texts
    propose tokens that each decode call checks (engine/drafts.py); finished replies are added."""
    from . import head_screen

    with head_screen.argmax_only(model):  # only argmaxes of the logits are read below
        return _greedy_replies(model, tokenizer, texts, max_new_tokens, batch_size, decided, adapters,
                               share_prefix, drafts)


def _greedy_replies(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int,
                    decided: Callable[[str], bool] | None, adapters: list[str] | None, share_prefix: bool,
                    drafts: Drafts | None) -> list[str]:
    from . import prefix
    from .passes import adapter_kwargs

    device = model.device
    eos = _eos_ids(model, tokenizer)
    encoded = [tokenizer(t, return_token_type_ids=False)["input_ids"] for t in texts]
    keys = [tuple(ids) for ids in encoded]
    shared = prefix.split(model, encoded, adapters) if share_prefix else None
    head = None
    if shared is not None:
        head, encoded = shared  # encoded: each text's tokens after the shared ones
    waiting = deque(sorted(range(len(texts)), key=lambda i: -len(encoded[i])))
    replies = [""] * len(texts)
    rows = _Rows()
    pad_id = tokenizer.pad_token_id
    cache_arg = cache_kwarg(model)

    def prefill(indices: list[int]) -> _Rows:
        group = _Rows()
        inputs, cache = _prefill_inputs(head, [encoded[i] for i in indices], pad_id, device,
                                        None if adapters is None else [adapters[i] for i in indices])
        out = model(**inputs, use_cache=True, logits_to_keep=1, **{cache_arg: cache},
                    **adapter_kwargs(adapters, indices))
        group.index, group.generated = list(indices), [[] for _ in indices]
        group.mask, group.cache = inputs["attention_mask"], cache  # the cache object is filled in place
        group.next_tokens = greedy_tokens(out.logits[:, -1, :])
        return group

    def settle(group: _Rows, emitted: list[list[int]]) -> None:
        """Record each row's new tokens; drop rows that ended or were decided."""
        keep = []
        for r, tokens in enumerate(emitted):
            generated = group.generated[r]
            ended = _advance(tokenizer, generated, tokens, eos, max_new_tokens, decided)
            if ended is None:
                keep.append(r)
                continue
            replies[group.index[r]] = tokenizer.decode(generated, skip_special_tokens=True)
            if drafts is not None:
                drafts.memory.add(keys[group.index[r]], generated + ([ended] if ended >= 0 else []))
        group.next_tokens = torch.tensor([tokens[-1] for tokens in emitted], dtype=torch.long, device=device)
        group.keep(keep)

    while waiting or rows:
        if waiting and len(rows) < batch_size:
            take = [waiting.popleft() for _ in range(min(batch_size - len(rows), len(waiting)))]
            fresh = prefill(take)
            settle(fresh, [[token] for token in fresh.next_tokens.tolist()])
            rows.merge(fresh)
            continue
        settle(rows, _drafted_decode(model, rows, [keys[i] for i in rows.index], drafts, max_new_tokens,
                                     pad_id, cache_arg, adapter_kwargs(adapters, rows.index)))
    return replies
