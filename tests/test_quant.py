"""bitsandbytes NF4 on CPU: load, LoRA, edit, score, and correct dequantization despite repacking."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_engine import BAD, GOOD, make_settings, raw_params
from tiny_models import tiny_model_folder

from heretic_dist.engine.ablation import directions_from_sums
from heretic_dist.search.space import decode_trial_params
from heretic_dist.engine.engine import Engine
from heretic_dist.engine.quant import dequantize_4bit
from heretic_dist.engine.types import Shard

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 64-wide so that bnb's CPU kernel layout applies (it needs rows divisible by 32)
    return tiny_model_folder(tmp_path_factory.mktemp("q"), "llama", layers=2, hidden=64)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_nf4_engine_edits_and_scores_with_correct_weights(folder):
    engine = Engine(make_settings(folder, quantization="bnb_4bit"))
    fp32 = load_file(str(folder / "model.safetensors"))
    modules = engine.components.module_names()
    assert modules
    for name in modules:
        base = engine._lora[name].base_layer
        assert isinstance(base, bnb.nn.Linear4bit)
        assert base.support_avx512bf16_for_cpu is False
        used = engine._base_weight(name, engine._lora[name])
        assert relative_error(used, fp32[name + ".weight"]) < 0.15, name

    good_sum, good_n = engine.residual_sums(GOOD)
    bad_sum, bad_n = engine.residual_sums(BAD)
    engine.set_directions(directions_from_sums(good_sum, good_n, bad_sum, bad_n, True))
    engine.set_eval_prompts(GOOD, BAD)
    assert engine.run_trial(None, Shard()).kl_sum == 0.0
    edited = engine.run_trial(decode_trial_params(raw_params(2, max_weight=1.5), 2), Shard())
    assert edited.kl_sum > 0 and edited.bad_scored == len(BAD)
    # after forwards in eval mode the weights are still the right ones
    for name in modules:
        used = engine._base_weight(name, engine._lora[name])
        assert relative_error(used, fp32[name + ".weight"]) < 0.15, name


def test_dequantize_undoes_cpu_repacking(folder):
    """The pitfall: after bnb repacks a weight for its AVX512-BF16 kernel, plain dequantize is wrong."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bnb never repacks here")
    w = load_file(str(folder / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", module=layer)
    layer = layer.to("cpu")
    layer.eval()
    with torch.inference_mode():
        layer(torch.randn(2, w.shape[1]))
    state = layer.weight.quant_state
    assert getattr(state, "packing_format_for_cpu", False), "bnb did not repack; the test checks nothing"
    naive = bnb.functional.dequantize_4bit(layer.weight.data, state)
    assert relative_error(naive, w) > 0.5  # the silent error upstream builds its edits from
    assert relative_error(dequantize_4bit(layer.weight, state), w) < 0.15
