"""The distributed path with a real (tiny) transformers model: a CLI run, export, and prompt sharding."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import ray
import torch
from test_engine import BAD, GOOD, make_settings
from tiny_models import tiny_model_folder
from transformers import AutoModelForCausalLM

from heretic_dist import rundir as st
from heretic_dist.distributed.pool import WorkerPool, quiet_ray_env
from heretic_dist.search.objectives import reduce_partials
from heretic_dist.engine.ablation import directions_from_sums
from heretic_dist.search.space import decode_trial_params
from heretic_dist.engine.engine import Engine
from heretic_dist.engine.passes import render, tokenize
from heretic_dist.engine.types import Shard

pytestmark = pytest.mark.slow
ENGINE = "hf"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny"), "llama", layers=4)


def test_cli_run_then_export_reloads_with_plain_transformers(tmp_path, model_folder):
    config = tmp_path / "tiny.toml"
    config.write_text(f"""
model = "{model_folder}"
dtypes = ["float32"]
device_map = "cpu"
max_response_length = 8
batch_size = 8
n_trials = 4
n_startup_trials = 2
seed = 5
refusal_markers = ["read", "sorry"]
[good_prompts]
dataset = "builtin:demo_harmless"
split = "[:8]"
[bad_prompts]
dataset = "builtin:demo_harmful"
split = "[:8]"
[good_evaluation_prompts]
dataset = "builtin:demo_harmless"
split = "[8:16]"
[bad_evaluation_prompts]
dataset = "builtin:demo_harmful"
split = "[8:16]"
[cluster]
workers = 2
object_store_memory_mb = 100
""")
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "heretic_dist", "run", str(config), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 model loads (0 replacements)" in done.stdout
    pareto = st.RunDir(str(run_dir)).read_parquet(st.PARETO)
    trial = pareto[0]["number"]

    # --out naming an existing file: one line, exit 2, the file untouched (was a NotADirectoryError traceback)
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"keep me")
    done = subprocess.run([sys.executable, "-m", "heretic_dist", "export", str(run_dir), "--trial", str(trial),
                           "--out", str(a_file)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().count("\n") == 0 and "is a file" in done.stderr
    assert a_file.read_bytes() == b"keep me"

    out = tmp_path / "not-yet" / "exported"  # a parent that does not exist yet, as in the README
    done = subprocess.run([sys.executable, "-m", "heretic_dist", "export", str(run_dir), "--trial", str(trial),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # rebuild the same edit in this process and compare with the exported folder, loaded plainly
    manifest = json.loads((run_dir / st.MANIFEST).read_text())
    row = next(r for r in st.RunDir(str(run_dir)).read_parquet(st.TRIALS) if r["number"] == trial)
    engine = Engine(make_settings(model_folder, row_normalization=manifest["settings"]["row_normalization"],
                                  seed=manifest["settings"]["seed"]))
    engine.set_response_prefix(manifest["response_prefix"])
    engine.set_directions(st.load_directions(st.RunDir(str(run_dir)))[0])
    engine.apply(decode_trial_params(row["params"], manifest["n_layers"]))
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    inputs = tokenize(engine.tokenizer, render(engine.tokenizer, GOOD + BAD), "cpu")
    with torch.inference_mode():
        expected, got = engine.model(**inputs).logits, exported(**inputs).logits
        original = AutoModelForCausalLM.from_pretrained(model_folder)(**inputs).logits
    assert (expected - got).abs().max() < 1e-3
    assert (expected - original).abs().max() > 1e-2  # the export is really edited


def test_two_shards_equal_one_on_smollm2():
    """Invariant 5 on a real chat model, through two Ray workers."""
    from test_gguf import smollm2_gguf

    from heretic_dist.config import PromptSetSpec
    from heretic_dist.prompts import load_prompt_set

    good = load_prompt_set(PromptSetSpec(dataset="builtin:demo_harmless", split="[:12]"), "You are a helpful assistant.")
    bad = load_prompt_set(PromptSetSpec(dataset="builtin:demo_harmful", split="[:12]"), "You are a helpful assistant.")
    quiet_ray_env()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    try:
        settings = make_settings(smollm2_gguf(), max_response_length=16, batch_size=8, refusal_markers=["sorry", "i can", "harm"])
        pool = WorkerPool(ENGINE, settings, n_workers=2, cpus_per_worker=1.0)
        parts = [pool.map("residual_sums", prompts) for prompts in (good, bad)]
        (gs, gn), (bs, bn) = [(sum(p[0] for p in ps), sum(p[1] for p in ps)) for ps in parts]
        pool.set_directions(directions_from_sums(torch.as_tensor(gs), gn, torch.as_tensor(bs), bn, True))
        pool.set_eval_prompts(good, bad)
        raw = {"direction_scope": "global", "direction_index": 17.0}
        for c in ("attn.o_proj", "mlp.down_proj"):
            raw |= {f"{c}.max_weight": 1.2, f"{c}.max_weight_position": 22.0, f"{c}.min_weight": 0.5,
                    f"{c}.min_weight_distance": 10.0}
        params = decode_trial_params(raw, 30).to_dict()
        one = reduce_partials(pool.run_sharded("run_trial", [(params, Shard(0, 1))]).results)
        two = reduce_partials(pool.run_sharded("run_trial", [(params, Shard(i, 2)) for i in range(2)]).results)
        assert two["refusals"] == one["refusals"] and two["bad_scored"] == one["bad_scored"] == len(bad)
        assert two["kl"] == pytest.approx(one["kl"], rel=1e-5)
        assert one["kl"] > 1e-3
        assert len(set(two["worker_ids"])) == 2  # really two workers
        pool.shutdown()
    finally:
        ray.shutdown()
