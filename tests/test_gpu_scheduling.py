"""GPUs per replica: the "auto" sizing (model configs written as code, no downloads), the device map a
worker over several GPUs loads with, and Ray's placement of fake GPUs through a real WorkerPool."""

from __future__ import annotations

import collections
import logging
import textwrap

import pytest

from heretic_dist.config import ClusterSettings, load_settings
from heretic_dist.distributed.sizing import (NO_GPUS, NodeGpus, ReplicaPlan, choose_gpus, plan_replicas, prompt_tokens,
                                             replicas_on, reserved)
from heretic_dist.engine.sizing import (GIB, count_parameters, device_placement, estimate_memory, load_dtype,
                                        model_label)
from heretic_dist.engine.types import MemoryNeed, Prompt
from heretic_dist.errors import UserError

# The shapes of three real models (from their config.json), built on the meta device.
SHAPES = {
    "Qwen2.5-0.5B": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True, dtype="bfloat16")),
    "Llama-3.1-8B": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   dtype="bfloat16")),
    "Llama-3.1-70B": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                    dtype="bfloat16")),
}
TOKENS = 256 + 100  # the default prompt estimate + max_response_length


def config(name: str):
    from transformers import AutoConfig

    arch, kwargs = SHAPES[name]
    return AutoConfig.for_model(arch, **kwargs)


def test_parameters_are_counted_without_weights():
    """Meta-device counts equal the published sizes (Qwen2.5-0.5B: 494,032,768 with tied embeddings)."""
    assert count_parameters(config("Qwen2.5-0.5B")).total == 494_032_768
    assert abs(count_parameters(config("Llama-3.1-8B")).total / 8.03e9 - 1) < 0.002
    big = count_parameters(config("Llama-3.1-70B"))
    assert abs(big.total / 70.55e9 - 1) < 0.002
    assert big.total - big.linear == 2 * 128256 * 8192 + (2 * 80 + 1) * 8192  # embeddings, head, norms
    assert load_dtype(config("Llama-3.1-8B"), ["auto", "float32"]) == "bfloat16"
    assert load_dtype(config("Llama-3.1-8B"), ["float32"]) == "float32"
    assert model_label("meta-llama/Llama-3.1-8B-Instruct", "bfloat16", "none") == "Llama-3.1-8B-Instruct bf16"
    assert model_label("/m/qwen.Q4_K_M.gguf", "float32", "bnb_4bit") == "qwen.Q4_K_M 4-bit"


def test_memory_need_adds_weights_kv_cache_and_overhead():
    need = estimate_memory(config("Llama-3.1-8B"), dtype="bfloat16", quantization="none", batch=128, tokens=TOKENS)
    assert need.weights == 8_030_261_248 * 2
    assert need.kv_cache == 32 * 8 * (128 + 128) * 2 * 128 * TOKENS  # layers x kv heads x (K + V) x bytes
    assert GIB / 2 <= need.overhead < GIB
    four_bit = estimate_memory(config("Llama-3.1-8B"), dtype="bfloat16", quantization="bnb_4bit", batch=128,
                               tokens=TOKENS)
    assert four_bit.kv_cache == need.kv_cache and 0.3 < four_bit.weights / need.weights < 0.4
    rank = estimate_memory(config("Llama-3.1-8B"), dtype="bfloat16", quantization="none", batch=128,
                           tokens=TOKENS, tensor_parallel=2)
    assert rank.kv_cache == need.kv_cache // 2 and 0.5 < rank.weights / need.weights < 0.6


# model, quantization, batch, tensor_parallel, GiB per GPU -> GPUs per worker (per rank), replicas on 8 GPUs
TABLE = [
    ("Qwen2.5-0.5B", "none", 128, 1, 80, 0.125, 64),  # 1.9 GiB: the densest packing, 8 per GPU
    ("Qwen2.5-0.5B", "none", 128, 1, 16, 0.1428, 56),  # 7 fit one GPU
    ("Llama-3.1-8B", "none", 16, 1, 48, 0.5, 16),  # 16.2 GiB: two per GPU
    ("Llama-3.1-8B", "none", 16, 1, 80, 0.25, 32),
    ("Llama-3.1-8B", "none", 128, 1, 80, 0.3333, 24),  # the KV cache of 128 sequences: 21 GiB
    ("Llama-3.1-8B", "none", 128, 1, 24, 2.0, 4),
    ("Llama-3.1-8B", "bnb_4bit", 128, 1, 24, 1.0, 8),
    ("Llama-3.1-70B", "none", 16, 1, 80, 2.0, 4),  # 133.7 GiB
    ("Llama-3.1-70B", "none", 128, 1, 80, 4.0, 2),  # 145.8 GiB
    ("Llama-3.1-70B", "none", 128, 1, 24, 8.0, 1),
    ("Llama-3.1-70B", "none", 128, 1, 141, 2.0, 4),  # H200
    ("Llama-3.1-70B", "bnb_4bit", 128, 1, 80, 1.0, 8),
    ("Llama-3.1-70B", "none", 128, 2, 80, 2.0, 2),  # per rank: 75.1 GiB; 2 ranks x 2 GPUs
    ("Llama-3.1-70B", "none", 128, 2, 141, 1.0, 4),
    ("Llama-3.1-70B", "bnb_4bit", 128, 2, 141, 0.25, 16),
]


@pytest.mark.parametrize("model, quant, batch, ranks, gib, gpus, replicas", TABLE)
def test_auto_sizing_table(model, quant, batch, ranks, gib, gpus, replicas):
    need = estimate_memory(config(model), dtype="bfloat16", quantization=quant, batch=batch, tokens=TOKENS,
                           tensor_parallel=ranks, label=model_label(model, "bfloat16", quant))
    plan = plan_replicas(need, gib * GIB, [NodeGpus("n", 8, 64)], ClusterSettings(tensor_parallel=ranks),
                         quant == "bnb_4bit")
    assert (plan.gpus_per_worker, plan.replicas) == (gpus, replicas), plan.line
    if plan.gpus_per_worker < 1:  # k workers of 1/k GPU fit one GPU in Ray's arithmetic
        assert int(1 / plan.gpus_per_worker + 1e-9) * plan.gpus_per_worker <= 1
    assert plan.line.startswith(need.label) and "\n" not in plan.line


@pytest.mark.parametrize("gib, nodes, quant, expected", [
    (16, [8], "none", "needs 145.8 GiB per replica, more than 8 GPUs of 16 GiB"),  # too big for any node
    (80, [2, 2], "none", "needs 4 GPUs on one node (4 GPUs per replica), and the largest node has 2"),
    (80, [0, 0], "none", NO_GPUS),
])
def test_impossible_plans_say_one_line(gib, nodes, quant, expected):
    need = estimate_memory(config("Llama-3.1-70B"), dtype="bfloat16", quantization=quant, batch=128, tokens=TOKENS,
                           label="Llama-3.1-70B bf16")
    with pytest.raises(UserError) as error:
        plan_replicas(need, gib * GIB, [NodeGpus(str(i), n) for i, n in enumerate(nodes)], ClusterSettings())
    assert expected in str(error.value) and "\n" not in str(error.value)
    if expected != NO_GPUS:
        assert 'quantization = "bnb_4bit"' in str(error.value)  # the fix is named


def test_packing_and_replica_counts():
    assert choose_gpus(10 * GIB, 80 * GIB, 0.15) == 0.1666  # 6 fit: 1/6 rounded down to Ray's precision
    assert choose_gpus(69 * GIB, 80 * GIB, 0.15) == 2.0 and choose_gpus(600 * GIB, 80 * GIB, 0.15) is None
    nodes = [NodeGpus("a", 8, 16), NodeGpus("b", 4, 2), NodeGpus("cpu-only", 0, 64)]
    assert replicas_on(nodes, 0.5, 1, cpus_per_worker=1) == 16 + 2  # node b: 2 CPUs for 8 half-GPU slots
    assert replicas_on(nodes, 2.0, 2) == 2 + 1  # a replica of 2 ranks x 2 GPUs stays on one node
    assert replicas_on(nodes, 0.3333, 1) == 24 + 12
    plan = ReplicaPlan(2.0, 2, 3, 0, 0, 0.15, "")
    assert plan.gpus_per_replica == 4.0
    # the embedded cluster reserves workers x ranks x per-rank resources
    assert reserved(ClusterSettings(workers=3, tensor_parallel=2, cpus_per_worker=1.5, gpus_per_worker=0.5)) == (9.0, 3.0)
    assert reserved(ClusterSettings(workers=3, gpus_per_worker="auto")) == (3.0, 0.0)
    assert prompt_tokens(None) == 256 and prompt_tokens([Prompt("s" * 30, "u" * 270)]) == 300 // 3 + 32


# -- the device map of one worker over several GPUs ------------------------------------------------------


@pytest.mark.parametrize("device_map, max_memory, gpus, expected", [
    ("auto", None, [80 * GIB, 80 * GIB], ("auto", {0: int(80 * GIB * 0.85), 1: int(80 * GIB * 0.85)})),
    ("balanced", None, [40 * GIB] * 4, ("balanced", {i: int(40 * GIB * 0.85) for i in range(4)})),
    ("auto", None, [80 * GIB], ("auto", None)),  # one GPU: accelerate's own default, as upstream
    ("auto", None, [], ("auto", None)),  # no GPU (CPU workers)
    ("cuda:0", None, [80 * GIB] * 2, ("cuda:0", None)),  # an explicit placement is the user's
    ({"": 1}, None, [80 * GIB] * 2, ({"": 1}, None)),
    ("auto", {"0": "20GB", "cpu": "64GB"}, [80 * GIB] * 2, ("auto", {0: "20GB", "cpu": "64GB"})),  # user wins
])
def test_device_placement(device_map, max_memory, gpus, expected):
    assert device_placement(device_map, max_memory, gpus, 0.15) == expected


def test_accelerate_balances_a_model_over_two_gpus_with_that_max_memory(caplog):
    """What from_pretrained(device_map="auto") does with our max_memory (transformers' own two steps:
    balanced memory, then the device map), run on CPU for two GPUs that are not there."""
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(tiny)
    size = sum(p.numel() * 4 for p in model.parameters())
    _, max_memory = device_placement("auto", None, [size, size], 0.15)  # each GPU could hold 85% of it
    with caplog.at_level(logging.ERROR):  # "Device 0 is not available" on this machine
        balanced = get_balanced_memory(model, max_memory=dict(max_memory), dtype=torch.float32,
                                       no_split_module_classes=model._no_split_modules)
        device_map = infer_auto_device_map(model, max_memory=balanced, dtype=torch.float32,
                                           no_split_module_classes=model._no_split_modules)
    layers = collections.Counter(d for name, d in device_map.items() if ".layers." in name)
    assert set(device_map.values()) == {0, 1} and min(layers.values()) >= 3, device_map


# -- fake GPUs on a real local Ray cluster ----------------------------------------------------------------

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def gpu_cluster():
    from heretic_dist.distributed.pool import quiet_ray_env

    quiet_ray_env()
    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, object_store_memory=100 * 1024**2,
             logging_level="WARNING", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def gpu_ids(gpus_per_worker: float, n_workers: int) -> list[list[str]]:
    """The GPU ids each worker of a real pool of FakeEngines was given (CUDA_VISIBLE_DEVICES)."""
    from heretic_dist.distributed.pool import WorkerPool

    with WorkerPool("fake", {}, n_workers, cpus_per_worker=0.25, gpus_per_worker=gpus_per_worker) as pool:
        handles = ray.get(pool.broker.handles.remote())
        return [info["gpu_ids"] for info in ray.get([h.info.remote() for h in handles.values()])]


def test_half_gpus_pack_two_workers_per_gpu(gpu_cluster):
    ids = gpu_ids(0.5, 8)
    assert all(len(x) == 1 for x in ids), ids
    assert collections.Counter(x[0] for x in ids) == {"0": 2, "1": 2, "2": 2, "3": 2}


def test_two_gpus_per_worker_are_distinct_and_disjoint(gpu_cluster):
    ids = gpu_ids(2.0, 2)
    assert all(len(set(x)) == 2 for x in ids), ids
    assert set(ids[0]).isdisjoint(ids[1]) and set(ids[0]) | set(ids[1]) == {"0", "1", "2", "3"}


def fake_settings(**cluster):
    return load_settings(None, {"engine": "fake", "model": "fake-30g", "engine_options": {"fake_memory_gib": 30},
                                **{f"cluster.{k}": v for k, v in cluster.items()}})


def test_resolve_cluster_on_the_cluster(gpu_cluster):
    from heretic_dist.distributed.sizing import resolve_cluster

    fixed = fake_settings(gpus_per_worker=1)
    assert resolve_cluster(fixed) == (fixed, None)
    settings, plan = resolve_cluster(fake_settings(gpus_per_worker="auto", gpu_memory_gib=80, cpus_per_worker=0.25))
    assert settings.cluster.gpus_per_worker == 0.5 and plan.replicas == 8  # 30 GiB: 2 per 80 GiB GPU
    assert plan.line == ("fake-30g (fake), 30.0 GiB per replica: 0.5 GPU per replica (2 per GPU), 8 replicas on this "
                         "cluster (GPUs of 80 GiB, 15% kept free)")
    with pytest.raises(UserError, match=r"needs 8 GPUs on one node \(8 GPUs per replica\), and the largest node has 4"):
        resolve_cluster(fake_settings(gpus_per_worker="auto", gpu_memory_gib=8))
    # no gpu_memory_gib: read on a GPU node, where these fake GPUs have no memory to read
    with pytest.raises(UserError, match="cannot read the memory of the GPUs .* set cluster.gpu_memory_gib"):
        resolve_cluster(fake_settings(gpus_per_worker="auto"))


def test_the_driver_runs_with_the_resolved_value_and_records_the_plan(gpu_cluster, tmp_path, capsys):
    """The run's phase before the pool (driver._size_replicas), and `check --address` on the same cluster."""
    from types import SimpleNamespace

    from heretic_dist.cli import main
    from heretic_dist.distributed.driver import _size_replicas

    lines: list[str] = []
    ctx = SimpleNamespace(settings=fake_settings(gpus_per_worker="auto", gpu_memory_gib=80), replica_plan="",
                          prompts={"bad_prompts": [Prompt("", "x" * 3000)]}, say=lines.append)
    _size_replicas(ctx)
    assert ctx.settings.cluster.gpus_per_worker == 0.5 and lines == [f"replicas: {ctx.replica_plan}"]
    assert "2 replicas on this cluster" in ctx.replica_plan  # 2 CPUs, 1 per worker
    path = tmp_path / "auto.toml"
    path.write_text(textwrap.dedent(CHECK_CONFIG))
    assert main(["check", str(path), "--no-model", "--address", "auto"]) == 0  # joins this running cluster
    assert "50.0 GiB per replica: 1 GPU per replica, 2 replicas on this cluster" in capsys.readouterr().out


# -- heretic-dist check -----------------------------------------------------------------------------------

CHECK_CONFIG = """
engine = "fake"
model = "fake-model"
good_prompts = { dataset = "builtin:demo_harmless", split = "[:4]" }
bad_prompts = { dataset = "builtin:demo_harmful", split = "[:4]" }
good_evaluation_prompts = { dataset = "builtin:demo_harmless", split = "[4:8]" }
bad_evaluation_prompts = { dataset = "builtin:demo_harmful", split = "[4:8]" }
[engine_options]
fake_memory_gib = 50
[cluster]
gpus_per_worker = "auto"
gpu_memory_gib = 80
"""


def test_check_prints_the_plan_and_refuses_an_impossible_one(tmp_path, capsys):
    from heretic_dist.cli import main

    path = tmp_path / "auto.toml"
    path.write_text(textwrap.dedent(CHECK_CONFIG))
    assert main(["check", str(path), "--no-model", "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "replicas: fake-model (fake), 50.0 GiB per replica: 1 GPU per replica, 4 replicas on this cluster" in out
    huge = tmp_path / "huge.toml"
    huge.write_text(textwrap.dedent(CHECK_CONFIG).replace("fake_memory_gib = 50", "fake_memory_gib = 900"))
    assert main(["check", str(huge), "--no-model", "--gpus", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs 900.0 GiB per replica, more than 8 GPUs of 80 GiB" in err
    assert "Traceback" not in err
    assert main(["check", str(path), "--no-model", "--gpus", "0"]) == 2
    assert NO_GPUS in capsys.readouterr().err
    assert main(["check", str(path), "--no-model"]) == 2  # this machine has no GPU
    assert "this machine has no GPU to plan for; give --gpus N" in capsys.readouterr().err


def test_fake_engine_reports_its_gpus(monkeypatch):
    from heretic_dist.testing.fake import FakeEngine

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert FakeEngine({}).info()["gpu_ids"] == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert FakeEngine({}).info()["gpu_ids"] == []
    need = FakeEngine.memory_need(fake_settings(tensor_parallel=2), 100, 100)
    assert isinstance(need, MemoryNeed) and need.total == 15 * GIB
