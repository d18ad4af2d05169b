"""A worker runs its model load and every engine call on one thread (distributed/engine_thread.py: a
second thread's OpenMP team throttles libgomp's spin-wait, which made a Ray worker's trials ~25% slower
than a plain process's on 2 CPUs), whichever thread Ray calls it from."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from heretic_dist.config import Settings
from heretic_dist.distributed.engine_thread import EngineThread
from heretic_dist.distributed.worker import ModelWorker
from heretic_dist.engine import protocol
from heretic_dist.engine.types import Shard, TrialParams
from heretic_dist.testing.fake import SAMPLE_PARAMS as PARAMS, FakeEngine


class ThreadProbe(FakeEngine):
    """The FakeEngine, noting the thread of its construction and of each call."""

    pass_seconds = 0.0  # each pass's length, so that calls arriving meanwhile queue for one batch

    def __init__(self, settings=None):
        self.calls: list[tuple[str, int]] = [("load", threading.get_ident())]
        super().__init__(settings)

    def set_directions(self, directions: torch.Tensor) -> None:
        self.calls.append(("set_directions", threading.get_ident()))
        super().set_directions(directions)

    def run_trial(self, params: TrialParams | None, shard: Shard):
        self.calls.append(("run_trial", threading.get_ident()))
        time.sleep(self.pass_seconds)
        return super().run_trial(params, shard)

    def run_trials(self, items):
        self.calls.append(("run_trials", threading.get_ident()))
        time.sleep(self.pass_seconds)
        return super().run_trials(items)


@pytest.fixture
def probe_engine(monkeypatch):
    monkeypatch.setitem(protocol.ENGINES, "thread-probe", f"{__name__}:ThreadProbe")
    return "thread-probe"


def in_threads(n: int, fn) -> list:
    """Call fn from n fresh threads at once (as Ray's concurrency-group threads would) and collect results."""
    results: list = [None] * n
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def test_load_and_every_call_share_one_thread_not_the_callers(probe_engine):
    worker = ModelWorker(probe_engine, {"fake_n_layers": 4})
    in_threads(1, lambda: worker.set_directions(torch.zeros(6, 16)))
    in_threads(1, lambda: worker.run_trial(PARAMS, Shard(0, 1)))
    worker.run_trial(PARAMS, Shard(0, 1))  # and from the constructing thread
    calls = worker.engine.calls
    assert [name for name, _ in calls] == ["load", "set_directions", "run_trial", "run_trial"]
    assert {ident for _, ident in calls} == {worker.engine_thread.ident}
    assert worker.engine_thread.ident != threading.get_ident()
    assert worker.health()["trials_run"] == 2


def test_batched_trials_run_on_the_loading_thread(probe_engine, monkeypatch):
    monkeypatch.setattr(ThreadProbe, "pass_seconds", 0.3)
    settings = Settings(model="fake", engine=probe_engine, cluster={"workers": 1, "trials_per_worker": 2})
    worker = ModelWorker(probe_engine, settings)
    worker.set_directions(torch.zeros(10, 16))
    results = in_threads(4, lambda: worker.run_trial(PARAMS, Shard(0, 1)))
    assert all(r.bad_scored == 20 for r in results)
    idents = {ident for _, ident in worker.engine.calls}
    assert idents == {worker.engine_thread.ident}  # the batcher's own thread hands its passes over
    assert any(name == "run_trials" for name, _ in worker.engine.calls)


def test_engine_thread_runs_nested_calls_in_place_and_passes_errors():
    thread = EngineThread()
    try:
        assert thread.run(lambda: thread.run(threading.get_ident)) == thread.ident
        with pytest.raises(ValueError, match="boom"):
            thread.run(lambda: (_ for _ in ()).throw(ValueError("boom")))
        assert thread.run(lambda: 7) == 7  # still serving after an error
    finally:
        thread.close()
