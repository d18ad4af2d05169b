"""trials_per_worker = K > 1 in the engine: K trials in one batched pass, each on its own LoRA adapter
chosen per row, give each trial what run_trial gives it alone (engine/multi.py)."""

from __future__ import annotations

import pytest
import torch
from test_engine import make_settings, raw_params, ready_engine
from tiny_models import MOE_ARCHS, tiny_model_folder

from heretic_dist.config.evaluation import JudgeSettings
from heretic_dist.config.schema import ClusterSettings
from heretic_dist.engine.engine import Engine
from heretic_dist.engine.types import Shard
from heretic_dist.errors import UserError
from heretic_dist.search.space import decode_trial_params

# KL per prompt of these on the tiny llama (seed 0): strong ~0.05, wide ~0.014, medium ~0.0065, mild
# ~0.0015, so the gate below sends "strong" over it and keeps the others under it; marker "read" gives
# refusal counts that differ between them (and from the unedited model's).
PARAMS = {
    "strong": decode_trial_params(raw_params(4, scope="per layer"), 4),
    "wide": decode_trial_params(raw_params(4, max_weight=2.0, distance=100.0), 4),
    "medium": decode_trial_params(raw_params(4, max_weight=1.2), 4),
    "mild": decode_trial_params(raw_params(4, max_weight=0.6, distance=1.0), 4),
    "none": None,
}
GATE = 0.03
ITEMS = {  # an unedited item, items on two different shards, and one over the KL gate
    2: [("mild", Shard(1, 2)), ("wide", Shard(0, 2))],
    3: [("strong", Shard(0, 2)), ("medium", Shard()), ("none", Shard(1, 2))],
}
MODES = {"default": {}, "no_early_stop": {"early_stop": False}, "no_fast_generation": {"fast_generation": False}}


def engine_for(folder, k: int, **overrides) -> Engine:
    return ready_engine(folder, refusal_markers=["read"], max_response_length=24, kl_gate=GATE,
                        cluster=ClusterSettings(trials_per_worker=k), **overrides)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def engines(folder):
    return {k: engine_for(folder, k) for k in (1, 2, 3)}


def set_mode(engine: Engine, mode: str) -> None:
    engine.early_stop, engine.fast_generation = True, True
    for name, value in MODES[mode].items():
        setattr(engine, name, value)


def items_of(named: list[tuple[str, Shard]]) -> list:
    return [(PARAMS[name], shard) for name, shard in named]


def assert_same(alone, batched, n: int) -> None:
    assert batched.refusals == alone.refusals
    assert (batched.good_scored, batched.bad_scored) == (alone.good_scored, alone.bad_scored)
    # a different batch composition changes the last bits; the unedited item's KL is ~0 (abs bound)
    assert batched.kl_sum == pytest.approx(alone.kl_sum, rel=1e-4, abs=1e-6)
    assert batched.timings["batched_with"] == n and batched.host == alone.host


@pytest.mark.parametrize("k, mode", [(2, "default"), (3, "default"), (3, "no_early_stop"), (3, "no_fast_generation")])
def test_batched_trials_equal_each_trial_alone(engines, k, mode):
    named = ITEMS[k]
    set_mode(engines[1], mode)
    set_mode(engines[k], mode)
    alone = [engines[1].run_trial(params, shard) for params, shard in items_of(named)]
    batched = engines[k].run_trials(items_of(named))
    for a, b in zip(alone, batched):
        assert_same(a, b, len(named))
    assert len({a.refusals for a in alone}) > 1  # equal counts would not show rows on the wrong adapter
    if k == 3:  # the gated item: all its prompts refusals, and nothing generated for it
        assert batched[0].refusals == batched[0].bad_scored and batched[0].timings["generation_s"] == 0.0
        assert alone[2].kl_sum == 0.0 and abs(batched[2].kl_sum) < 1e-6


def test_rows_take_their_own_adapter(engines):
    """Two very different edits in one batch, in both orders: each gets its own KL, not the other's."""
    one, two = (PARAMS["wide"], Shard()), (PARAMS["mild"], Shard())
    set_mode(engines[2], "default")
    alone = [engines[2].run_trial(*one), engines[2].run_trial(*two)]
    assert alone[0].kl_sum > 5 * alone[1].kl_sum
    for order in ([0, 1], [1, 0]):
        batched = engines[2].run_trials([[one, two][i] for i in order])
        for i, b in zip(order, batched):
            assert_same(alone[i], b, 2)


def test_one_item_is_exactly_run_trial(engines):
    set_mode(engines[3], "default")
    for name in ("medium", "none"):
        alone = engines[3].run_trial(PARAMS[name], Shard(0, 2))
        [batched] = engines[3].run_trials([(PARAMS[name], Shard(0, 2))])
        assert (batched.refusals, batched.kl_sum, batched.good_scored) == (alone.refusals, alone.kl_sum,
                                                                          alone.good_scored)
        assert "batched_with" not in batched.timings


def test_judge_gets_each_trials_own_replies(engines):
    set_mode(engines[1], "default")
    set_mode(engines[2], "default")
    named = ITEMS[2]
    saved = {k: engines[k].settings for k in (1, 2)}
    try:
        for k in (1, 2):
            engines[k].settings = saved[k].model_copy(update={"refusal_judge": JudgeSettings()})
        alone = [engines[1].run_trial(params, shard) for params, shard in items_of(named)]
        batched = engines[2].run_trials(items_of(named))
    finally:
        for k in (1, 2):
            engines[k].settings = saved[k]
    for a, b in zip(alone, batched):
        assert b.replies_to_judge == a.replies_to_judge and b.refusals == 0
        assert len(b.replies_to_judge) == b.bad_scored


def test_more_items_than_adapters_is_refused(engines):
    with pytest.raises(ValueError, match="trials_per_worker"):
        engines[2].run_trials(items_of(ITEMS[3]))
    assert engines[1].run_trials([]) == []


def test_k_adapters_exist_and_k1_has_only_default(engines):
    assert engines[1].adapters == ["default"]
    assert engines[3].adapters == ["default", "t1", "t2"]
    module = next(iter(engines[3]._lora.values()))
    assert set(module.lora_A) == {"default", "t1", "t2"}
    assert engines[3].model.active_adapters == ["default"]  # run_trial's forward sees "default" only


def test_fused_experts_refuse_more_than_one_trial(tmp_path):
    folder = tiny_model_folder(tmp_path, "qwen2_moe", layers=2, **MOE_ARCHS["qwen2_moe"])
    with pytest.raises(UserError, match="trials_per_worker = 1") as error:
        Engine(make_settings(folder, cluster=ClusterSettings(trials_per_worker=2)))
    assert "\n" not in str(error.value) and "fused MoE experts" in str(error.value)


def test_four_bit_layers_take_per_row_adapters(tmp_path):
    """PEFT's bitsandbytes 4-bit LoRA layer has the mixed-adapter batch forward too: no refusal. The
    reference is this engine's own run_trial (the "default" adapter alone, as with K = 1)."""
    pytest.importorskip("bitsandbytes")
    folder = tiny_model_folder(tmp_path, "llama", hidden=64)
    engine = engine_for(folder, 2, quantization="bnb_4bit")
    assert any("4bit" in type(m).__name__ for m in engine._lora.values())
    named = [("medium", Shard()), ("none", Shard(0, 2))]
    alone = [engine.run_trial(params, shard) for params, shard in items_of(named)]
    for a, b in zip(alone, engine.run_trials(items_of(named))):
        assert_same(a, b, 2)
    assert alone[0].kl_sum > 1e-4


def test_a_layer_that_sees_tokens_not_rows_is_refused_at_load(engines):
    """Like MoE experts kept as module lists (they get the routed tokens, flattened): PEFT's row check
    fails on the load-time probe, as one UserError line."""
    from heretic_dist.engine import multi

    module = engines[2]._lora["model.layers.1.mlp.down_proj"]
    shapes: dict[str, torch.Size] = {}

    def flatten(mod, args):
        shapes["x"] = args[0].shape
        return (args[0].reshape(-1, args[0].shape[-1]), *args[1:])

    handles = [module.register_forward_pre_hook(flatten),
               module.register_forward_hook(lambda mod, args, out: out.reshape(*shapes["x"][:-1], -1))]
    try:
        with pytest.raises(UserError, match="set cluster.trials_per_worker = 1") as error:
            multi.check_mixed_batch(engines[2])
    finally:
        for handle in handles:
            handle.remove()
    assert "\n" not in str(error.value)
    multi.check_mixed_batch(engines[2])  # the hooks gone, the probe passes again
