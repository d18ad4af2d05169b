"""Tensor-parallel replicas: T = 2 Ray actors in one placement group, one gloo group, DeepSpeed AutoTP
shards; the same trial results as one process; a lost rank takes the whole replica down and back."""

from __future__ import annotations

import os
import signal
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
    return make_settings(folder, row_normalization=mode, refusal_markers=["e"],
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
            assert two.kl_sum == pytest.approx(one.kl_sum, rel=1e-4)
            assert one.kl_sum > 1e-3  # the edit does something
            # the edit of each shard, not only the scores: the same greedy replies token by token
            local.apply(params)
            assert pool.map("responses", BAD[:3])[0] == local.responses(BAD[:3])
        (two,) = pool.run_sharded("run_trial", [(None, Shard())]).results
        assert two.kl_sum == pytest.approx(0.0, abs=1e-6)  # reset between trials leaves no edit behind


def _kill_peer_mid_trial(pool: WorkerPool, started: threading.Event, delay_s: float) -> None:
    started.wait(60)
    time.sleep(delay_s)
    (health,) = pool.health()
    os.kill(health["peer_pids"][0], signal.SIGKILL)


def test_lost_rank_mid_trial_replaces_the_whole_replica(cluster, llama):
    settings = tp_settings(llama, "full", max_response_length=48)
    with WorkerPool("hf", settings, n_workers=1, cpus_per_worker=1.0) as pool:
        pool.set_directions(directions(pool))
        pool.set_eval_prompts(LONG_GOOD, BAD)
        params = trial_params(1.2)
        t0 = time.monotonic()
        reference = pool.run_sharded("run_trial", [(params, Shard())])
        trial_s = time.monotonic() - t0
        (old,) = pool.health()
        old_pids = {old["pid"], *old["peer_pids"]}

        started = threading.Event()
        killer = threading.Thread(target=_kill_peer_mid_trial, args=(pool, started, min(1.0, trial_s / 3)))
        killer.start()
        started.set()
        run = pool.run_sharded("run_trial", [(params, Shard())], lease_timeout_s=180)
        killer.join()
        assert run.attempts == [2] and len(run.losses) == 1
        assert run.worker_ids == ["w1"]  # served by the replacement replica
        (a,), (b,) = run.results, reference.results
        assert (a.refusals, a.bad_scored, a.good_scored) == (b.refusals, b.bad_scored, b.good_scored)
        assert a.kl_sum == pytest.approx(b.kl_sum, rel=1e-6)
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


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

