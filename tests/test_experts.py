"""Fused routed experts (transformers 5 `mlp.experts.down_proj`, both layouts) take the edit: exactly,
reversibly (bit-exact), exported merged, and the same through a Ray worker."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from test_engine import BAD, GOOD, make_settings, raw_params, ready_engine
from tiny_models import MOE_ARCHS, moe_model_folder
from transformers import AutoModelForCausalLM

from heretic_dist.engine import experts
from heretic_dist.engine.ablation import reference_full_normalization_factors
from heretic_dist.engine.engine import Engine
from heretic_dist.engine.export import export_trial
from heretic_dist.engine.types import Shard
from heretic_dist.errors import UserError
from heretic_dist.search.space import decode_trial_params

ARCHS = sorted(MOE_ARCHS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def get(arch: str, **extra):
        key = (arch, tuple(sorted(extra.items())))
        if key not in made:
            made[key] = moe_model_folder(tmp_path_factory.mktemp(arch), arch, **extra)
        return made[key]

    return get


def everywhere(n_layers: int, max_weight: float = 1.0, min_fraction: float = 1.0, scope: str = "global"):
    """Params whose tent gives every layer an edit (weight max_weight when min_fraction = 1)."""
    raw = raw_params(n_layers, scope, max_weight=max_weight, distance=100.0)
    for c in ("attn.o_proj", "mlp.down_proj"):
        raw[f"{c}.min_weight"] = min_fraction
    return decode_trial_params(raw, n_layers)


def random_params(rng: random.Random, n_layers: int):
    raw = {"direction_scope": rng.choice(["global", "per layer"]),
           "direction_index": rng.uniform(0.4, 0.9) * (n_layers - 1)}
    for c in ("attn.o_proj", "mlp.down_proj"):
        raw |= {f"{c}.max_weight": rng.uniform(0.8, 1.5), f"{c}.max_weight_position": rng.uniform(0, n_layers),
                f"{c}.min_weight": rng.uniform(0, 1), f"{c}.min_weight_distance": rng.uniform(1, n_layers)}
    return decode_trial_params(raw, n_layers)


def logits(model, engine) -> torch.Tensor:
    inputs = engine.tokenizer(["Hello there, plants and the sea", "Tell me a joke"], return_tensors="pt",
                              padding=True)
    with torch.inference_mode():
        return model(**inputs).logits


def dense_reference(weight: torch.Tensor, v: torch.Tensor, w: float, mode: str, rank: int, seed: int):
    """ALGORITHM.md section 4 written out for one expert matrix W (d_out x d_in): the edited matrix."""
    norms = weight.norm(dim=1, keepdim=True)
    unit_rows = F.normalize(weight, p=2, dim=1)
    if mode == "none":
        return weight - w * torch.outer(v, v @ weight)
    if mode == "pre":
        return weight - w * torch.outer(norms[:, 0] * v, v @ unit_rows)
    a, b = reference_full_normalization_factors(weight, v, w, rank, seed)
    return weight + b @ a


def direction_of(engine, params, layer: int) -> torch.Tensor:
    from heretic_dist.engine.ablation import layer_direction

    return layer_direction(engine.directions, params, layer)


# --- the edit is right ------------------------------------------------------------------------


@pytest.mark.parametrize("arch,square", [(a, False) for a in ARCHS] + [("gpt_oss", True), ("qwen3_moe", True)])
def test_none_weight_one_routed_experts_cannot_write_along_v(folders, arch, square):
    # square experts: the layout must come from the module's code path, the shapes cannot tell
    extra = ({"intermediate_size": 32} if arch == "gpt_oss" else {"moe_intermediate_size": 32}) if square else {}
    engine = ready_engine(folders(arch, **extra), row_normalization="none")
    params = everywhere(len(engine.components.layers))
    engine.apply(params)
    assert engine.fused, "no fused experts found"
    for layer, entries in enumerate(engine.components.fused):
        v = direction_of(engine, params, layer)
        for entry in entries:
            a, b = experts.edit_of(entry.module)
            param = entry.module.down_proj.detach()
            d_in = param.shape[1] if entry.transposed else param.shape[2]
            h = torch.randn(50, d_in)
            for e in range(entry.num_experts):  # the forward path's own per-expert computation
                y = experts.expert_down(h, param[e], None, a[e], b[e], entry.transposed)
                assert ((y @ v).abs() / y.norm(dim=1)).max() < 1e-5, (entry.name, e)

    # and end to end: what the experts modules return has no component along v (biases zeroed,
    # since the edit leaves an expert's bias as it is)
    for entry in engine.fused:
        if getattr(entry.module, "has_bias", False):
            with torch.no_grad():
                entry.module.down_proj_bias.zero_()
    seen = []
    hooks = [entry.module.register_forward_hook(lambda m, i, out, k=k: seen.append((k, out)))
             for k, entry in enumerate(engine.fused)]
    logits(engine.model, engine)
    for hook in hooks:
        hook.remove()
    layer_of = {id(e.module): i for i, layer in enumerate(engine.components.fused) for e in layer}
    for k, out in seen:
        v = direction_of(engine, params, layer_of[id(engine.fused[k].module)])
        out = out[0] if isinstance(out, tuple) else out
        assert ((out @ v).abs() / out.norm(dim=-1).clamp_min(1e-12)).max() < 1e-5


@pytest.mark.parametrize("mode", ["none", "pre", "full"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_edit_equals_dense_per_expert_reference(folders, arch, mode):
    engine = ready_engine(folders(arch), row_normalization=mode)
    params = everywhere(len(engine.components.layers), max_weight=1.3, min_fraction=0.4, scope="per layer")
    engine.apply(params)
    from heretic_dist.search.space import layer_weight

    for layer, entries in enumerate(engine.components.fused):
        v = direction_of(engine, params, layer)
        w = layer_weight(layer, params.components["mlp.down_proj"])
        for entry in entries:
            a, b = experts.edit_of(entry.module)
            param = entry.module.down_proj.detach()
            merged = experts.merged_down_proj(param, a, b, entry.transposed)
            for e in range(entry.num_experts):
                weight = param[e].mT if entry.transposed else param[e]
                ref = dense_reference(weight, v, w, mode, engine.rank, engine.seed)
                got = merged[e].mT if entry.transposed else merged[e]
                assert float((got - ref).norm() / ref.norm()) < 1e-5, (entry.name, e)
                assert float((got - weight).norm() / weight.norm()) > 1e-3  # really edited
                h = torch.randn(7, weight.shape[1])  # the forward path gives the reference's outputs
                y = experts.expert_down(h, param[e], None, a[e], b[e], entry.transposed)
                assert float((y - h @ ref.T).norm() / (h @ ref.T).norm()) < 1e-5


# --- reset ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_then_reset_gives_the_unedited_logits_bit_exact(folders, arch):
    folder = folders(arch)
    # prepacked CPU Linear weights (oneDNN) change the last bits of any forward against a plain model
    engine = ready_engine(folder, prepack_weights=False)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    original = logits(plain, engine)
    assert torch.equal(logits(engine.model, engine), original)
    n = len(engine.components.layers)
    engine.apply(everywhere(n, max_weight=1.2))
    assert not torch.equal(logits(engine.model, engine), original)
    engine.reset()
    assert torch.equal(logits(engine.model, engine), original)
    rng = random.Random(7)
    for _ in range(20):
        engine.apply(random_params(rng, n))
        logits(engine.model, engine)
    engine.reset()
    assert torch.equal(logits(engine.model, engine), original)
    weights = {e.name: e.module.down_proj for e in engine.fused}
    for name, param in plain.named_parameters():
        if name.endswith("experts.down_proj"):
            assert torch.equal(weights[name.removesuffix(".down_proj")], param)  # never written


# --- what is edited is visible ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_info_lists_what_each_layer_edits(folders, arch):
    engine = Engine(make_settings(folders(arch)))
    edited = engine.info()["edited"]
    assert engine.info()["unsupported"] == [] and edited["not_edited"] == []
    assert json.loads(json.dumps(edited)) == edited  # plain data: travels from a Ray worker
    rows = edited["per_layer"]
    assert all(row["attention"] == 1 for row in rows)
    dense_first = arch == "deepseek_v3"  # first_k_dense_replace = 1
    assert [row["routed_experts"] for row in rows] == [0 if dense_first and i == 0 else 4 for i in range(2)]
    assert rows[0]["dense_mlp"] == int(dense_first)
    shared = arch in ("qwen2_moe", "deepseek_v3")
    assert rows[1]["shared_experts"] == int(shared)
    assert edited["fused_layout"] == (["(E, in, out) x @ W"] if arch == "gpt_oss" else ["(E, out, in)"])
    assert "mlp.down_proj" in engine.info()["components"]


def test_attention_only_leaves_every_mlp_unedited(folders):
    folder = folders("qwen2_moe")
    engine = ready_engine(folder, attention_only=True)
    info = engine.info()
    assert info["components"] == ["attn.o_proj"]
    assert info["edited"]["mlp_skipped"] is True
    assert info["edited"]["totals"] == {"attention": 2, "dense_mlp": 0, "shared_experts": 0, "routed_experts": 0}
    engine.apply(everywhere(2))
    assert all(".mlp." not in name for name in engine.components.module_names())
    assert all(experts.edit_of(e.module) is None for e in engine.components.all_fused())


def test_quantized_fused_tensors_are_refused_in_one_line():
    module = torch.nn.Module()
    module.down_proj = torch.nn.Parameter(torch.zeros(4, 8, 8, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(UserError, match=r"model\.layers\.3\.mlp\.experts\.down_proj \(uint8\)"):
        experts.refuse_quantized([experts.FusedExperts("model.layers.3.mlp.experts", module, False)])


def test_nf4_model_edits_its_full_precision_experts_and_exports(folders, tmp_path):
    pytest.importorskip("bitsandbytes")
    folder = folders("qwen3_moe", hidden=64, head_dim=16)
    engine = ready_engine(folder, quantization="bnb_4bit", row_normalization="none")
    assert engine.fused and all(e.module.down_proj.dtype == torch.float32 for e in engine.fused)
    params = everywhere(2)
    engine.apply(params)
    a, b = experts.edit_of(engine.fused[0].module)
    v = direction_of(engine, params, 0)
    h = torch.randn(20, engine.fused[0].module.down_proj.shape[2])
    y = experts.expert_down(h, engine.fused[0].module.down_proj[1].detach(), None, a[1], b[1], False)
    assert ((y @ v).abs() / y.norm(dim=1)).max() < 1e-5
    result = export_trial(engine, params, {"number": 0}, tmp_path / "out")  # full-precision merge path
    assert result.kind == "merged" and result.max_abs_logit_diff < 1e-3


# --- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_export_of_moe_reloads_with_plain_transformers(folders, tmp_path, arch):
    folder = folders(arch)
    engine = ready_engine(folder)
    params = everywhere(2, max_weight=1.3)
    engine.apply(params)
    expected = logits(engine.model, engine)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert (expected - logits(plain, engine)).abs().max() > 1e-2
    result = export_trial(engine, params, {"number": 1}, tmp_path / "out")
    assert result.kind == "merged" and result.max_abs_logit_diff < 1e-3
    config = (tmp_path / "out" / "config.json").read_text()
    assert experts.IMPLEMENTATION not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert (logits(reloaded, engine) - expected).abs().max() < 1e-4


def test_adapter_export_says_it_cannot_hold_fused_expert_edits(folders, tmp_path):
    engine = ready_engine(folders("qwen3_moe"))
    with pytest.raises(UserError, match="cannot hold .* fused routed experts.*drop --adapter"):
        export_trial(engine, everywhere(2), {"number": 1}, tmp_path / "out", adapter=True)
    assert not (tmp_path / "out").exists()
    # with the experts unedited (attention only) an adapter holds the whole edit
    engine = ready_engine(folders("qwen3_moe"), attention_only=True)
    result = export_trial(engine, everywhere(2), {"number": 1}, tmp_path / "adapter", adapter=True)
    assert result.kind == "adapter" and result.max_abs_logit_diff < 1e-3


# --- through a Ray worker -------------------------------------------------------------------------


def test_ray_worker_scores_a_moe_trial_as_in_process(folders):
    import ray

    from heretic_dist.distributed.pool import WorkerPool, quiet_ray_env
    from heretic_dist.search.objectives import reduce_partials

    folder = folders("qwen3_moe")
    engine = ready_engine(folder, refusal_markers=["the", "a"])
    params = everywhere(2, max_weight=1.2)
    local = engine.run_trial(params, Shard())
    quiet_ray_env()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        pool = WorkerPool("hf", make_settings(folder, refusal_markers=["the", "a"]), n_workers=1,
                          cpus_per_worker=1.0)
        assert pool.info()["edited"]["totals"]["routed_experts"] == 8
        pool.set_directions(engine.directions)
        pool.set_eval_prompts(GOOD, BAD)
        remote = reduce_partials(pool.run_sharded("run_trial", [(params.to_dict(), Shard(0, 1))]).results)
        assert remote["refusals"] == local.refusals and remote["bad_scored"] == len(BAD)
        assert remote["kl"] == pytest.approx(local.kl_sum / local.good_scored, rel=1e-5)
        assert remote["kl"] > 1e-4
        pool.shutdown()
    finally:
        ray.shutdown()
