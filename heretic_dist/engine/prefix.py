"""Shared-prefix reuse: the prompts of a pass all start with the same chat-template header and system
prompt (about half of a benchmark prompt's tokens), so that prefix's KV cache is computed once per pass
and every batch of the pass starts from it. It depends on the edit, so it is computed per pass (once
per trial) and per LoRA adapter when several trials share the pass.

A batch is laid out as prefix | left padding | suffix: the padding sits inside the sequence with mask 0
and the positions skip it, so each row attends to the same keys at the same positions as it does when
its whole prompt is prefilled. Only the float rounding of the batched matmuls differs.
"""

from __future__ import annotations

import torch


def supported(model) -> bool:
    """A plain DynamicCache stands in for the model's own: full attention in every layer, no sliding
    window (a sliding or hybrid cache would need the model's cache class)."""
    text_config = model.config.get_text_config()
    sliding = getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True)
    layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
    return not sliding and layer_types <= {"full_attention"}


def shared_length(encoded: list[list[int]]) -> int:
    """Tokens that every sequence starts with, leaving each at least one token of its own (its last
    position gives the logits). 0 when fewer than two sequences share anything."""
    if len(encoded) < 2:
        return 0
    shortest = min(len(ids) for ids in encoded)
    length = 0
    first = encoded[0]
    while length < shortest - 1 and all(ids[length] == first[length] for ids in encoded):
        length += 1
    return length


def split(model, encoded: list[list[int]], adapters: list[str] | None
          ) -> tuple[SharedPrefix, list[list[int]]] | None:
    """The shared leading tokens of the token lists, prefilled (per adapter in `adapters`), and each
    list's own remaining tokens; None when they share nothing."""
    from .generation import cache_kwarg

    length = shared_length(encoded)
    if length == 0:
        return None
    head = SharedPrefix(model, encoded[0][:length], adapters, cache_kwarg(model))
    return head, [ids[length:] for ids in encoded]


def left_padded(sequences: list[list[int]], pad_id: int, device, head: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded ids, their mask with `head` already cached tokens in front, and the positions of
    the ids (skipping the padding): the inputs of a prefill call."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), head + longest), dtype=torch.long)
    mask[:, :head] = 1
    for r, sequence in enumerate(sequences):
        ids[r, longest - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        mask[r, head + longest - len(sequence):] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, head:]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


class SharedPrefix:
    """The KV cache of `ids` under each adapter in `adapters` (None: the active adapter only)."""

    def __init__(self, model, ids: list[int], adapters: list[str] | None, cache_arg: str):
        from transformers import DynamicCache

        self.length = len(ids)
        names = sorted(set(adapters)) if adapters is not None else None
        self.slot = {name: i for i, name in enumerate(names)} if names is not None else None
        rows = len(names) if names is not None else 1
        device = model.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device).expand(rows, -1)
        positions = torch.arange(self.length, device=device).expand(rows, -1)
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=positions,
                  use_cache=True, logits_to_keep=1, **{cache_arg: cache},
                  **({} if names is None else {"adapter_names": names}))
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.cache_arg = cache_arg

    def cache(self, row_adapters: list[str] | None, rows: int):
        """A fresh cache holding the prefix for `rows` rows (row_adapters: each row's adapter)."""
        from transformers import DynamicCache

        slots = [self.slot[name] for name in row_adapters] if self.slot is not None else [0] * rows
        index = torch.tensor(slots, dtype=torch.long)
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.layers):
            at = index.to(keys.device)
            cache.update(keys[at], values[at], layer)
        return cache


def first_token_logprobs(model, prefix: SharedPrefix, suffixes: list[list[int]], pad_id: int,
                         row_adapters: list[str] | None) -> torch.Tensor:
    """passes.first_token_logprobs for prompts = prefix + suffix, starting from the prefix's cache."""
    import torch.nn.functional as F

    inputs = left_padded(suffixes, pad_id, model.device, prefix.length)
    names = {} if row_adapters is None else {"adapter_names": row_adapters}
    with torch.inference_mode():
        out = model(**inputs, use_cache=True, logits_to_keep=1,
                    **{prefix.cache_arg: prefix.cache(row_adapters, len(suffixes))}, **names)
    return F.log_softmax(out.logits[:, -1, :].to(torch.float32), dim=-1)
