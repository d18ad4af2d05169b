"""evaluate-front's measures on a worker (engine/evaluation.py): long replies, multi-token KL, perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import BAD, GOOD, raw_params, ready_engine
from tiny_models import tiny_model_folder

from heretic_dist.engine import evaluation
from heretic_dist.engine.passes import render
from heretic_dist.engine.scoring import kl_per_prompt
from heretic_dist.engine.types import EvaluationRequest, Prompt, Shard
from heretic_dist.search.space import decode_trial_params
from heretic_dist.testing.fake import FakeEngine

TEXTS = ["the quick brown fox jumps over the lazy dog", "How do I bake bread at home? Sure, here is how.",
         "Explain how plants grow", "0123456789"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ready_engine(tiny_model_folder(tmp_path_factory.mktemp("llama"), "llama"))


def edit(max_weight: float = 1.2, n_layers: int = 4):
    return decode_trial_params(raw_params(n_layers, max_weight=max_weight), n_layers)


def test_one_token_kl_is_the_first_token_kl(engine, monkeypatch):
    # the evaluation prefills whole prompts; the trial's KL pass on the same path agrees to the last bits
    # (prefilling a shared head once moves them by ~1e-6, tests/test_prefix.py bounds that)
    monkeypatch.setattr(engine, "share_prefix", False)
    params = edit()
    trial = engine.run_trial(params, Shard())
    first_token = trial.kl_sum / trial.good_scored
    assert first_token > 1e-4
    engine.apply(params)
    per_prompt = kl_per_prompt(engine.baseline(Shard()), engine.logprobs(GOOD)).tolist()
    result = engine.evaluate(params, EvaluationRequest("one-token", damage=GOOD, kl_tokens=1))
    assert result.kl == pytest.approx(first_token, rel=1e-6)
    assert result.kl_per_prompt == pytest.approx(per_prompt, rel=1e-6)
    # base log-probs over the cache limit: recomputed per chunk of batches, the same numbers
    monkeypatch.setattr(evaluation, "BASE_LOGPROBS_CACHE_BYTES", 1)
    chunked = engine.evaluate(params, EvaluationRequest("one-token-chunked", damage=GOOD, kl_tokens=1))
    assert chunked.kl_per_prompt == result.kl_per_prompt


def test_five_token_kl_is_zero_unedited_and_cached_equals_recomputed(engine, monkeypatch):
    request = EvaluationRequest("five", damage=GOOD, kl_tokens=5)
    edited = engine.evaluate(edit(), request)
    ref = next(iter(engine._evaluation_refs.values()))
    assert ref.base is not None and all(1 <= n <= 5 for n in ref.counts) and max(ref.counts) == 5
    base = engine.evaluate(None, request)  # the cached reference, after an edit
    assert base.kl < 1e-7 and max(base.kl_per_prompt) < 1e-7
    assert edited.kl > 1e-4 and len(edited.kl_per_prompt) == len(GOOD)
    assert engine.evaluate(edit(), request).kl_per_prompt == edited.kl_per_prompt  # the edit is re-applied
    monkeypatch.setattr(evaluation, "BASE_LOGPROBS_CACHE_BYTES", 1)
    recomputed = engine.evaluate(edit(), EvaluationRequest("five-chunked", damage=GOOD, kl_tokens=5))
    assert next(iter(engine._evaluation_refs.values())).base is None
    assert recomputed.kl_per_prompt == edited.kl_per_prompt


def reference_replies(engine, prompts: list[Prompt], max_new_tokens: int) -> list[tuple[str, int]]:
    """Each prompt alone through generate(): (reply without special tokens, tokens generated)."""
    out = []
    for text in render(engine.tokenizer, prompts, engine.response_prefix):
        inputs = engine.tokenizer([text], return_tensors="pt", return_token_type_ids=False)
        with torch.inference_mode():
            ids = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=engine.tokenizer.pad_token_id)[0, inputs["input_ids"].shape[1]:]
        out.append((engine.tokenizer.decode(ids, skip_special_tokens=True), len(ids)))
    return out


@pytest.mark.parametrize("fast", [True, False])
def test_long_replies_have_the_full_length_in_request_order(engine, fast):
    harmful, over = BAD[:4], [GOOD[3], GOOD[0], GOOD[5]]  # prompts of different lengths
    engine.fast_generation = fast
    try:
        params = edit(0.8)
        result = engine.evaluate(params, EvaluationRequest("replies", harmful=harmful, over_refusal=over,
                                                           max_response_length=24))
        expected = reference_replies(engine, harmful + over, 24)  # the edit is still applied
    finally:
        engine.fast_generation = True
    assert result.harmful_replies + result.over_refusal_replies == [text for text, _ in expected]
    assert all(n <= 24 for _, n in expected) and any(n == 24 for _, n in expected)
    assert result.kl is None and result.perplexity is None and "replies_s" in result.timings and result.host


def test_perplexity_is_finite_and_moves_under_an_edit(engine):
    base = engine.evaluate(None, EvaluationRequest("ppl", texts=TEXTS)).perplexity
    assert math.isfinite(base) and base > 1
    engine.reset()
    inputs = engine.tokenizer([TEXTS[0]], return_tensors="pt", return_token_type_ids=False)
    with torch.inference_mode():
        loss = engine.model(**inputs, labels=inputs["input_ids"]).loss
    assert evaluation.perplexity(engine, TEXTS[:1]) == pytest.approx(math.exp(float(loss)), rel=1e-4)
    edited = engine.evaluate(edit(1.5), EvaluationRequest("ppl", texts=TEXTS)).perplexity
    assert math.isfinite(edited) and abs(edited - base) > 1e-3 * base
    engine.reset()
    truncated = evaluation.perplexity(engine, [TEXTS[1]], max_tokens=4)
    ids = engine.tokenizer(TEXTS[1], return_tensors="pt", return_token_type_ids=False)["input_ids"][:, :4]
    with torch.inference_mode():
        loss = engine.model(input_ids=ids, labels=ids).loss
    assert truncated == pytest.approx(math.exp(float(loss)), rel=1e-4)


@pytest.mark.slow
def test_multi_token_kl_grows_with_the_edit_on_smollm2():
    from test_engine import make_settings
    from test_gguf import smollm2_gguf

    from heretic_dist.config import PromptSetSpec
    from heretic_dist.engine.ablation import directions_from_sums
    from heretic_dist.engine.engine import Engine
    from heretic_dist.prompts import load_prompt_set

    system = "You are a helpful assistant."
    good = load_prompt_set(PromptSetSpec(dataset="builtin:demo_harmless", split="[:8]"), system)
    bad = load_prompt_set(PromptSetSpec(dataset="builtin:demo_harmful", split="[:8]"), system)
    damage = load_prompt_set(PromptSetSpec(dataset="builtin:demo_harmless", split="[8:12]"), system)
    engine = Engine(make_settings(smollm2_gguf(), batch_size=8))
    gs, gn = engine.residual_sums(good)
    bs, bn = engine.residual_sums(bad)
    engine.set_directions(directions_from_sums(gs, gn, bs, bn, True))
    request = EvaluationRequest("smollm2", damage=damage, kl_tokens=8)
    assert engine.evaluate(None, request).kl < 1e-7
    kls = []
    for weight in (0.3, 0.8, 1.5):
        raw = {"direction_scope": "global", "direction_index": 17.0}
        for c in ("attn.o_proj", "mlp.down_proj"):
            raw |= {f"{c}.max_weight": weight, f"{c}.max_weight_position": 22.0, f"{c}.min_weight": 0.0,
                    f"{c}.min_weight_distance": 10.0}
        kls.append(engine.evaluate(decode_trial_params(raw, 30), request).kl)
    assert max(next(iter(engine._evaluation_refs.values())).counts) == 8
    assert 0 < kls[0] < kls[1] < kls[2], kls


def test_fake_engine_evaluate():
    from heretic_dist.distributed.worker import ModelWorker

    fake = FakeEngine({"fake_evaluate_seconds": 0.05})
    fake.set_directions(torch.zeros(fake.n_layers + 2, fake.hidden_size))
    harmful = [Prompt("s", f"harmful request {i}") for i in range(40)]
    over = [Prompt("s", f"edgy request {i}") for i in range(40)]
    request = EvaluationRequest("fake", harmful=harmful, over_refusal=over, damage=GOOD, texts=TEXTS, kl_tokens=4)
    results = [fake.evaluate(params, request) for params in (None, edit(0.3, 8), edit(1.5, 8))]
    refusing = [sum(r == "I cannot help with that." for r in res.harmful_replies) for res in results]
    over_refusing = [sum(r == "I cannot help with that." for r in res.over_refusal_replies) for res in results]
    assert refusing[0] == 40 and refusing[0] > refusing[1] > refusing[2]
    assert over_refusing[0] > over_refusing[2]
    assert results[0].kl == 0.0 and 0 < results[1].kl < results[2].kl
    assert results[0].perplexity < results[1].perplexity < results[2].perplexity
    assert all(res.timings["evaluate_s"] >= 0.05 for res in results)
    worker = ModelWorker("fake", {})  # plain class: params arrive as a dict over Ray
    worker.engine.set_directions(torch.zeros(fake.n_layers + 2, fake.hidden_size))
    through_worker = worker.evaluate(edit(1.5, 8).to_dict(), request)
    assert through_worker.kl == results[2].kl and through_worker.harmful_replies == results[2].harmful_replies
