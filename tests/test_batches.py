"""The KL pass's batches cut by call cost (passes.length_groups): less padding, the same log-probs."""

from __future__ import annotations

import pytest
import torch
from test_engine import BAD, GOOD, llama, ready_engine  # noqa: F401 (llama: a fixture)

from heretic_dist.engine import passes


def padded_cost(groups, lengths, call_tokens):
    return sum(call_tokens + len(g) * max(lengths[i] for i in g) for g in groups)


def test_length_groups_gives_long_prompts_a_batch_of_their_own():
    lengths = [30, 28, 25, 21, 20, 19, 19, 17, 17, 17, 17, 17, 16, 16, 15, 15, 14, 12, 12, 10]  # a benchmark pass
    order = list(range(len(lengths)))  # already longest first
    plain = passes.length_groups(order, lengths, 16, float("inf"))
    assert plain == [order[:16], order[16:]]
    groups = passes.length_groups(order, lengths, 16, 31.0)
    assert [i for g in groups for i in g] == order and all(len(g) <= 16 for g in groups)
    assert padded_cost(groups, lengths, 31.0) < padded_cost(plain, lengths, 31.0)
    assert groups[0] == [0, 1, 2]  # the three longest alone: 13 other rows no longer padded to 30


def test_length_groups_is_optimal_against_brute_force():
    import itertools

    lengths = [9, 7, 7, 4, 3, 3, 1]
    order = list(range(len(lengths)))
    for size, call in ((3, 0.5), (7, 4.0), (2, 10.0), (7, 0.0)):
        best = min(padded_cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))], lengths, call)
                   for k in range(len(order))
                   for cuts in itertools.combinations(range(1, len(order)), k)
                   if all(b - a <= size for a, b in zip((0,) + cuts, cuts + (len(order),))))
        groups = passes.length_groups(order, lengths, size, call)
        assert padded_cost(groups, lengths, call) == pytest.approx(best)
        assert all(len(g) <= size for g in groups)


def test_cost_cut_batches_give_the_same_logprobs(llama):
    engine = ready_engine(llama)
    prompts = GOOD + BAD
    args = (engine.model, engine.tokenizer, prompts, "", 4, True, None, True)
    plain = passes.logprobs(*args, float("inf"))
    calls = []
    handle = engine.model.get_input_embeddings().register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        tiny_calls = passes.logprobs(*args, 0.0)  # free calls: every batch holds rows of one length
    finally:
        handle.remove()
    assert len(calls) > 1 + -(-len(prompts) // 4)  # really cut into more batches (1: the shared head)
    assert torch.allclose(tiny_calls, plain, rtol=1e-5, atol=1e-6)
