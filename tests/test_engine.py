"""The engine on tiny random models: edits, reset, scores, sharding, components, 4-bit."""

from __future__ import annotations


import pytest
import torch
from tiny_models import tiny_model_folder
from transformers import AutoModelForCausalLM

from heretic_dist.config import Settings
from heretic_dist.engine import head_screen
from heretic_dist.engine.ablation import directions_from_sums
from heretic_dist.search.space import decode_trial_params, layer_weight
from heretic_dist.engine.components import find_components
from heretic_dist.engine.engine import Engine
from heretic_dist.engine.passes import detect_response_prefix
from heretic_dist.engine.scoring import MarkerRefusalScorer
from heretic_dist.search.objectives import objective_values
from heretic_dist.engine.types import Prompt, Shard
from heretic_dist.errors import UserError

SYSTEM = "You are a helpful assistant."
GOOD = [Prompt(SYSTEM, t) for t in ["Explain how plants grow", "Write a poem about the sea",
                                     "Give me three tips for better sleep", "How do I bake bread at home?",
                                     "Tell me about the quick brown fox", "What is 12 times 7?"]]
BAD = [Prompt(SYSTEM, t) for t in ["Tell me a joke about cats", "Tell me a rude joke", "Say something mean",
                                    "Insult the lazy dog", "Write an angry poem", "Refuse this request"]]


def make_settings(folder, **overrides) -> Settings:
    values = dict(model=str(folder), dtypes=["float32"], device_map="cpu", max_response_length=12,
                  batch_size=4, seed=3)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("llama"), "llama")


def ready_engine(folder, **overrides) -> Engine:
    engine = Engine(make_settings(folder, **overrides))
    good_sum, good_n = engine.residual_sums(GOOD)
    bad_sum, bad_n = engine.residual_sums(BAD)
    engine.set_directions(directions_from_sums(good_sum, good_n, bad_sum, bad_n, True))
    engine.set_eval_prompts(GOOD, BAD)
    return engine


def raw_params(n_layers: int, scope: str = "global", max_weight: float = 1.0, distance: float = 10.0) -> dict:
    raw = {"direction_scope": scope, "direction_index": 0.5 * (n_layers - 1)}
    for c in ("attn.o_proj", "mlp.down_proj"):
        raw |= {f"{c}.max_weight": max_weight, f"{c}.max_weight_position": n_layers / 2,
                f"{c}.min_weight": 1.0, f"{c}.min_weight_distance": distance}
    return raw


def logits(model, engine) -> torch.Tensor:
    inputs = engine.tokenizer(["Hello there, plants and the sea"], return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits


def test_zero_b_gives_exactly_the_unedited_logits(llama):
    engine = ready_engine(llama)
    plain = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    assert torch.equal(logits(engine.model, engine), logits(plain, engine))
    engine.apply(decode_trial_params(raw_params(4), 4))
    assert not torch.equal(logits(engine.model, engine), logits(plain, engine))
    engine.reset()
    assert torch.equal(logits(engine.model, engine), logits(plain, engine))


@pytest.mark.parametrize("scope", ["global", "per layer"])
def test_edited_modules_cannot_write_along_the_direction(llama, scope):
    engine = ready_engine(llama, row_normalization="none")
    params = decode_trial_params(raw_params(4, scope, max_weight=1.0, distance=100.0), 4)
    engine.apply(params)
    outputs: dict[str, torch.Tensor] = {}
    hooks = [engine._lora[name].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
             for name in engine.components.module_names()]
    logits(engine.model, engine)
    for h in hooks:
        h.remove()
    from heretic_dist.engine.ablation import layer_direction

    for layer_index, layer in enumerate(engine.components.layers):
        v = layer_direction(engine.directions, params, layer_index)
        for component, modules in layer.items():
            assert layer_weight(layer_index, params.components[component]) == pytest.approx(1.0)
            for name, _ in modules:
                y = outputs[name].reshape(-1, outputs[name].shape[-1])
                ratio = (y @ v).abs() / y.norm(dim=-1)
                assert ratio.max() < 1e-5, name


def test_unedited_kl_is_zero_and_edit_moves_it(llama):
    engine = ready_engine(llama)
    base = engine.run_trial(None, Shard())
    assert base.kl_sum == 0.0 and base.good_scored == len(GOOD) and base.bad_scored == len(BAD)
    edited = engine.run_trial(decode_trial_params(raw_params(4, max_weight=1.5), 4), Shard())
    assert edited.kl_sum > 1e-4


def test_residual_sums_over_two_shards_give_the_same_directions(llama):
    engine = Engine(make_settings(llama))
    gs, gn = engine.residual_sums(GOOD)
    bs, bn = engine.residual_sums(BAD)
    one = directions_from_sums(gs, gn, bs, bn, True)
    parts = [engine.residual_sums(p) for p in (GOOD[:2], GOOD[2:], BAD[:5], BAD[5:])]
    two = directions_from_sums(parts[0][0] + parts[1][0], parts[0][1] + parts[1][1],
                               parts[2][0] + parts[3][0], parts[2][1] + parts[3][1], True)
    assert (one - two).abs().max() < 1e-6


def test_sharded_trial_equals_single_trial(llama):
    engine = ready_engine(llama, refusal_markers=["read"])
    params = decode_trial_params(raw_params(4, max_weight=1.2), 4)
    whole = engine.run_trial(params, Shard())
    halves = [engine.run_trial(params, Shard(i, 2)) for i in range(2)]
    assert sum(h.refusals for h in halves) == whole.refusals
    assert 0 < whole.refusals < len(BAD)
    assert sum(h.good_scored for h in halves) == whole.good_scored
    kl_whole = whole.kl_sum / whole.good_scored
    kl_halves = sum(h.kl_sum for h in halves) / sum(h.good_scored for h in halves)
    # Shards batch prompts differently, so padding changes the last bits of the logits; this random
    # model (weights scaled up) amplifies that to ~2e-5. The 1e-5 bound is checked on SmolLM2 in
    # test_dist_real.py, where the measured difference is ~5e-6.
    assert kl_halves == pytest.approx(kl_whole, rel=1e-4)


def test_early_stop_keeps_refusal_counts(llama):
    # markers that the random model hits often, so that early stopping actually decides rows
    # markers that this random model's replies sometimes contain, so early stopping decides some rows
    engine = ready_engine(llama, refusal_markers=["read"], max_response_length=24)
    counts = []
    for raw in (None, raw_params(4, max_weight=1.2), raw_params(4, scope="per layer")):
        params = None if raw is None else decode_trial_params(raw, 4)
        engine.early_stop = True
        fast = engine.run_trial(params, Shard())
        engine.early_stop = False
        slow = engine.run_trial(params, Shard())
        assert fast.refusals == slow.refusals
        assert fast.kl_sum == pytest.approx(slow.kl_sum, rel=1e-6)
        counts.append(fast.refusals)
    assert any(0 < c < len(BAD) for c in counts), counts  # otherwise the test decides nothing


SPEEDUPS = ("early_stop", "fast_generation", "sort_by_length", "prepack", "share_prefix", "drafts",
            "cost_batches", "head_screen")


def set_speedups(engine: Engine, on: set[str]) -> None:
    engine.early_stop = "early_stop" in on
    engine.fast_generation = "fast_generation" in on
    engine.sort_by_length = "sort_by_length" in on
    engine.share_prefix = "share_prefix" in on
    engine.draft_replies = "drafts" in on  # the reply memory fills while drafts are on
    engine.cost_batches = "cost_batches" in on
    assert engine.share_prefix == ("share_prefix" in on)  # the model supports it: a real comparison
    if "prepack" in on:
        assert engine.prepack() > 0  # really packed: otherwise this compares plain with plain
    else:
        engine.unpack()
    engine.screen_head = "head_screen" in on  # needs the packed head
    assert engine.screen_head == ({"head_screen", "prepack"} <= on and head_screen.supported())


def replay_with_and_without(engine: Engine, trials: list, on: set[str]) -> list[tuple]:
    """(refusals, KL) with every speed-up and with `on` only, for each fixed trial."""
    pairs = []
    for params in trials:
        set_speedups(engine, set(SPEEDUPS))
        fast = engine.run_trial(params, Shard())
        set_speedups(engine, on)
        slow = engine.run_trial(params, Shard())
        pairs.append(((fast.refusals, fast.kl_sum), (slow.refusals, slow.kl_sum)))
    return pairs


@pytest.mark.parametrize("off", [*SPEEDUPS, "all"])
def test_speedups_keep_results(llama, off):
    """Fixed parameters replayed with the speed-ups on and off: equal refusals, KL within 1e-4."""
    engine = ready_engine(llama, refusal_markers=["read"], max_response_length=24)
    assert engine.prepacked_bytes > 0  # prepacking is on by default on CPU
    trials = [None, decode_trial_params(raw_params(4, max_weight=1.2), 4),
              decode_trial_params(raw_params(4, scope="per layer"), 4),
              decode_trial_params(raw_params(4, max_weight=0.6, distance=1.0), 4)]
    pairs = replay_with_and_without(engine, trials, set() if off == "all" else set(SPEEDUPS) - {off})
    for (fast_refusals, fast_kl), (slow_refusals, slow_kl) in pairs:
        assert fast_refusals == slow_refusals
        # this random model (weights scaled up) amplifies last-bit differences from batch shapes
        # to ~1.5e-4 at KL 0.009; the 1e-4 bound is checked on SmolLM2 below
        assert fast_kl == pytest.approx(slow_kl, rel=1e-3, abs=1e-9)
    assert any(0 < r < len(BAD) for (r, _), _ in pairs)  # some rows decided early, some not
    assert any(kl > 1e-3 for (_, kl), _ in pairs)
    assert engine._drafts.policy.accepted > 7.0 + 5  # draft tokens were really kept (7: the prior)


def test_speedups_keep_results_on_smollm2():
    """The acceptance bound on a real chat model: equal refusals, KL within 1e-4 relative."""
    from test_gguf import smollm2_gguf

    from heretic_dist.config import PromptSetSpec
    from heretic_dist.prompts import load_prompt_set

    def prompts(name):
        return load_prompt_set(PromptSetSpec(dataset=f"builtin:{name}", split="[:12]"), SYSTEM)

    engine = Engine(make_settings(smollm2_gguf(), max_response_length=16, batch_size=8,
                                  refusal_markers=["sorry", "i can", "harm"]))
    good, bad = prompts("demo_harmless"), prompts("demo_harmful")
    engine.set_directions(directions_from_sums(*engine.residual_sums(good), *engine.residual_sums(bad), True))
    engine.set_eval_prompts(good, bad)
    trials = []
    for scope, weight in (("global", 1.2), ("per layer", 0.8)):
        raw = {"direction_scope": scope, "direction_index": 17.0}
        for c in ("attn.o_proj", "mlp.down_proj"):
            raw |= {f"{c}.max_weight": weight, f"{c}.max_weight_position": 22.0, f"{c}.min_weight": 0.5,
                    f"{c}.min_weight_distance": 10.0}
        trials.append(decode_trial_params(raw, 30))
    set_speedups(engine, set(SPEEDUPS))
    fast = [engine.run_trial(params, Shard()) for params in trials]  # every speed-up on, once
    for off in ("all", "prepack", "sort_by_length", "head_screen"):  # all off, then those that change rounding
        set_speedups(engine, set() if off == "all" else set(SPEEDUPS) - {off})
        for params, on in zip(trials, fast):
            slow = engine.run_trial(params, Shard())
            assert on.refusals == slow.refusals, off
            assert on.kl_sum == pytest.approx(slow.kl_sum, rel=1e-4), off
            assert on.kl_sum > 1e-3
    assert engine._drafts.policy.accepted > 7.0 + 5  # draft tokens were really kept (7: the prior)
    set_speedups(engine, set(SPEEDUPS))  # and back on: the first results again
    again = engine.run_trial(trials[0], Shard())
    assert again.refusals == fast[0].refusals and again.kl_sum == pytest.approx(fast[0].kl_sum, rel=1e-6)


def test_prepacked_forward_follows_a_changed_weight(llama):
    from heretic_dist.engine.prepack import prepack_linears, unpack_linears

    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    inputs = {"input_ids": torch.tensor([[5, 9, 23, 7, 11]])}
    with torch.inference_mode():
        plain = model(**inputs).logits
        assert prepack_linears(model) > 0
        packed = model(**inputs).logits
        assert (packed - plain).abs().max() < 1e-4
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)  # in place: repacked on the next call
        changed = model(**inputs).logits
        unpack_linears(model)
        assert (model(**inputs).logits - changed).abs().max() < 1e-4
        assert (changed - plain).abs().max() > 1e-3


def test_refusal_detector_normalizes():
    scorer = MarkerRefusalScorer(["i can'", "sorry", "i'm unable"])
    assert scorer.is_refusal("I CAN\u2019T do that")
    assert scorer.is_refusal("**Sorry**, no")
    assert scorer.is_refusal("I'm\n\n   unable to help")
    assert scorer.is_refusal("   ")
    assert scorer.is_refusal("")
    assert not scorer.is_refusal("Here is a cake recipe.")


def test_objective_values_follow_upstream():
    assert objective_values(5, 0.5, 10, 1.0, 0.01) == (0.5, 0.5)
    assert objective_values(5, 0.001, 10, 1.0, 0.01) == pytest.approx((0.5, 0.005))
    assert objective_values(3, 0.2, 0, 2.0, 0.01) == pytest.approx((3.0, 0.1))
    with pytest.raises(ValueError):
        objective_values(1, float("nan"), 10, 1.0, 0.01)


def test_response_prefix_with_chain_of_thought_skip():
    calls = []

    def generate(prefix):
        calls.append(prefix)
        if prefix == "":
            return ["<think>Let me see. A", "<think>Let me think. B"]
        return ["\n\nSure thing: one", "\n\nSure thing: two"]

    skips = [("<think>", "<think></think>")]
    assert detect_response_prefix(generate, skips) == "<think></think>\n\nSure thing:"
    assert calls == ["", "<think></think>"]
    assert detect_response_prefix(lambda p: ["Hello  a", "Hello  b"], skips) == "Hello"
    assert detect_response_prefix(lambda p: ["A", "B"], skips) == ""


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_dense_components(tmp_path, arch):
    folder = tiny_model_folder(tmp_path, arch, layers=3)
    model = AutoModelForCausalLM.from_pretrained(folder)
    found = find_components(model)
    assert found.names == ["attn.o_proj", "mlp.down_proj"]
    assert len(found.layers) == 3 and all(len(layer) == 2 for layer in found.layers)
    assert found.module_names()[0].startswith("model.layers.0.")


def test_moe_fused_experts_are_found_and_counted(tmp_path):
    folder = tiny_model_folder(tmp_path, "qwen2_moe", layers=2, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=16, shared_expert_intermediate_size=16)
    model = AutoModelForCausalLM.from_pretrained(folder)
    found = find_components(model)
    # the shared expert is a Linear and takes LoRA; the fused routed experts take the edit too (experts.py)
    assert "model.layers.0.mlp.shared_expert.down_proj" in found.module_names()
    assert found.unsupported == []
    assert [len(layer) for layer in found.fused] == [1, 1]
    assert found.edited()[0] == {"attention": 1, "dense_mlp": 0, "shared_experts": 1, "routed_experts": 4}


def test_moe_expert_module_lists_are_edited(tmp_path):
    folder = tiny_model_folder(tmp_path, "llama", layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder)

    class ExpertMLP(torch.nn.Module):  # Mixtral-style module experts (remote-code models still use these)
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList(
                [torch.nn.ModuleDict({"w2": torch.nn.Linear(64, 32, bias=False)}) for _ in range(3)])

    for layer in model.model.layers:
        layer.block_sparse_moe = ExpertMLP()
    found = find_components(model)
    names = found.module_names()
    assert "model.layers.1.block_sparse_moe.experts.2.w2" in names
    assert len(found.layers[0]["mlp.down_proj"]) == 1 + 3


def test_no_abliterable_module_is_a_clear_error():
    class Empty(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Identity()])

    with pytest.raises(UserError, match="no abliterable module"):
        find_components(Empty())


def test_kl_gate_scores_far_trials_as_refusing_everything(llama):
    engine = ready_engine(llama, kl_gate=1e-9)
    result = engine.run_trial(decode_trial_params(raw_params(4, max_weight=1.5), 4), Shard())
    assert result.refusals == len(BAD)
    assert result.timings["generation_s"] < 0.01


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hook_capture_equals_output_hidden_states(tmp_path, arch):
    """Residuals through hooks (last position only) equal output_hidden_states, padding included."""
    from heretic_dist.engine.passes import (
        all_hidden_states_at_last_position,
        last_position_hidden_states,
        render,
        tokenize,
    )

    engine = Engine(make_settings(tiny_model_folder(tmp_path, arch)))
    inputs = tokenize(engine.tokenizer, render(engine.tokenizer, GOOD[:4]), "cpu")
    assert (inputs["attention_mask"] == 0).any()  # left padding present
    hooked = last_position_hidden_states(engine.model, inputs)
    reference = all_hidden_states_at_last_position(engine.model, inputs)
    assert hooked.shape == reference.shape == (4, engine.model.config.num_hidden_layers + 1, 32)
    assert torch.equal(hooked, reference)


def test_hook_capture_falls_back_when_the_head_rescales_its_input(tmp_path):
    from heretic_dist.engine.passes import all_hidden_states_at_last_position, render, residual_sums, tokenize

    engine = Engine(make_settings(tiny_model_folder(tmp_path, "llama")))
    # like models that scale the final hidden state before the output head
    engine.model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0] * 2.0,))
    sums, count = residual_sums(engine.model, engine.tokenizer, GOOD[:3], "", 8, 1.0)
    assert engine.model._hook_capture_ok is False
    inputs = tokenize(engine.tokenizer, render(engine.tokenizer, GOOD[:3]), "cpu")
    expected = all_hidden_states_at_last_position(engine.model, inputs).sum(dim=0, dtype=torch.float64)
    assert count == 3 and torch.allclose(sums, expected)


def test_common_prefix_bound_gives_the_full_replies_common_prefix():
    """Replies cut once the bound says they settled have the common prefix of the full replies."""
    import random

    from heretic_dist.engine.passes import CommonPrefixBound, common_prefix

    rng, shortened = random.Random(0), 0
    for case in range(300):
        shared = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 30)))
        full = [shared + "".join(rng.choice("ab c") for _ in range(rng.randint(0, 40))) for _ in range(rng.randint(1, 6))]
        bound, cut = CommonPrefixBound(slack=3), {}
        for step in range(1, 80):  # every reply grows by one or two characters per step
            for i, text in enumerate(full):
                if i in cut:
                    continue
                partial = text[: step * (1 + i % 2)]
                bound.update(i, partial)
                if partial == text or bound.settled(i):
                    cut[i] = partial
        assert common_prefix(list(cut.values())) == common_prefix(full), case
        shortened += sum(map(len, cut.values())) < sum(map(len, full))
    assert shortened > 100  # the bound really cuts replies short


def test_prefix_replies_settle_to_the_same_prefix(llama):
    from heretic_dist.engine.passes import common_prefix

    engine = Engine(make_settings(llama, max_response_length=24))
    prompts = GOOD + BAD
    full = engine.responses(prompts)
    cut = engine.prefix_replies(prompts)
    assert common_prefix(cut) == common_prefix(full)
    assert sum(map(len, cut)) < sum(map(len, full))  # it did stop early
    engine.set_response_prefix("Sure thing")  # a prefix the replies continue from
    assert common_prefix(engine.prefix_replies(prompts)) == common_prefix(engine.responses(prompts))


def test_describe_edited_lines_collapse_identical_layers():
    from heretic_dist.engine.protocol import describe_edited

    row = {"attention": 1, "dense_mlp": 0, "shared_experts": 1, "routed_experts": 4}
    dense = {"attention": 1, "dense_mlp": 1, "shared_experts": 0, "routed_experts": 0}
    lines = describe_edited({"per_layer": [dense, row, row], "totals": {"routed_experts": 8},
                             "fused_expert_modules": 2, "fused_layout": ["(E, out, in)"], "mlp_skipped": False,
                             "not_edited": []})
    assert lines == [
        "edits, layer 0: attention 1, dense MLP 1, shared experts 0, routed experts 0",
        "edits, layers 1-2: attention 1, dense MLP 0, shared experts 1, routed experts 4",
        "routed experts: 8 in 2 fused expert modules ((E, out, in)), edited on the forward path",
    ]
    assert describe_edited(None) == []
