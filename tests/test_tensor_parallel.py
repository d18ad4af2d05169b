"""Tensor-parallel replicas: T = 2 Ray actors in one placement group, one gloo group, DeepSpeed AutoTP
shards; the same trial results as one process; a lost rank takes the whole replica down and back."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import pytest
import torch
from test_engine import BAD, GOOD, make_settings, raw_params
from tiny_models import tiny_model_folder

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from heretic_dist.distributed.pool import WorkerPool, quiet_ray_env  # noqa: E402
from heretic_dist.engine.ablation import directions_from_sums  # noqa: E402
from heretic_dist.engine.engine import Engine  # noqa: E402
from heretic_dist.engine.types import Prompt, Shard  # noqa: E402
from heretic_dist.search.space import decode_trial_params  # noqa: E402

# Enough prompts that a trial lasts a few seconds (the kill test needs a trial in flight).
LONG_GOOD = [Prompt(p.system, f"{p.user} ({i})") for i in range(4) for p in GOOD]


@pytest.fixture(scope="module")
def cluster():
    quiet_ray_env()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2,
             logging_level="WARNING", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tp-llama"), "llama", layers=4, hidden=32)


def tp_settings(folder, mode: str, **overrides):
    return make_settings(folder, row_normalization=mode, refusal_markers=["read"],
                         cluster={"workers": 1, "tensor_parallel": 2}, **overrides)


def directions(engine_or_pool) -> torch.Tensor:
    if isinstance(engine_or_pool, Engine):
        (gs, gn), (bs, bn) = engine_or_pool.residual_sums(GOOD), engine_or_pool.residual_sums(BAD)
    else:
        (gs, gn), (bs, bn) = [engine_or_pool.map("residual_sums", p)[0] for p in (GOOD, BAD)]
    return directions_from_sums(torch.as_tensor(gs), gn, torch.as_tensor(bs), bn, True)


def trial_params(max_weight: float):
    return decode_trial_params(raw_params(4, max_weight=max_weight, distance=3.0), 4)


@pytest.mark.parametrize("mode", ["none", "pre", "full"])
def test_two_ranks_give_the_one_process_results(cluster, llama, mode):
    settings = tp_settings(llama, mode)
    local = Engine(settings)  # not a rank: no WORLD_SIZE in this process, so the model loads whole
    assert local.tensor_parallel is None
    with WorkerPool("hf", settings, n_workers=1, cpus_per_worker=1.0) as pool:
        (health,) = pool.health()
        assert health["ranks"] == 2 and len(health["peer_pids"]) == 1 and health["loads"] == 1
        assert pool.info()["tensor_parallel"] == 2
        d_pool, d_local = directions(pool), directions(local)
        torch.testing.assert_close(d_pool, d_local, rtol=1e-4, atol=1e-5)  # residuals through the shards
        pool.set_directions(d_local)
        pool.set_eval_prompts(GOOD, BAD)
        local.set_directions(d_local)
        local.set_eval_prompts(GOOD, BAD)
        for max_weight in (0.8, 1.5):
            params = trial_params(max_weight)
            (two,) = pool.run_sharded("run_trial", [(params, Shard())]).results
            one = local.run_trial(params, Shard())
            assert two.refusals == one.refusals
            assert 0 < one.refusals < len(BAD)  # a count that can differ, not all or nothing
            assert two.kl_sum == pytest.approx(one.kl_sum, rel=1e-4)
            assert one.kl_sum > 1e-3  # the edit does something
            # the edit of each shard, not only the scores: the same greedy replies token by token
            local.apply(params)
            assert pool.map("responses", BAD[:3])[0] == local.responses(BAD[:3])
        (two,) = pool.run_sharded("run_trial", [(None, Shard())]).results
        assert two.kl_sum == pytest.approx(0.0, abs=1e-6)  # reset between trials leaves no edit behind


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_lost_rank_mid_trial_in_a_search_replaces_the_whole_replica(cluster, llama, tmp_path):
    """The whole search path (Tune, the searcher, the pool) on a real 2-rank replica: a peer rank killed
    mid-trial (rank 0 in a real gloo collective) costs a retry inside that trial, never a FAILed or
    twice-told trial; the replica comes back whole (both ranks new processes, the old ones gone)."""
    import optuna
    from test_search import finishing_tells

    from heretic_dist.distributed.tune import SearchSpec, run_search
    from heretic_dist.search.study import open_study

    settings = tp_settings(llama, "full", max_response_length=32)
    with WorkerPool("hf", settings, n_workers=1, cpus_per_worker=1.0) as pool:
        pool.set_directions(directions(pool))
        pool.set_eval_prompts(LONG_GOOD, BAD)
        (old,) = pool.health()
        old_pids = {old["pid"], *old["peer_pids"]}

        def killer() -> None:  # once trial 1 runs: mid-trial (a trial takes ~1 s here)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    (health,) = pool.health()
                    if health["trials_run"] >= 1 and pool.stats()["leased"]:
                        time.sleep(0.2)
                        os.kill(old["peer_pids"][0], signal.SIGKILL)
                        return
                time.sleep(0.05)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        spec = SearchSpec(n_trials=4, n_startup_trials=4, seed=3, workers=1, shards=1, max_attempts=3,
                          lease_timeout_s=180)
        summary = run_search(pool, spec, tmp_path / "study.journal", "study", base_refusals=len(BAD), n_layers=4,
                             components=None, tune_dir=str(tmp_path / "tune"))
        thread.join(timeout=60)
        trials = open_study(tmp_path / "study.journal", "study").get_trials()
        assert summary.complete == 4 and summary.failed == 0
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert set(finishing_tells(tmp_path / "study.journal").values()) == {1}
        (retried,) = [t for t in trials if t.user_attrs["attempts"] > 1]
        stats = pool.stats()
        assert stats["replacements"] == 1 and stats["loads"] == {"w0": 1, "w1": 1}  # one load per replica
        (new,) = pool.health()
        assert new["worker_id"] == "w1" and new["ranks"] == 2
        assert not old_pids & {new["pid"], *new["peer_pids"]}  # both ranks are new processes
        for pid in old_pids:  # and both old ones are gone (rank 0 ended itself, the broker killed the rest)
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _alive(pid), f"process {pid} of the lost replica is still running"
        # the retried trial's scores are what the replacement gives for its parameters
        (again,) = pool.run_sharded("run_trial", [(retried.user_attrs["params"], Shard())]).results
        assert again.refusals == retried.user_attrs["refusals"]
        assert again.kl_sum / again.good_scored == pytest.approx(retried.user_attrs["kl"], rel=1e-6)


@pytest.mark.slow
def test_run_with_one_two_rank_replica_on_smollm2(tmp_path):
    """`heretic-dist run` with tensor_parallel = 2 on a real chat model, on this 2-core machine."""
    import json
    import subprocess

    from test_gguf import smollm2_gguf

    from heretic_dist import rundir as st

    config = tmp_path / "tp.toml"
    config.write_text(f"""
model = "{smollm2_gguf()}"
dtypes = ["float32"]
max_response_length = 4
batch_size = 8
n_trials = 2
n_startup_trials = 2
seed = 5
response_prefix = ""
refusal_markers = ["sorry", "i can", "harm"]
good_prompts = {{ dataset = "builtin:demo_harmless", split = "[:4]" }}
bad_prompts = {{ dataset = "builtin:demo_harmful", split = "[:4]" }}
good_evaluation_prompts = {{ dataset = "builtin:demo_harmless", split = "[4:8]" }}
bad_evaluation_prompts = {{ dataset = "builtin:demo_harmful", split = "[4:8]" }}
[cluster]
workers = 1
tensor_parallel = 2
object_store_memory_mb = 100
""")
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "heretic_dist", "run", str(config), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 workers x 2 tensor-parallel ranks x 1.0 CPU" in done.stdout
    assert "1 model loads (0 replacements)" in done.stdout, done.stdout[-2000:]
    trials = st.RunDir(str(run_dir)).read_parquet(st.TRIALS)
    assert len(trials) == 2 and all(t["state"] == "COMPLETE" for t in trials)
    assert json.loads((run_dir / "run_info.json").read_text())["tensor_parallel"] == 2


PLACEMENT_PROBE = """
import json, ray
from heretic_dist.config import Settings
from heretic_dist.distributed.pool import WorkerPool
ray.init(address=ADDRESS, log_to_driver=False)
settings = Settings(model="fake-tp", engine="fake", cluster={"workers": 2, "tensor_parallel": 2, "gpus_per_worker": 1})
with WorkerPool("fake", settings, n_workers=2, cpus_per_worker=1.0, gpus_per_worker=1.0) as pool:
    replicas = ray.get(pool.broker.rank_handles.remote())
    out = {w: [{"node": h["node_id"], "gpus": i["gpu_ids"]}
               for h, i in zip(ray.get([r.health.remote() for r in ranks]), ray.get([r.info.remote() for r in ranks]))]
           for w, ranks in replicas.items()}
print("PLACEMENT " + json.dumps(out))
from heretic_dist.distributed.pool import WorkerStartError
three = settings.model_copy(update={"cluster": settings.cluster.model_copy(update={"tensor_parallel": 3})})
try:
    WorkerPool("fake", three, n_workers=1, cpus_per_worker=0.5, gpus_per_worker=1.0)
except WorkerStartError as exc:  # 3 GPUs in the cluster's total, but no node has 3
    print("REFUSED " + str(exc))
"""


@pytest.mark.slow
def test_both_ranks_of_a_replica_are_placed_on_one_node():
    """Two nodes of 2 CPUs and 2 fake GPUs: a 2-rank replica (1 GPU per rank) fits each node only whole.
    STRICT_PACK puts each replica's ranks on one node, each rank on its own GPU."""
    import json
    import subprocess

    from ray_cluster import LocalCluster

    nodes = LocalCluster()
    try:
        nodes.start_head(cpus=2, gpus=2)
        nodes.add_node(cpus=2, gpus=2)
        code = PLACEMENT_PROBE.replace("ADDRESS", repr(nodes.address))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=nodes.env, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        (line,) = [x for x in done.stdout.splitlines() if x.startswith("PLACEMENT ")]
        placement = json.loads(line.removeprefix("PLACEMENT "))
        (refused,) = [x for x in done.stdout.splitlines() if x.startswith("REFUSED ")]
    finally:
        nodes.stop()
    assert sorted(placement) == ["w0", "w1"]
    replica_nodes = []
    for ranks in placement.values():
        assert len(ranks) == 2
        assert ranks[0]["node"] == ranks[1]["node"]  # one node per replica
        assert len(ranks[0]["gpus"]) == len(ranks[1]["gpus"]) == 1 and ranks[0]["gpus"] != ranks[1]["gpus"]
        replica_nodes.append(ranks[0]["node"])
    assert len(set(replica_nodes)) == 2  # and the two replicas on the two nodes
    assert "no node of the cluster holds one replica of 3 ranks x (0.5 CPU, 1 GPU): the largest holds 2" in refused


def test_a_replica_waiting_for_room_gives_its_placement_group_back_at_shutdown(cluster):
    """2 CPUs, replicas of 2 ranks x 1 CPU, 2 workers, min_workers 1: the second replica's placement
    group waits for a node with room. Shutting the pool down ends that wait and removes the group (it
    used to wait on forever, a placement group request left behind in the cluster)."""
    from ray.util import placement_group_table

    from heretic_dist.config import Settings

    settings = Settings(model="fake-tp", engine="fake", cluster={"workers": 2, "tensor_parallel": 2})
    pool = WorkerPool("fake", settings, n_workers=2, cpus_per_worker=1.0, min_workers=1)

    def states() -> list[str]:
        return sorted(t["state"] for t in placement_group_table().values() if t["state"] != "REMOVED")

    try:
        stats = pool.stats()
        assert stats["workers"] == 1 and stats["pending"] == ["w1"], stats
        assert states() == ["CREATED", "PENDING"]  # the second replica's group waits for room
    finally:
        pool.shutdown()
    deadline = time.monotonic() + 20
    while states() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert states() == []
