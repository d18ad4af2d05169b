"""Draft tokens from earlier replies (engine/drafts.py): the replies stay the greedy replies, and good
drafts really cut the decode calls (the replay test in test_engine.py switches drafts on and off)."""

from __future__ import annotations

import pytest
from test_engine import BAD, GOOD, llama, ready_engine  # noqa: F401 (llama: a fixture)

from heretic_dist.engine import passes
from heretic_dist.engine.drafts import DraftPolicy, Drafts, ReplyMemory, accepted_length
from heretic_dist.engine.generation import greedy_replies


def test_memory_continues_the_most_recent_reply_that_matches():
    memory = ReplyMemory(per_prompt=3)
    memory.add((1,), [5, 6, 7, 8])
    memory.add((1,), [5, 6, 9, 10, 11])
    assert memory.draft((1,), [5, 6], 2) == [9, 10]  # the most recent reply that starts with [5, 6]
    assert memory.draft((1,), [5, 6, 7], 4) == [8]
    assert memory.draft((1,), [], 3) == [5, 6, 9]  # nothing generated yet: the newest reply's start
    assert memory.draft((2,), [5, 6], 2) == []  # another prompt's replies are not its drafts


def test_memory_falls_back_to_the_last_two_tokens():
    memory = ReplyMemory()
    memory.add((1,), [3, 4, 5, 6, 7])
    assert memory.draft((1,), [9, 9, 4, 5], 2) == [6, 7]  # no reply starts so; "4 5" was followed by 6 7
    assert memory.draft((1,), [9, 9, 7], 2) == []  # "9 7" never occurred


def test_memory_keeps_distinct_recent_replies_of_recent_prompts():
    memory = ReplyMemory(per_prompt=2, prompts=2)
    for reply in ([1, 2, 3], [1, 2, 4], [1, 2, 3]):  # the repeat moves to the front, no duplicate
        memory.add((0,), reply)
    assert memory.draft((0,), [1, 2], 1) == [3]
    memory.add((0,), [1, 2, 5])  # two replies kept per prompt: [1, 2, 4] is gone
    assert memory.draft((0,), [1, 2], 1) == [5]
    assert memory._replies[(0,)][0].tokens == [1, 2, 3]
    memory.add((1,), [7, 8])
    memory.add((2,), [7, 9])  # two prompts kept: the least recently added, (0,), is gone
    assert len(memory) == 2 and memory.draft((0,), [1, 2], 1) == []


def test_accepted_length():
    assert accepted_length([4, 5, 6], [4, 5, 7, 8]) == 2
    assert accepted_length([4], [3, 9]) == 0
    assert accepted_length([], [3]) == 0
    assert accepted_length([4, 5], [4, 5, 6]) == 2


def test_policy_widens_only_where_it_pays():
    policy = DraftPolicy(max_tokens=4)  # position_cost 0: a memory-bound step, wider is free
    assert policy.width([3, 3]) == 4 and policy.width([0, 0, 0]) == 1  # no drafts: nothing to check
    policy.position_cost = 0.1  # each query position costs a tenth of a call
    # 16 rows whose drafts are mostly rejected: widening costs compute and gains little
    policy.observe_drafts(proposed=1000, accepted=50)
    assert policy.width([4] * 16) == 1
    policy.observe_drafts(proposed=10000, accepted=9950)  # now nearly every draft token is kept
    assert policy.width([4] * 16) > 1
    assert policy.width([4]) == 5  # one row: the call's fixed cost dominates, check the whole draft


def test_policy_fits_the_measured_cost_per_call():
    policy = DraftPolicy(max_tokens=4)
    policy.observe_call(8, 0.18)
    assert policy.measured_cost() != policy.measured_cost()  # nan: one call says nothing
    for positions in (1, 4, 16, 32):
        policy.observe_call(positions, 0.1 + 0.01 * positions)
    policy.observe_call(8, 0.18)
    a, b = policy.measured_cost()
    assert a == pytest.approx(0.1) and b == pytest.approx(0.01)


def replies_and_calls(engine, texts, drafts):
    """Greedy replies (no early stop) and the number of decoder calls they took."""
    calls = []
    handle = engine.model.get_input_embeddings().register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        replies = greedy_replies(engine.model, engine.tokenizer, texts, engine.settings.max_response_length,
                                 4, None, None, True, drafts)
    finally:
        handle.remove()
    return replies, len(calls)


def test_good_drafts_cut_decode_calls_and_keep_the_replies(llama):
    engine = ready_engine(llama, max_response_length=24)
    texts = passes.render(engine.tokenizer, BAD + GOOD)
    plain, plain_calls = replies_and_calls(engine, texts, None)
    # transformers' own greedy generate() gives these replies too
    assert plain == passes.generate_replies(engine.model, engine.tokenizer, BAD + GOOD, "", 24, 4, True)
    drafts = Drafts(max_tokens=6)
    drafts.policy.position_cost = 0.0  # a memory-bound step: every draft checked whole
    first, first_calls = replies_and_calls(engine, texts, drafts)  # an empty memory: no drafts
    assert first == plain and first_calls == plain_calls
    assert len(drafts.memory) >= len(set(texts)) // 2  # replies of 2 or more tokens are kept
    again, again_calls = replies_and_calls(engine, texts, drafts)  # drafts are the replies themselves
    assert again == plain
    assert again_calls < plain_calls * 0.6, (again_calls, plain_calls)
    assert drafts.policy.acceptance() > 0.9


def test_wrong_drafts_keep_the_replies(llama):
    """Drafts the model never agrees with (other prompts' replies, shifted tokens) change nothing."""
    engine = ready_engine(llama, max_response_length=24)
    texts = passes.render(engine.tokenizer, BAD + GOOD)
    plain, _ = replies_and_calls(engine, texts, None)
    encoded = [tuple(ids) for ids in engine.tokenizer(texts)["input_ids"]]
    drafts = Drafts(max_tokens=5)
    drafts.policy.position_cost = 0.0
    vocab = engine.model.config.vocab_size
    for key, reply in zip(encoded, plain):
        tokens = engine.tokenizer(reply, add_special_tokens=False)["input_ids"]
        for shift in (1, 2):  # the first token right, the rest wrong
            drafts.memory.add(key, tokens[:1] + [(t + shift) % vocab for t in tokens[1:]])
    replies, _ = replies_and_calls(engine, texts, drafts)
    assert replies == plain
    assert drafts.policy.proposed - 10 >= 20  # drafts were really proposed (10: the prior's count)


def test_partly_right_drafts_of_any_length_keep_the_replies_and_the_cache_small(llama, monkeypatch):
    """Drafts that are right for a random number of tokens and then wrong, of random lengths, with
    refills (batch 4 < 12 prompts) and the shared head: the same replies; the cache stays about as wide
    as without drafts (rejected columns do not pile up)."""
    import random

    from heretic_dist.engine import generation

    engine = ready_engine(llama, max_response_length=24)
    texts = passes.render(engine.tokenizer, BAD + GOOD)
    widths = {"now": []}
    original = generation._decode

    def decode(model, rows, *args, **kwargs):
        emitted = original(model, rows, *args, **kwargs)
        widths["now"].append(rows.mask.shape[1])
        return emitted

    monkeypatch.setattr(generation, "_decode", decode)
    plain, _ = replies_and_calls(engine, texts, None)
    plain_width, widths["now"] = max(widths["now"]), []
    encoded = [tuple(ids) for ids in engine.tokenizer(texts)["input_ids"]]
    rng = random.Random(0)
    drafts = Drafts(max_tokens=6)
    drafts.policy.position_cost = 0.0
    vocab = engine.model.config.vocab_size
    for key, reply in zip(encoded, plain):
        tokens = engine.tokenizer(reply, add_special_tokens=False)["input_ids"]
        for _ in range(3):  # right up to a random point, then wrong
            cut = rng.randrange(len(tokens) + 1)
            drafts.memory.add(key, tokens[:cut] + [rng.randrange(vocab) for _ in range(rng.randrange(1, 8))])
    replies, _ = replies_and_calls(engine, texts, drafts)
    assert replies == plain
    kept = drafts.policy.accepted - 7.0
    assert kept >= 5 and drafts.policy.proposed - 10 > kept + 5  # some draft tokens kept, some rejected
    assert max(widths["now"]) <= plain_width + 12, (max(widths["now"]), plain_width)
