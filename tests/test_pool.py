"""WorkerPool / ModelWorker on a real local Ray cluster with the FakeEngine."""

from __future__ import annotations

import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from heretic_dist.distributed.pool import PoolError, WorkerPool, WorkerStartError  # noqa: E402
from heretic_dist.distributed.worker import ModelWorker  # noqa: E402
from heretic_dist.testing.fake import SAMPLE_PARAMS as PARAMS, FakeEngine  # noqa: E402
from heretic_dist.engine.types import Prompt, Shard  # noqa: E402
from heretic_dist.errors import UserError  # noqa: E402
from ray_cluster import embedded_ray  # noqa: E402

FAKE = "fake"


@pytest.fixture(scope="module")
def ray_cluster():
    with embedded_ray():
        yield


def make_pool(settings: dict | None = None, n: int = 2) -> WorkerPool:
    pool = WorkerPool(FAKE, settings or {}, n_workers=n, cpus_per_worker=1.0)
    pool.set_directions(torch.randn(10, 16, generator=torch.Generator().manual_seed(0)))
    return pool


def test_worker_class_without_ray():
    w = ModelWorker(FAKE, {"fake_n_layers": 4}, worker_id="x")
    h = w.health()
    assert h["loads"] == 1 and h["error"] is None and h["worker_id"] == "x"
    w.set_directions(torch.zeros(6, 16))
    r = w.run_trial(PARAMS, Shard(0, 1))
    assert r.worker_id == "x" and r.bad_scored == 20 and w.health()["trials_run"] == 1
    broken = ModelWorker(FAKE, {"fake_fail_load": True})
    assert "cannot be loaded" in broken.health()["error"] and broken.health()["loads"] == 0
    # the wrapped root cause is part of the one line, not dropped
    assert "caused by OSError: fake weights file is unreadable" in broken.health()["error"]


def test_load_failure_is_a_clear_user_error(ray_cluster):
    t0 = time.monotonic()
    with pytest.raises(WorkerStartError) as exc:
        WorkerPool(FAKE, {"fake_fail_load": True}, n_workers=2, cpus_per_worker=1.0)
    assert isinstance(exc.value, UserError)
    assert "FakeEngine: model cannot be loaded" in str(exc.value)
    assert "caused by OSError: fake weights file is unreadable" in str(exc.value)
    assert "\n" not in str(exc.value)
    assert "Traceback" not in str(exc.value)
    # resources the cluster does not have: an immediate error, not a pending actor forever
    with pytest.raises(WorkerStartError, match="GPU"):
        WorkerPool(FAKE, {}, n_workers=2, cpus_per_worker=1.0, gpus_per_worker=1.0)
    assert time.monotonic() - t0 < 30


def test_map_residual_sums_exact_and_setup(ray_cluster):
    prompts = [Prompt("sys", f"prompt {i}") for i in range(11)]
    local_sum, local_n = FakeEngine({}).residual_sums(prompts)
    with make_pool() as pool:
        parts = pool.map("residual_sums", prompts)
        assert len(parts) == 2
        total = sum(p[0] for p in parts)
        assert sum(p[1] for p in parts) == 11
        assert torch.as_tensor(total).dtype == torch.float64
        torch.testing.assert_close(torch.as_tensor(total), local_sum, rtol=0, atol=1e-12)
        replies = [r for part in pool.map("responses", prompts) for r in part]
        assert replies == [f"Fake reply to: {p.user}" for p in prompts]
        assert pool.info()["n_layers"] == 8
        assert pool.stats()["setup_calls"] == ["set_directions"]


def test_worker_killed_mid_trial_is_replaced_with_same_setup(ray_cluster):
    good = [Prompt("s", f"good {i}") for i in range(16)]
    bad = [Prompt("s", f"bad {i}") for i in range(16)]
    with make_pool({"fake_trial_seconds": 1.0}) as pool:
        pool.set_eval_prompts(good, bad)
        pool.set_response_prefix("Sure")
        args = [(PARAMS, Shard(0, 2)), (PARAMS, Shard(1, 2))]
        reference = pool.run_sharded("run_trial", args)
        assert reference.attempts == [1, 1] and not reference.losses

        def kill_one_busy_worker():
            time.sleep(0.4)
            stats = pool.stats()
            handles = ray.get(pool.broker.handles.remote())
            ray.kill(handles[stats["leased"][0]])

        killer = threading.Thread(target=kill_one_busy_worker)
        killer.start()
        run = pool.run_sharded("run_trial", args)
        killer.join()
        assert sorted(run.attempts) == [1, 2] and len(run.losses) == 1
        # the replacement got the same directions, prefix and eval prompts: identical results
        for a, b in zip(run.results, reference.results):
            assert (a.refusals, a.bad_scored, a.good_scored) == (b.refusals, b.bad_scored, b.good_scored)
            assert a.kl_sum == b.kl_sum
        stats = pool.stats()
        assert stats["replacements"] == 1
        assert stats["loads_total"] == 2 + stats["replacements"] == pool.loads_total()
        assert stats["setup_calls"] == ["set_directions", "set_eval_prompts", "set_response_prefix"]
        health = pool.health()
        assert [h["loads"] for h in health] == [1, 1]
        assert "w2" in {h["worker_id"] for h in health}


def test_health_answers_while_a_trial_runs(ray_cluster):
    with make_pool({"fake_trial_seconds": 1.5}, n=1) as pool:
        with pool.lease(1) as lease:
            ref = lease.workers[0].actor.run_trial.remote(PARAMS, Shard(0, 1))
            time.sleep(0.3)
            t0 = time.monotonic()
            assert pool.health()[0]["trials_run"] == 0
            assert time.monotonic() - t0 < 1.0
            assert ray.get(ref).bad_scored == 20


def test_engine_calls_run_on_one_thread(ray_cluster):
    """Calls alternating between threads made torch's thread pools ~30% slower: one thread for them."""
    import threading

    with make_pool({}, n=1) as pool:
        with pool.lease(1) as lease:
            actor = lease.workers[0].actor
            threads = {ray.get(actor.__ray_call__.remote(lambda self: threading.get_ident())) for _ in range(8)}
            assert len(threads) == 1
            ray.get(actor.run_trial.remote(PARAMS, Shard(0, 1)))


def test_lease_blocks_and_times_out_and_too_many_losses_fail(ray_cluster):
    with make_pool({"fake_trial_seconds": 0.6}) as pool:
        with pool.lease(2):
            with pytest.raises(PoolError, match="no 1 free workers"):
                pool.lease(1, timeout_s=0.5)
        with pytest.raises(PoolError, match="cannot be served"):
            pool.lease(3)
        with pool.lease(1) as lease:
            assert len(lease.workers) == 1

        # every attempt loses its worker: the shard fails after max_attempts tries
        stop = threading.Event()

        def keep_killing():
            while not stop.is_set():
                stats = pool.stats()
                handles = ray.get(pool.broker.handles.remote())
                for w in stats["leased"]:
                    if w in handles:
                        time.sleep(0.1)
                        ray.kill(handles[w])
                time.sleep(0.05)

        killer = threading.Thread(target=keep_killing)
        killer.start()
        try:
            with pytest.raises(PoolError, match="lost its worker 2 times"):
                pool.run_sharded("run_trial", [(PARAMS, Shard(0, 1))], max_attempts=2)
        finally:
            stop.set()
            killer.join()
        # a setup call the engine rejects is an error and is not replayed on replacements
        with pytest.raises(PoolError, match="shape"):
            pool.broadcast_setup("set_directions", torch.zeros(3, 3))
        assert pool.stats()["setup_calls"] == ["set_directions"]


def test_elastic_pool_serves_with_the_workers_it_has(ray_cluster):
    """min_workers=1 of 3 workers on a 2-CPU cluster: the start-up check asks for 1, the pool is ready
    with what loaded, setup broadcasts and leases do not wait for the third worker (pending: no CPU
    for it), a worker that joins after a broadcast has replayed it, and shutdown ends the pending one."""
    with pytest.raises(WorkerStartError, match="cannot hold 3 model workers"):
        WorkerPool(FAKE, {}, n_workers=3, cpus_per_worker=1.0)
    with WorkerPool(FAKE, {}, n_workers=3, cpus_per_worker=1.0, min_workers=1) as pool:
        assert pool.stats()["workers"] >= 1
        pool.set_directions(torch.randn(10, 16, generator=torch.Generator().manual_seed(0)))
        deadline = time.monotonic() + 30
        while pool.stats()["workers"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = pool.stats()
        assert stats["workers"] == 2 and stats["starting"] == 1 and len(stats["pending"]) == 1, stats
        run = pool.run_sharded("run_trial", [(PARAMS, Shard(0, 2)), (PARAMS, Shard(1, 2))])
        assert sorted(run.worker_ids) == sorted(stats["nodes"]) and stats["pending"][0] not in run.worker_ids
        assert len(pool.map("residual_sums", [Prompt("s", f"p {i}") for i in range(5)])) == 2
        assert pool.stats()["setup_calls"] == ["set_directions"] and pool.loads_total() == 2
    deadline = time.monotonic() + 20  # the pending worker did not outlive the pool and take a CPU
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2
