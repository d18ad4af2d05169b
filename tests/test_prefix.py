"""Shared-prefix reuse (engine/prefix.py): the prompts' common head is prefilled once per pass, and the
results stay those of the full prefill (the replay test in test_engine.py switches it on and off)."""

from __future__ import annotations

import pytest
import torch
from test_engine import BAD, GOOD, SYSTEM, llama, ready_engine  # noqa: F401 (llama: a fixture)

from heretic_dist.engine import passes
from heretic_dist.engine.prefix import shared_length


@pytest.mark.parametrize("encoded, expected", [
    ([[1, 2, 3, 4], [1, 2, 3, 5, 6]], 3),
    ([[1, 2, 3], [1, 2, 3, 4]], 2),  # the shorter keeps one token of its own (its logits)
    ([[1, 2], [3, 4]], 0),
    ([[1, 2, 3]], 0),  # one prompt: nothing to share
    ([[7], [7, 8]], 0),
])
def test_shared_length(encoded, expected):
    assert shared_length(encoded) == expected


def tokens_fed(engine, run) -> int:
    """Input tokens of every forward through the model's embedding during run()."""
    fed = []
    embeddings = engine.model.get_input_embeddings()
    handle = embeddings.register_forward_pre_hook(lambda module, args: fed.append(args[0].numel()))
    try:
        run()
    finally:
        handle.remove()
    return sum(fed)


def test_the_shared_head_is_prefilled_once_per_pass(llama):
    engine = ready_engine(llama)
    texts = passes.render(engine.tokenizer, GOOD)
    head = shared_length(engine.tokenizer(texts)["input_ids"])
    assert head >= len(engine.tokenizer(SYSTEM)["input_ids"])  # the template header and system prompt
    fed = {}
    for share in (True, False):
        engine.share_prefix = share
        fed[share] = tokens_fed(engine, lambda: engine.logprobs(GOOD))
    # the head once instead of once per prompt (the suffixes are batched and padded alike)
    assert fed[False] - fed[True] == (len(GOOD) - 1) * head


def test_generation_from_the_shared_head_gives_the_same_replies(llama):
    """Batches refilled as rows finish (batch size 4 < 6 prompts), rows merged with other histories,
    padding between the head and the prompts dropped once unused: the same greedy replies."""
    engine = ready_engine(llama, max_response_length=24)
    replies = {}
    for share in (True, False):
        engine.share_prefix = share
        engine.early_stop = False
        replies[share] = engine.refusal_replies(BAD + GOOD)
    assert replies[True] == replies[False]
    assert len(set(replies[True])) > 1


def test_kl_logprobs_match_the_full_prefill(llama):
    engine = ready_engine(llama)
    values = {}
    for share in (True, False):
        engine.share_prefix = share
        values[share] = engine.logprobs(GOOD + BAD)
    assert torch.allclose(values[True], values[False], rtol=1e-4, atol=1e-5)
