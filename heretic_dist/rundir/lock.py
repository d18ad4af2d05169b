"""RunLock: one driver per run directory (flock locally, an owner file with a heartbeat remotely)."""

from __future__ import annotations

import _thread
import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import tenacity

from heretic_dist.errors import UserError

from .layout import LOCK
from .rundir import RunDir
from .storage_errors import first_line, translated

log = logging.getLogger(__name__)


def interrupt_main_thread(error: UserError) -> None:
    """What a lost lock does by default: stop the main thread as Ctrl-C would; `RunLock.__exit__`
    then raises `error` in place of the KeyboardInterrupt. Inside Ray Tune's fit() Tune's own SIGINT
    handler takes it and ends the Tune run gracefully, so a Tune loop calls `RunLock.check()` after
    each fit() instead of starting another round.

    Where SIGINT is ignored (a background job of a non-interactive shell) nothing else would stop
    the run, so the process prints the line and exits: two drivers on one study are worse.
    """
    if callable(signal.getsignal(signal.SIGINT)):
        _thread.interrupt_main()
        return
    print(f"heretic-dist: error: {error}", file=sys.stderr, flush=True)
    os._exit(2)


class RunLock:
    """One driver per run directory.

    Local run dirs: fcntl.flock on `<run>/.lock`, held while the process lives and released by the
    kernel when it dies (SIGKILL included), so the same command can resume at once. The descriptor
    is close-on-exec (Python's default); a child made by a bare fork() would share the lock.

    Object stores have no such primitive, so the lock there is best-effort: an owner file
    (`.lock`: host, pid, time, token) refreshed every `heartbeat_s` by a daemon thread. A second
    driver that finds a recent owner file logs a warning (kept in `.warning`) and goes on; a stale
    one (older than `stale_s`) is taken over silently. Two drivers on the same machine are still
    excluded by a flock on the local journal cache folder.

    A failed refresh is retried with backoff. If the owner file could not be renewed for
    `stale_s - heartbeat_s` (one heartbeat before other drivers would take the run over), the lock
    is lost: `lost` holds a one-line UserError, `on_lost(error)` runs (by default
    `interrupt_main_thread`), and `check()` and leaving the `with` block raise that error.
    """

    def __init__(self, run: RunDir, *, heartbeat_s: float = 60.0, stale_s: float = 300.0,
                 on_lost: Callable[[UserError], None] | None = None) -> None:
        if not 0 < heartbeat_s <= stale_s / 2:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be positive and at most half of stale_s ({stale_s})")
        self.run = run
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.warning: str | None = None
        self.lost: UserError | None = None
        self.renewed_at: float | None = None  # the `time` of the last owner file written (what others see)
        self.renew_failures = 0  # failed uploads of the owner file, retries included
        self._on_lost = on_lost or interrupt_main_thread
        self._last_error: BaseException | None = None
        self._fd: int | None = None
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._guard = threading.Lock()  # orders `release` against losing the lock
        self._threads: list[threading.Thread] = []

    def _owner(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "token": self._token,
        }

    # ---- acquiring ------------------------------------------------------------------------------

    def _flock(self, path: Path, where: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                holder = f" (pid {info['pid']} on {info['host']} since {info['since']})"
            os.close(fd)
            raise UserError(
                f"another heretic-dist driver is running on {where}{holder}: wait for it or stop it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._owner()).encode(), 0)
        self._fd = fd

    def acquire(self) -> RunLock:
        if self.run.is_local:
            self.run.ensure()
            with translated("lock", self.run.uri, remote=False):
                self._flock(self.run._local(LOCK), self.run.uri)
            return self
        # Same machine: a real lock on the journal cache folder.
        self._flock(self.run.journal_path().parent / LOCK, self.run.uri)
        try:
            self.warning = self._other_owner()
            if self.warning:
                log.warning(self.warning)
            self._write_owner()
        except BaseException:
            self._release_local()
            raise
        for name, target in (("heretic-dist-lock", self._heartbeat), ("heretic-dist-lock-watch", self._watch)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _other_owner(self) -> str | None:
        """A warning if a recent owner file says another driver holds the run."""
        if not self.run.exists(LOCK):
            return None
        with contextlib.suppress(ValueError, UnicodeDecodeError, FileNotFoundError):
            info = json.loads(self.run.read_bytes(LOCK))
            age = time.time() - float(info.get("time", 0))
            if age < self.stale_s:
                return (
                    f"{self.run.uri} may be in use by another driver (pid {info.get('pid')} on "
                    f"{info.get('host')}, seen {age:.0f} s ago); locks on object stores are "
                    "best-effort, make sure only one driver runs"
                )
        return None

    def _write_owner(self) -> None:
        owner = self._owner()
        self.run.write_bytes(LOCK, json.dumps(owner).encode())
        self.renewed_at = owner["time"]

    # ---- holding: heartbeat and watchdog ----------------------------------------------------------

    def _heartbeat(self) -> None:
        """Rewrite the owner file every heartbeat_s; retry a failed upload with backoff until it
        works, the lock is released, or the watchdog has declared it lost."""
        retrying = tenacity.Retrying(
            stop=lambda _state: self._stop.is_set() or self.lost is not None,
            wait=tenacity.wait_exponential(multiplier=self.heartbeat_s / 8, max=self.heartbeat_s),
            sleep=self._stop.wait,  # release() cuts a backoff short
            after=self._renew_failed,
            reraise=True,
        )
        while not self._stop.wait(self.heartbeat_s):
            try:
                retrying(self._write_owner)
            except Exception:  # released or lost while retrying; the watchdog reports the loss
                return
            self._last_error = None

    def _renew_failed(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        self.renew_failures += 1
        if self._last_error is None:  # the first failure of a streak; the rest are in the debug log
            log.warning("could not renew the run lock on %s (%s); retrying", self.run.uri, first_line(error))
        else:
            log.debug("run lock renewal failed again: %s", first_line(error))
        self._last_error = error

    def _give_up_at(self) -> float:
        assert self.renewed_at is not None
        return self.renewed_at + self.stale_s - self.heartbeat_s

    def _watch(self) -> None:
        """Declare the lock lost one heartbeat before other drivers would take over. A thread of
        its own, because an upload that hangs would keep the heartbeat thread from noticing."""
        while not self._stop.wait(max(0.0, self._give_up_at() - time.time())):
            if time.time() >= self._give_up_at():
                self._lose()
                return

    def _lose(self) -> None:
        assert self.renewed_at is not None
        cause = first_line(self._last_error) if self._last_error is not None else "the upload got no answer"
        error = UserError(
            f"could not renew the run lock on {self.run.uri} for {time.time() - self.renewed_at:.0f} s "
            f"({cause}); the run stopped before another driver could take it over: fix the storage, "
            "then run the same command again to resume"
        )
        with self._guard:  # under the guard: once release() has begun, nothing is interrupted
            if self._stop.is_set() or self.lost is not None:
                return
            self.lost = error
            self._on_lost(error)

    def check(self) -> None:
        """Raise the one-line UserError if the lock was lost (a no-op while it is held)."""
        if self.lost is not None:
            raise UserError(str(self.lost)) from None

    # ---- releasing ------------------------------------------------------------------------------

    def _release_local(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        """Unlock; the lock file stays (deleting a flock file races with the next locker)."""
        if self._threads:
            with self._guard:
                self._stop.set()
            for thread in self._threads:  # a lost lock's heartbeat may hang on the failing store: no wait
                thread.join(timeout=0.1 if self.lost is not None else 5)
            self._threads = []
            if self.lost is None:  # a lost owner file may be someone else's by now, and storage is failing
                with contextlib.suppress(Exception):
                    info = json.loads(self.run.read_bytes(LOCK))
                    if info.get("token") == self._token:
                        self.run.delete(LOCK)
        self._release_local()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        except KeyboardInterrupt:  # the interrupt of a lock lost just as the run ended: finish releasing
            if self.lost is None:
                raise
            self.release()
        self.check()  # a lost lock ends the run with its one line, also in place of the interrupt
