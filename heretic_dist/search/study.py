"""The Optuna study of a run: storage, sampler, resume hygiene, and telling a trial exactly once.

Everything here uses Optuna's public API (JournalStorage over a `BaseJournalBackend`, `Study.ask`,
`Study.tell`); no torch, no Ray.

Journal writes. Optuna writes each suggested parameter and each user attr as its own log line, and
the file backend makes each line one locked, fsynced append: about 11 appends per ask and 20 per tell
here, 5 ms each on this machine's disk, all of it on the Tune controller's thread. `GroupedJournalBackend`
wraps the backend: inside `grouped(storage)`, parameter and user-attr lines written by the calling
thread are held back and appended together with the next other line (the tell's state change) or when
the block ends: 2 appends per ask, 1 per tell. The file holds the same lines in the same order, so
every Optuna reader (and optuna-dashboard) replays it as usual.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from dataclasses import asdict
from typing import Any, Iterable, Iterator

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

REASON_KEY = "fail_reason"  # user attr of a FAIL trial: why it failed, one line
DIRECTIONS = ("minimize", "minimize")  # (refusals score, KL score)

# Op codes of the journal file format (optuna/storages/journal: JournalOperation). They are part of the
# on-disk format that every Optuna version must read back, so they do not change.
_SET_TRIAL_PARAM = 5
_SET_TRIAL_USER_ATTR = 8
_HELD_OPS = frozenset({_SET_TRIAL_PARAM, _SET_TRIAL_USER_ATTR})


class GroupedJournalBackend(BaseJournalBackend):
    """A journal backend that can append the many small lines of one ask or one tell at once."""

    def __init__(self, backend: BaseJournalBackend) -> None:
        self.backend = backend
        self._held: dict[int, list[dict[str, Any]]] = {}  # thread id -> lines held in its group
        self._lock = threading.Lock()

    # Ray Tune pickles its searcher with the Tuner's state: the lock and the held lines stay here
    def __getstate__(self) -> dict[str, Any]:
        return {"backend": self.backend}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["backend"])

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        return self.backend.read_logs(log_number_from)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        held = self._held.get(threading.get_ident())
        if held is None:
            self.backend.append_logs(logs)
            return
        held.extend(logs)
        if any(line.get("op_code") not in _HELD_OPS for line in logs):
            self._flush(held)

    def _flush(self, held: list[dict[str, Any]]) -> None:
        if held:
            lines = list(held)
            held.clear()
            with self._lock:
                self.backend.append_logs(lines)

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        me = threading.get_ident()
        if me in self._held:  # nested: the outer block writes
            yield
            return
        self._held[me] = []
        try:
            yield
        finally:
            self._flush(self._held.pop(me))


class GroupedJournalStorage(JournalStorage):
    """JournalStorage over a GroupedJournalBackend, with `grouped()` to group the lines of one block."""

    def __init__(self, backend: BaseJournalBackend) -> None:
        self.grouping = GroupedJournalBackend(backend)
        super().__init__(self.grouping)

    @contextlib.contextmanager
    def grouped(self) -> Iterator[None]:
        """Group the journal lines this thread writes in the block into as few appends as possible.

        The storage applies the held lines when it next reads the journal; a public read at the end
        does that now, so an error in them (a finished or missing trial) shows here, as unbuffered.
        """
        with self.grouping.group():
            yield
        try:
            self.get_all_studies()
        except (KeyError, optuna.exceptions.UpdateFinishedTrialError) as exc:
            log.warning("journal: grouped lines for a missing or finished trial: %s", exc)


def open_storage(storage: str | os.PathLike[str] | BaseStorage) -> BaseStorage:
    """A GroupedJournalStorage on a local journal file (a storage object passes through)."""
    if isinstance(storage, BaseStorage):
        return storage
    path = os.fspath(storage)
    return GroupedJournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def grouped(storage: BaseStorage) -> contextlib.AbstractContextManager[None]:
    """`storage.grouped()` for a GroupedJournalStorage; a plain block for any other storage."""
    return storage.grouped() if isinstance(storage, GroupedJournalStorage) else contextlib.nullcontext()


def open_study(storage: Any, study_name: str) -> optuna.Study:
    return optuna.create_study(
        storage=open_storage(storage), study_name=study_name, directions=list(DIRECTIONS), load_if_exists=True
    )


def make_sampler(n_startup_trials: int, seed: int | None, n_existing: int = 0,
                 n_ei_candidates: int = 128) -> optuna.samplers.TPESampler:
    """Multivariate TPE with constant liar (pending trials count as poor, so parallel workers spread out).

    On resume the seed is shifted by the number of trials already in the study: the same seed would
    replay the random start-up points that the study already holds.
    """
    return optuna.samplers.TPESampler(
        n_startup_trials=n_startup_trials,
        n_ei_candidates=n_ei_candidates,
        multivariate=True,
        constant_liar=True,
        seed=None if seed is None else int(seed) + n_existing,
    )


def prepare_study(storage: Any, study_name: str, rerun_interrupted: bool = True) -> dict[str, Any]:
    """Resume hygiene: fail RUNNING leftovers of a killed driver; optionally queue their params again.

    Returns {"complete", "failed", "interrupted": [trial numbers], "requeued", "total"}.
    """
    storage = open_storage(storage)
    study = open_study(storage, study_name)
    interrupted, requeued = [], 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        fail_trial(storage, study, t.number, "interrupted: the driver stopped while it ran")
        interrupted.append(t.number)
        if rerun_interrupted and t.params:
            study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number})
            requeued += 1
    trials = study.get_trials(deepcopy=False)
    return {
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "interrupted": interrupted,
        "requeued": requeued,
        "total": len(trials),
    }


def fail_trial(storage: BaseStorage, study: optuna.Study, number: int, reason: str) -> FrozenTrial:
    """Tell trial `number` (asked by any process) as FAIL, its reason stored first as a user attr.

    Only public storage methods: a trial that this process did not ask has no Trial object here.
    """
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    with grouped(storage):
        storage.set_trial_user_attr(trial_id, REASON_KEY, reason)
        return study.tell(number, state=TrialState.FAIL, skip_if_finished=True)


def jsonable(value: Any) -> Any:
    """A JSON round trip of a value (numpy scalars, dataclasses and others become plain JSON)."""
    return json.loads(json.dumps(value, default=_json_default, allow_nan=True))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


def finite_values(values: list[float] | None) -> list[float] | None:
    """The values as floats if all are finite, else None (the trial then fails with a reason)."""
    if values is None:
        return None
    out = [float(v) for v in values]
    return out if all(math.isfinite(v) for v in out) else None
