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
