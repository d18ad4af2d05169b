"""The study through Optuna's public API: grouped journal writes (2 appends per ask, 1 per tell), failing
a trial another process asked, and the Ray Tune Searcher telling every trial exactly once."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from heretic_dist.search.space import SearchSpace, suggest_params
from heretic_dist.search.study import (GroupedJournalStorage, fail_trial, grouped, make_sampler, open_storage,
                                       open_study, prepare_study)

N_LAYERS = 8


class CountingBackend(JournalFileBackend):
    """The file backend, counting appends (each one is a locked, fsynced write)."""

    def __init__(self, path: str):
        super().__init__(path, lock_obj=JournalFileOpenLock(path))
        self.appends = 0

    def append_logs(self, logs):
        self.appends += 1
        super().append_logs(logs)


def plain_study(path, name="s") -> optuna.Study:
    """The same file read by a plain JournalStorage, as optuna-dashboard or another tool would."""
    storage = JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    return optuna.load_study(study_name=name, storage=storage)


def test_grouped_writes_two_appends_per_ask_one_per_tell_and_any_reader_replays_them(tmp_path):
    path = tmp_path / "study.journal"
    backend = CountingBackend(str(path))
    storage = GroupedJournalStorage(backend)
    study = optuna.create_study(storage=storage, study_name="s", directions=["minimize", "minimize"])
    before = backend.appends
    with grouped(storage):
        trial = study.ask()
        params = suggest_params(trial, N_LAYERS)
    assert backend.appends - before == 2  # create the trial; its 10 parameters
    before = backend.appends
    with grouped(storage):
        for i in range(20):
            trial.set_user_attr(f"attr{i}", i)
        study.tell(trial, [0.5, 0.25])
    assert backend.appends - before == 1  # 20 user attrs and the state change together

    # ungrouped, the same ask writes one line per parameter
    before = backend.appends
    suggest_params(study.ask(), N_LAYERS)
    assert backend.appends - before == 11

    (read,) = [t for t in plain_study(path).trials if t.state == TrialState.COMPLETE]
    assert read.params == params and read.values == [0.5, 0.25]
    assert read.user_attrs == {f"attr{i}": i for i in range(20)}


def test_fail_trial_asked_by_another_process_and_prepare_requeues_it(tmp_path):
    path = tmp_path / "study.journal"
    other = open_study(path, "s")  # a driver that was killed mid-trial
    trial = other.ask()
    suggest_params(trial, N_LAYERS)
    summary = prepare_study(path, "s")
    assert summary["interrupted"] == [0] and summary["requeued"] == 1
    trials = plain_study(path).trials
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"].startswith("interrupted")
    assert trials[1].state == TrialState.WAITING and trials[1].user_attrs["rerun_of"] == 0
    # failing a finished trial again changes nothing
    storage = open_storage(path)
    fail_trial(storage, open_study(storage, "s"), 0, "again")
    assert plain_study(path).trials[0].user_attrs["fail_reason"].startswith("interrupted")


def test_searcher_tells_each_trial_once_with_its_record(tmp_path):
    pytest.importorskip("ray")
    from heretic_dist.distributed.tune import RECORD_KEY, StudySearcher

    path = tmp_path / "study.journal"
    open_study(path, "s")
    told = []
    searcher = StudySearcher(path, "s", SearchSpace(N_LAYERS), make_sampler(2, seed=1), on_told=told.append)
    a, b, c = (searcher.suggest(t) for t in ("ta", "tb", "tc"))
    assert set(a) == set(b) == set(suggest_params(optuna.create_study().ask(), N_LAYERS))
    record = json.dumps({"refusals": 3, "kl": 0.1, "worker_ids": ["w0"]})
    searcher.on_trial_complete("ta", {"refusals_score": 0.3, "kl_score": 0.1, RECORD_KEY: record})
    searcher.on_trial_complete("ta", {"refusals_score": 0.3, "kl_score": 0.1, RECORD_KEY: record})  # twice
    searcher.on_trial_complete("tb", None, error=True)
    assert searcher.fail_untold("interrupted in a test") == [2]
    trials = plain_study(path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert trials[0].values == [0.3, 0.1] and trials[0].user_attrs["worker_ids"] == ["w0"]
    assert trials[0].user_attrs["index"] == 1
    assert "Tune trial process failed" in trials[1].user_attrs["fail_reason"]
    assert trials[2].user_attrs["fail_reason"] == "interrupted in a test"
    assert [t.number for t in told] == [0, 1] and searcher.told == {0: "COMPLETE", 1: "FAIL"}


def _result(refusals: float, kl: float) -> dict:
    from heretic_dist.distributed.tune import RECORD_KEY

    return {"refusals_score": refusals, "kl_score": kl, RECORD_KEY: json.dumps({"refusals": refusals})}


def test_presampling_searcher_asks_ahead_within_its_budget_and_tells_each_trial_once(tmp_path):
    pytest.importorskip("ray")
    from heretic_dist.distributed.tune import StudySearcher

    path = tmp_path / "study.journal"
    open_study(path, "s")
    searcher = StudySearcher(path, "s", SearchSpace(N_LAYERS), make_sampler(2, seed=1), budget=4, presample=True)
    first, second = searcher.suggest("t0"), searcher.suggest("t1")
    searcher.settle()  # let the sample ahead be taken first (in a run it races with the tell)
    searcher.on_trial_complete("t0", _result(0.5, 0.1))
    third = searcher.suggest("t2")  # sampled right after t1's suggest, before t0 was told
    searcher.on_trial_complete("t1", _result(0.4, 0.2))
    searcher.on_trial_complete("t2", _result(0.3, 0.3))
    fourth = searcher.suggest("t3")
    searcher.on_trial_complete("t3", _result(0.2, 0.4))
    searcher.settle()
    assert len(plain_study(path).trials) == 4  # the budget is spent: nothing was sampled ahead of a fifth
    assert searcher.fail_untold("round over") == []
    trials = plain_study(path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert [t.params for t in trials] == [first, second, third, fourth]
    assert [searcher.asked[f"t{i}"].number for i in range(4)] == [0, 1, 2, 3]
    assert trials[2].datetime_start < trials[0].datetime_complete  # asked ahead, while t0 ran


def test_presampled_start_up_trials_equal_the_ones_asked_in_turn(tmp_path):
    """Start-up trials are random draws in ask order: sampling ahead must not change them."""
    pytest.importorskip("ray")
    from heretic_dist.distributed.tune import StudySearcher

    samples = {}
    for presample in (False, True):
        path = tmp_path / f"study-{presample}.journal"
        open_study(path, "s")
        searcher = StudySearcher(path, "s", SearchSpace(N_LAYERS), make_sampler(6, seed=3), budget=6,
                                 presample=presample)
        got = [searcher.suggest("a"), searcher.suggest("b")]
        for i in range(4):
            searcher.settle()  # with presample, the next ask is taken ahead of the tell
            searcher.on_trial_complete("a" if i % 2 == 0 else "b", _result(0.1 * i, 0.2))
            got.append(searcher.suggest(f"n{i}"))
        searcher.fail_untold("test over")
        samples[presample] = got
        assert len(plain_study(path).trials) == 6
    assert samples[True] == samples[False]


def test_a_trial_sampled_ahead_but_never_suggested_is_failed_with_the_round(tmp_path):
    pytest.importorskip("ray")
    from heretic_dist.distributed.tune import StudySearcher

    path = tmp_path / "study.journal"
    open_study(path, "s")
    searcher = StudySearcher(path, "s", SearchSpace(N_LAYERS), make_sampler(2, seed=1), budget=5, presample=True)
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", _result(0.5, 0.1))
    searcher.suggest("t1")  # and one more sampled ahead: the run is interrupted before Tune asks for it
    searcher.settle()
    assert searcher.fail_untold("interrupted in a test") == [1, 2]
    trials = plain_study(path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert {t.user_attrs["fail_reason"] for t in trials[1:]} == {"interrupted in a test"}
    assert searcher._writer is None  # the study thread is stopped with the round


def test_the_controller_hands_tells_over_without_waiting_for_them(tmp_path):
    pytest.importorskip("ray")
    import time

    from heretic_dist.distributed.tune import StudySearcher

    path = tmp_path / "study.journal"
    open_study(path, "s")
    told = []
    searcher = StudySearcher(path, "s", SearchSpace(N_LAYERS), make_sampler(2, seed=1),
                             on_told=lambda t: (time.sleep(0.5), told.append(t.number)))
    searcher.suggest("t0")
    started = time.perf_counter()
    searcher.on_trial_complete("t0", _result(0.5, 0.1))
    assert time.perf_counter() - started < 0.25 and told == []  # written on the study thread
    searcher.suggest("t1")  # an ask runs after the tells handed over before it
    assert told == [0] and plain_study(path).trials[0].state == TrialState.COMPLETE
    assert searcher.fail_untold("over") == [1]
