"""Search space, reducer, objectives, and whole searches on Ray Tune with the FakeEngine."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter

import optuna
import pytest
import torch

from heretic_dist.distributed.tune import SearchSpec, TrialSetup, evaluate_trial, run_search
from heretic_dist.engine.types import PartialResult
from heretic_dist.search.objectives import objective_values, reduce_partials
from heretic_dist.search.space import suggest_params
from heretic_dist.search.study import open_study
from ray_cluster import embedded_ray, finishing_tells

FAKE = "fake"
N_LAYERS = 8  # FakeEngine default


# -- pure parts (no Ray) ----------------------------------------------------------------------------


def test_objective_values_upstream_rules():
    # KL at or above the target: KL / scale
    assert objective_values(5, 0.5, 10, 2.0, 0.01) == (0.5, 0.25)
    assert objective_values(5, 0.01, 10, 1.0, 0.01) == (0.5, 0.01)
    # KL below the target: s_ref * target / scale
    assert objective_values(5, 0.001, 10, 1.0, 0.01) == pytest.approx((0.5, 0.005))
    assert objective_values(4, 0.0, 8, 2.0, 0.1) == pytest.approx((0.5, 0.025))
    # a base model that refuses nothing: raw refusals
    assert objective_values(3, 0.2, 0, 1.0, 0.01) == (3.0, 0.2)
    assert objective_values(0, 0.0, 0, 1.0, 0.01) == (0.0, 0.0)
    for bad in (math.nan, math.inf, None):
        with pytest.raises(ValueError, match="non-finite"):
            objective_values(1, bad, 10, 1.0, 0.01)
    with pytest.raises(ValueError, match="non-finite"):
        objective_values(math.nan, 0.1, 10, 1.0, 0.01)


def test_search_space_names_order_and_ranges():
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    for _ in range(30):
        trial = study.ask()
        values = suggest_params(trial, n_layers=11)
        assert list(trial.params) == [
            "direction_scope", "direction_index",
            "attn.o_proj.max_weight", "attn.o_proj.max_weight_position",
            "attn.o_proj.min_weight", "attn.o_proj.min_weight_distance",
            "mlp.down_proj.max_weight", "mlp.down_proj.max_weight_position",
            "mlp.down_proj.min_weight", "mlp.down_proj.min_weight_distance",
        ]
        assert values == trial.params
        d = trial.distributions
        assert d["direction_scope"].choices == ("global", "per layer")
        assert (d["direction_index"].low, d["direction_index"].high) == (4.0, 9.0)
        assert (d["attn.o_proj.max_weight"].low, d["attn.o_proj.max_weight"].high) == (0.8, 1.5)
        assert (d["mlp.down_proj.max_weight"].low, d["mlp.down_proj.max_weight"].high) == (0.8, 1.5)
        assert (d["attn.o_proj.max_weight_position"].low, d["attn.o_proj.max_weight_position"].high) == (6.0, 10.0)
        assert (d["attn.o_proj.min_weight"].low, d["attn.o_proj.min_weight"].high) == (0.0, 1.0)
        assert (d["attn.o_proj.min_weight_distance"].low, d["attn.o_proj.min_weight_distance"].high) == (1.0, 6.0)
        study.tell(trial, [0.0, 0.0])
    trial = study.ask()
    suggest_params(trial, n_layers=11, allow_mlp_off=True, components=["mlp.down_proj"])
    assert [k for k in trial.params if k.startswith("attn")] == []
    assert trial.distributions["mlp.down_proj.max_weight"].low == -0.25


def test_reduce_partials():
    parts = [
        PartialResult(3, 10, 0.5, 10, {"kl_s": 1.0, "generation_s": 4.0}, "w0", "a"),
        PartialResult(2, 10, 1.5, 30, {"kl_s": 2.0, "generation_s": 3.0}, "w1", "b"),
    ]
    r = reduce_partials(parts)
    assert (r["refusals"], r["bad_scored"], r["good_scored"]) == (5, 20, 40)
    assert r["kl"] == pytest.approx(2.0 / 40)
    assert r["timings_max"] == {"generation_s": 4.0, "kl_s": 2.0}
    assert len(r["timings"]) == 2 and r["worker_ids"] == ["w0", "w1"] and r["hosts"] == ["a", "b"]


# -- on Ray -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    with embedded_ray() as ray:
        yield ray


def make_pool(settings: dict | None = None):
    from heretic_dist.distributed.pool import WorkerPool

    pool = WorkerPool(FAKE, settings or {}, n_workers=2, cpus_per_worker=1.0)
    pool.set_directions(torch.randn(N_LAYERS + 2, 16))
    return pool


def search(pool, tmp_path, n_trials, shards=1, n_startup=5, **kw):
    spec = SearchSpec(n_trials=n_trials, n_startup_trials=n_startup, seed=7, workers=2, shards=shards,
                      max_attempts=3, lease_timeout_s=120)
    return run_search(pool, spec, tmp_path / "study.journal", "study", base_refusals=20, n_layers=N_LAYERS,
                      components=None, tune_dir=str(tmp_path / "tune"), **kw)


def test_sharding_gives_the_same_result(ray_cluster):
    pool = make_pool()
    try:
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(1))
        for _ in range(4):
            raw = suggest_params(study.ask(), N_LAYERS)
            results = []
            for k in (1, 2):
                setup = TrialSetup(pool.name, pool.namespace, N_LAYERS, base_refusals=20, shards=k)
                results.append(evaluate_trial(raw, setup, pool))
            one, two = results
            assert not one["trial_failed"] and not two["trial_failed"]
            assert one["refusals"] == two["refusals"]
            assert two["kl"] == pytest.approx(one["kl"], rel=1e-12, abs=1e-15)
            assert sorted(json.loads(two["heretic_record"])["worker_ids"]) == ["w0", "w1"]
        assert pool.loads_total() == 2
    finally:
        pool.shutdown()


def test_search_loads_once_per_worker_and_records_trials(ray_cluster, tmp_path):
    pool = make_pool()
    try:
        summary = search(pool, tmp_path, n_trials=20)
        assert summary.complete == 20 and summary.failed == 0
        study = open_study(tmp_path / "study.journal", "study")
        trials = study.get_trials()
        assert len(trials) == 20
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        t = trials[-1]
        for key in ("refusals", "kl", "worker_ids", "hosts", "timings", "timings_max", "attempts", "params",
                    "direction_index", "parameters", "trial_seconds"):
            assert key in t.user_attrs, key
        assert t.values[0] == pytest.approx(t.user_attrs["refusals"] / 20)
        assert set(finishing_tells(tmp_path / "study.journal").values()) == {1}
        # model loads: one per worker, none per trial
        assert pool.loads_total() == 2 and pool.replacements == 0
        assert sum(h["trials_run"] for h in pool.health()) == 20
    finally:
        pool.shutdown()


def test_killed_workers_are_retried_inside_the_trial(ray_cluster, tmp_path):
    pool = make_pool({"fake_trial_seconds": 0.4})
    stop = threading.Event()
    kills = []

    def killer():
        time.sleep(1.0)
        while not stop.is_set() and len(kills) < 3:
            stats = pool.stats()
            handles = ray_cluster.get(pool.broker.handles.remote())
            busy = [w for w in stats["leased"] if w in handles and w not in kills]
            if busy:
                time.sleep(0.1)  # well inside the 0.4 s trial
                ray_cluster.kill(handles[busy[0]])
                kills.append(busy[0])
                time.sleep(1.0)
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        summary = search(pool, tmp_path, n_trials=10, shards=2)
    finally:
        stop.set()
        thread.join()
    try:
        assert len(kills) >= 2
        study = open_study(tmp_path / "study.journal", "study")
        trials = study.get_trials()
        assert [t.number for t in trials] == list(range(10))
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.user_attrs for t in trials]
        assert summary.complete == 10 and summary.failed == 0
        assert set(finishing_tells(tmp_path / "study.journal").values()) == {1}
        retried = [t for t in trials if t.user_attrs["attempts"] > 1]
        assert len(retried) >= 1
        assert sum(len(t.user_attrs["worker_losses"]) for t in trials) >= len(kills) - 1
        stats = pool.stats()
        assert stats["replacements"] == len(kills)
        assert pool.loads_total() == 2 + stats["replacements"]
    finally:
        pool.shutdown()


def test_non_finite_metric_fails_the_trial_explicitly(ray_cluster, tmp_path):
    pool = make_pool({"fake_nonfinite": True})
    try:
        summary = search(pool, tmp_path, n_trials=2)
        trials = open_study(tmp_path / "study.journal", "study").get_trials()
        # all failed in the first round: no second round (it would fail forever)
        assert len(trials) == 2 and summary.complete == 0 and summary.failed == 2 and summary.rounds == 1
        for t in trials:
            assert t.state == optuna.trial.TrialState.FAIL
            assert "non-finite kl" in t.user_attrs["fail_reason"]
        assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        assert set(finishing_tells(tmp_path / "study.journal").values()) == {1}
    finally:
        pool.shutdown()


def test_resume_fails_running_leftovers_and_completes_n_trials(ray_cluster, tmp_path):
    # a driver that was killed: two COMPLETE trials and one left RUNNING
    study = open_study(tmp_path / "study.journal", "study")
    for i in range(3):
        trial = study.ask()
        suggest_params(trial, N_LAYERS)
        if i < 2:
            study.tell(trial, [1.0, 0.1 * i])
    pool = make_pool()
    try:
        summary = search(pool, tmp_path, n_trials=4)
        assert summary.resume["interrupted"] == [2] and summary.resume["complete"] == 2
        trials = open_study(tmp_path / "study.journal", "study").get_trials()
        states = Counter(t.state for t in trials)
        assert states[optuna.trial.TrialState.COMPLETE] == 4
        assert states[optuna.trial.TrialState.FAIL] == 1
        assert states[optuna.trial.TrialState.RUNNING] == 0
        assert trials[2].user_attrs["fail_reason"].startswith("interrupted")
        rerun = [t for t in trials if t.user_attrs.get("rerun_of") == 2]
        assert len(rerun) == 1 and rerun[0].params == trials[2].params
        assert rerun[0].state == optuna.trial.TrialState.COMPLETE
    finally:
        pool.shutdown()
