"""Greedy generation that stops paying for a reply once its verdict is known.

transformers' generate() keeps every row of a batch until all rows are done. For refusal counting a
reply is decided as soon as it contains a marker (or ends), so this loop drops decided rows from the
batch (and from the KV cache) and refills their slots with waiting prompts, longest prompts first.
It computes exactly what greedy generate() computes for each row when the model's generation config
has no logits processors; otherwise (e.g. a repetition penalty) the caller falls back to generate().
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch
import torch.nn.functional as F


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
        # columns that are padding in every remaining row (left of the prompts, or between a shared
        # prefix and the prompts' own tokens): drop them
        used = self.mask.any(dim=0)
        if len(self.index) and not bool(used.all()):
            columns = used.nonzero().squeeze(-1)
            self.mask = self.mask[:, columns]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, columns], layer.values[:, :, columns]

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


def _prefill_inputs(head, sequences: list[list[int]], pad_id: int, device, row_adapters: list[str] | None):
    """Model inputs and a fresh cache for prefilling `sequences` (after `head`, a SharedPrefix, if given)."""
    from transformers import DynamicCache

    from .prefix import left_padded

    if head is None:
        return left_padded(sequences, pad_id, device), DynamicCache()
    return left_padded(sequences, pad_id, device, head.length), head.cache(row_adapters, len(sequences))


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
) -> list[str]:
    """Greedy replies (decoded without special tokens), stopping each row at EOS, at max_new_tokens,
    or once decided(reply so far) is true. `adapters`: the LoRA adapter of each text (several trials
    in one batch); each call names the adapters of the rows it holds, so a row that leaves takes its
    adapter with it. `share_prefix`: the texts' common leading tokens are prefilled once
    (engine/prefix.py) and each prefill starts from them."""
    from . import prefix
    from .passes import adapter_kwargs

    device = model.device
    eos = _eos_ids(model, tokenizer)
    encoded = [tokenizer(t, return_token_type_ids=False)["input_ids"] for t in texts]
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
        group.next_tokens = out.logits[:, -1, :].float().argmax(dim=-1)
        return group

    def settle(group: _Rows) -> None:
        """Record each row's new token; drop rows that ended or were decided."""
        keep = []
        for r, token in enumerate(group.next_tokens.tolist()):
            generated = group.generated[r]
            done = token in eos
            if not done:
                generated.append(token)
            text = tokenizer.decode(generated, skip_special_tokens=True)
            if done or len(generated) >= max_new_tokens or (decided is not None and decided(text)):
                replies[group.index[r]] = text
            else:
                keep.append(r)
        group.keep(keep)

    while waiting or rows:
        if waiting and len(rows) < batch_size:
            take = [waiting.popleft() for _ in range(min(batch_size - len(rows), len(waiting)))]
            fresh = prefill(take)
            settle(fresh)
            rows.merge(fresh)
            continue
        rows.mask = torch.cat([rows.mask, torch.ones_like(rows.mask[:, :1])], dim=1)
        positions = rows.mask.sum(dim=-1, keepdim=True) - 1
        out = model(input_ids=rows.next_tokens[:, None], attention_mask=rows.mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **{cache_arg: rows.cache},
                    **adapter_kwargs(adapters, rows.index))
        rows.next_tokens = out.logits[:, -1, :].float().argmax(dim=-1)
        settle(rows)
    return replies
