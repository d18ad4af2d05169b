"""Run directory: atomic writes, round-trips (local and a real S3 server), journal sync, records, lock."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port, start_moto_server

from heretic_dist import rundir as st
from heretic_dist.errors import UserError
from heretic_dist.rundir import (
    RunDir,
    RunLock,
    load_directions,
    manifest_diff,
    manifest_hash,
    read_manifest,
    read_run_info,
    save_directions,
    write_run_info,
)
from heretic_dist.rundir import rundir as rundir_module
from heretic_dist.rundir.storage_errors import storage_error

REPO = Path(__file__).resolve().parents[1]
S3_TEST_SECRET = "dummy-secret-Zq8vK3nT"  # the value the s3_server fixture puts in the env



@pytest.fixture(params=["local", "s3"])
def run(request: pytest.FixtureRequest, tmp_path: Path) -> RunDir:
    if request.param == "local":
        r = RunDir(str(tmp_path / "run"))
    else:
        bucket = request.getfixturevalue("s3_bucket")
        r = RunDir(f"s3://{bucket}/runs/one")
    r.check_access(write=True)
    return r


# ---- basics --------------------------------------------------------------------------------------


def test_uri_forms(tmp_path: Path) -> None:
    a = RunDir(str(tmp_path / "x"))
    b = RunDir(f"file://{tmp_path}/x/")
    assert a.is_local and b.is_local and a.local_path == b.local_path == tmp_path / "x"
    assert a.uri == b.uri


def test_bytes_json_exists_delete(run: RunDir) -> None:
    assert not run.exists("manifest.json")
    run.write_json("manifest.json", {"b": 1, "a": {"z": [1, 2], "y": "é"}})
    assert run.exists("manifest.json")
    assert run.read_json("manifest.json") == {"b": 1, "a": {"z": [1, 2], "y": "é"}}
    text = run.read_bytes("manifest.json").decode()
    assert text.index('"a"') < text.index('"b"') and '\n  "a"' in text  # sorted, indent 2
    run.write_bytes("tune/sub/x.bin", b"\x00\x01")
    assert run.read_bytes("tune/sub/x.bin") == b"\x00\x01"
    run.delete("manifest.json")
    run.delete("manifest.json")  # idempotent
    assert not run.exists("manifest.json")
    with pytest.raises(FileNotFoundError):
        run.read_bytes("manifest.json")


def test_parquet_round_trip(run: RunDir) -> None:
    rows = [
        {"number": 0, "params": {"direction_index": 3.5, "attn": {"max_weight": 1.2}}, "refusals": 4,
         "kl": 0.25, "worker": "w0", "tags": ["a", "b"]},
        {"number": 1, "params": {"direction_index": None}, "refusals": 2, "kl": 0.5, "worker": "w1",
         "tags": []},
        {"number": 2, "params": None, "refusals": None, "kl": float("inf"), "worker": None, "tags": None,
         "extra": True},
    ]
    run.write_parquet("trials.parquet", rows)
    back = run.read_parquet("trials.parquet")
    expected = [dict(r) for r in rows]
    for r in expected[:2]:
        r["extra"] = None  # union of keys; missing ones come back as None
    assert back == expected
    run.write_parquet("pareto.parquet", [])
    assert run.read_parquet("pareto.parquet") == []


def test_atomic_write_keeps_old_file_on_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(str(tmp_path / "run"))
    run.write_json("manifest.json", {"v": "old"})

    class Crash(BaseException):
        pass

    def crash(src, dst):  # the temp file is complete and fsynced; we die before the rename
        assert Path(src).read_bytes().startswith(b"{")
        raise Crash()

    monkeypatch.setattr(rundir_module.os, "replace", crash)
    with pytest.raises(Crash):
        run.write_json("manifest.json", {"v": "new"})
    monkeypatch.undo()
    assert run.read_json("manifest.json") == {"v": "old"}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["manifest.json"]  # no temp left


# ---- directions ---------------------------------------------------------------------------------


def test_directions_round_trip_and_tamper(run: RunDir) -> None:
    d = torch.randn(5, 16, dtype=torch.float32)
    meta = {"model": "tiny", "layers": "5"}
    h = save_directions(run, d, meta)
    assert len(h) == 64 and run.read_bytes("directions.sha256").decode().split()[0] == h
    t, m, h2 = load_directions(run)
    assert torch.equal(t, d) and m == meta and h2 == h

    data = bytearray(run.read_bytes("directions.safetensors"))
    data[-1] ^= 0xFF
    run.write_bytes("directions.safetensors", bytes(data))
    with pytest.raises(UserError, match=r"directions\.safetensors in .* does not match its sha256") as e:
        load_directions(run)
    assert run.uri in str(e.value)

    run.delete("directions.sha256")
    with pytest.raises(UserError, match="directions.sha256 is missing"):
        load_directions(run)


# ---- manifest -----------------------------------------------------------------------------------


def test_manifest_hash_stable_under_key_order() -> None:
    a = {"model": {"id": "m", "revision": "r"}, "dtype": "bf16", "prompts": {"good": "h1", "bad": "h2"}}
    b = {"prompts": {"bad": "h2", "good": "h1"}, "dtype": "bf16", "model": {"revision": "r", "id": "m"}}
    assert manifest_hash(a) == manifest_hash(b)
    assert len(manifest_hash(a)) == 16 and int(manifest_hash(a), 16) >= 0
    assert manifest_hash(a) != manifest_hash({**a, "dtype": "fp32"})


def test_manifest_diff_names_keys() -> None:
    old = {"model": {"id": "m", "revision": "r"}, "dtype": "bf16", "n": 1, "gone": 1, "lst": [1, 2]}
    new = {"model": {"id": "m", "revision": "r2"}, "dtype": "bf16", "n": 1, "added": {"x": 1}, "lst": [2, 1]}
    assert manifest_diff(old, new) == ["added.x", "gone", "lst", "model.revision"]
    assert manifest_diff(old, old) == []
    assert manifest_diff({"a": {"b": 1}}, {"a": 1}) == ["a", "a.b"]


def test_run_info_and_manifest_readers(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "run"))
    assert read_run_info(run) == {} and read_manifest(run) is None  # a run that has not started
    write_run_info(run, {"n_trials": 12, "hosts": ["a"]})
    assert read_run_info(run) == {"n_trials": 12, "hosts": ["a"]}
    assert (tmp_path / "run" / st.RUN_INFO).is_file() and st.RUN_INFO == "run_info.json"
    run.write_json(st.MANIFEST, {"run_id": "abc"})
    assert read_manifest(run) == {"run_id": "abc"}
    run.write_json(st.RUN_INFO, [1, 2])
    with pytest.raises(UserError, match="run_info.json in .* is not a JSON object"):
        read_run_info(run)


# ---- journal on S3 -------------------------------------------------------------------------------


def test_journal_push_pull_s3(s3_bucket: str, tmp_path: Path) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    uri = f"s3://{s3_bucket}/runs/j"
    a = RunDir(uri, cache_dir=tmp_path / "cache-a")
    a.check_access(write=True)
    assert a.pull_journal() is False
    path = a.journal_path()
    assert path.is_relative_to(tmp_path / "cache-a" / "journals") and path.name == "study.journal"
    path.parent.mkdir(parents=True, exist_ok=True)

    study = optuna.create_study(
        study_name="s", directions=["minimize", "minimize"],
        storage=JournalStorage(JournalFileBackend(str(path))),
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_int("k", 1, 5)), n_trials=4)
    assert a.push_journal() is True
    assert a.push_journal() is False  # unchanged: skipped
    os.utime(path)  # touched, same bytes: hashed, not uploaded
    assert a.push_journal() is False

    b = RunDir(uri, cache_dir=tmp_path / "cache-b")
    assert b.journal_path() != path
    assert b.pull_journal() is True
    loaded = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(b.journal_path()))))
    assert [(t.number, t.params, t.values, t.state) for t in loaded.trials] == [
        (t.number, t.params, t.values, t.state) for t in study.trials
    ]
    assert len(loaded.trials) == 4

    # b continues the study and pushes; a pulls and sees the remote truth (cache overwritten).
    loaded.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_int("k", 1, 5)), n_trials=1)
    assert b.push_journal() is True
    assert a.pull_journal() is True
    again = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    assert len(again.trials) == 5


def test_journal_local_is_the_file(tmp_path: Path) -> None:
    r = RunDir(str(tmp_path / "run"))
    assert r.journal_path() == tmp_path / "run" / "study.journal"
    assert r.push_journal() is False and r.pull_journal() is False


def test_stale_cache_removed_when_remote_has_no_journal(s3_bucket: str, tmp_path: Path) -> None:
    r = RunDir(f"s3://{s3_bucket}/runs/fresh", cache_dir=tmp_path / "c")
    r.journal_path().parent.mkdir(parents=True)
    r.journal_path().write_text("stale\n")
    assert r.pull_journal() is False
    assert not r.journal_path().exists()


def test_cache_dir_from_env(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERETIC_DIST_CACHE", str(tmp_path / "envcache"))
    p = RunDir(f"s3://{s3_bucket}/x").journal_path()
    assert p.is_relative_to(tmp_path / "envcache" / "journals") and p.name == "study.journal"
    assert RunDir(f"s3://{s3_bucket}/x/").journal_path() == p


# ---- errors -------------------------------------------------------------------------------------


def _one_line_no_secret(e: pytest.ExceptionInfo[UserError]) -> str:
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == S3_TEST_SECRET
    msg = str(e.value)
    assert "\n" not in msg and S3_TEST_SECRET not in msg and "testing" not in msg
    return msg


def test_unreachable_endpoint(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    r = RunDir("s3://some-bucket/run")
    with pytest.raises(UserError) as e:
        r.check_access(write=True)
    assert "cannot reach" in _one_line_no_secret(e)
    with pytest.raises(UserError) as e:
        r.write_json("manifest.json", {"a": 1})
    assert "cannot reach" in _one_line_no_secret(e)


def test_missing_bucket(s3_server: str) -> None:
    r = RunDir("s3://no-such-bucket-here/run")
    with pytest.raises(UserError, match="does not exist") as e:
        r.check_access()
    _one_line_no_secret(e)
    with pytest.raises(UserError, match="does not exist") as e:
        r.check_access(write=True)
    with pytest.raises(UserError) as e:
        r.write_bytes("manifest.json", b"{}")
    _one_line_no_secret(e)


def test_unsupported_scheme() -> None:
    with pytest.raises(UserError, match="unsupported run directory scheme 'foo://'"):
        RunDir("foo://bucket/x")


def test_error_messages_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET)
    exc = OSError(f"AWS Error ACCESS_DENIED during PutObject: key {S3_TEST_SECRET}\nmore")
    msg = str(storage_error(exc, "write", "x in s3://b/p", remote=True))
    assert msg.startswith("permission denied to write x in s3://b/p") and S3_TEST_SECRET not in msg
    other = str(storage_error(OSError(f"odd {S3_TEST_SECRET} http://u:pw@h/\nline2"), "read",
                              "s3://b", remote=True))
    assert S3_TEST_SECRET not in other and "pw" not in other and "\n" not in other


# ---- lock ---------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from heretic_dist.rundir import RunDir, RunLock
    with RunLock(RunDir(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(300)
    """
)


def test_lock_excludes_second_holder_and_dies_with_it(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"another heretic-dist driver is running on .*pid {proc.pid}"):
            with RunLock(RunDir(uri)):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        with RunLock(RunDir(uri)):  # released by the kernel: the same command can resume
            with pytest.raises(UserError):
                RunLock(RunDir(uri)).acquire()  # and it excludes others again
        with RunLock(RunDir(uri)):  # released on exit
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_object_store_lock_is_best_effort(s3_bucket: str, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    uri = f"s3://{s3_bucket}/runs/l"
    first = RunLock(RunDir(uri, cache_dir=tmp_path / "a")).acquire()
    try:
        assert first.warning is None and RunDir(uri).exists(".lock")
        # Another machine (another cache): warned, not blocked.
        with RunLock(RunDir(uri, cache_dir=tmp_path / "b")) as second:
            assert second.warning and "best-effort" in second.warning
        # Same machine, same cache: really excluded.
        with pytest.raises(UserError, match="another heretic-dist driver"):
            RunLock(RunDir(uri, cache_dir=tmp_path / "a")).acquire()
    finally:
        first.release()
    with RunLock(RunDir(uri, cache_dir=tmp_path / "a")) as third:
        assert third.warning is None  # owner file removed by the last holder


def test_stale_object_store_lock_is_taken_silently(s3_bucket: str, tmp_path: Path) -> None:
    r = RunDir(f"s3://{s3_bucket}/runs/s", cache_dir=tmp_path / "a")
    r.write_json(".lock", {"host": "gone", "pid": 1, "time": time.time() - 3600, "token": "x"})
    with RunLock(r) as lock:
        assert lock.warning is None


def test_lock_heartbeat_must_fit_in_the_stale_time(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at most half of stale_s"):
        RunLock(RunDir(str(tmp_path / "run")), heartbeat_s=60, stale_s=100)


def _flaky_lock_writes(run: RunDir, monkeypatch: pytest.MonkeyPatch, failures: int) -> dict[str, int]:
    """Make the next `failures` uploads of the owner file fail (everything else goes through)."""
    real, left = run.write_bytes, {"n": failures}

    def write_bytes(name: str, data: bytes) -> None:
        if name == ".lock" and left["n"]:
            left["n"] -= 1
            raise UserError(f"cannot write .lock in {run.uri}: injected failure")
        real(name, data)

    monkeypatch.setattr(run, "write_bytes", write_bytes)
    return left


def test_object_store_lock_retries_a_failed_renewal(s3_bucket: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(f"s3://{s3_bucket}/runs/flaky", cache_dir=tmp_path / "a")
    lost: list[UserError] = []
    with RunLock(run, heartbeat_s=0.2, stale_s=2.0, on_lost=lost.append) as lock:
        left = _flaky_lock_writes(run, monkeypatch, failures=3)
        deadline = time.time() + 10
        while (left["n"] or time.time() - lock.renewed_at > 0.3) and time.time() < deadline:
            time.sleep(0.05)
        assert left["n"] == 0 and lock.renew_failures == 3  # each failure retried, then renewed
        time.sleep(2.0)  # past the time a lost lock would be declared
        assert lock.lost is None and not lost
        lock.check()
        owner = json.loads(RunDir(run.uri).read_bytes(".lock"))
        assert time.time() - owner["time"] < 1.0 and owner["time"] == lock.renewed_at


def test_object_store_lock_lost_calls_back_and_check_raises(s3_bucket: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(f"s3://{s3_bucket}/runs/gone", cache_dir=tmp_path / "a")
    lost: list[UserError] = []
    lock = RunLock(run, heartbeat_s=0.2, stale_s=2.0, on_lost=lost.append).acquire()
    _flaky_lock_writes(run, monkeypatch, failures=10**6)
    written = lock.renewed_at
    deadline = time.time() + 10
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    assert len(lost) == 1 and time.time() < written + 2.0  # declared before the owner file is stale
    assert lock.renew_failures >= 3
    with pytest.raises(UserError, match=rf"could not renew the run lock on {run.uri} .*injected failure") as e:
        lock.check()
    assert "\n" not in str(e.value) and "run the same command again to resume" in str(e.value)
    with pytest.raises(UserError, match="could not renew the run lock"):
        lock.__exit__(None, None, None)  # leaving the `with` block ends the run with the same line
    assert lock._fd is None


@contextlib.contextmanager
def _own_moto_server():
    """A moto_server of this test's own, so that the test can kill it (the shared one stays up)."""
    with tempfile.TemporaryDirectory() as tmp:
        url, proc = start_moto_server(Path(tmp) / "moto.log")
        try:
            yield url, proc
        finally:
            proc.kill()
            proc.wait()


LOSER = textwrap.dedent(
    """
    import json, os, sys, time
    from heretic_dist.errors import UserError
    from heretic_dist.rundir import RunDir, RunLock
    lock = RunLock(RunDir(sys.argv[1]), heartbeat_s=1.0, stale_s=12.0)
    try:
        with lock:
            print("locked", flush=True)
            while True:
                time.sleep(0.05)  # a driver's main loop: only the lost lock stops it
    except UserError as error:
        print(json.dumps({"error": str(error), "failures": lock.renew_failures,
                          "renewed_at": lock.renewed_at, "stopped_at": time.time()}), flush=True)
    os._exit(2)  # as the CLI does after using S3: no interpreter teardown
    """
)


def test_lost_object_store_lock_stops_the_run_before_it_expires(s3_server: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.fs as pafs

    with _own_moto_server() as (url, server):
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        pafs.S3FileSystem(endpoint_override=url.split("://", 1)[1], scheme="http", region="us-east-1",
                          allow_bucket_creation=True).create_dir("lost")
        uri = "s3://lost/runs/one"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-c", LOSER, uri], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, text=True)
        try:
            assert proc.stdout.readline().strip() == "locked"
            locked_at = time.time()
            time.sleep(1.6)  # a renewal goes through
            server.kill()  # the object store is gone while the run holds the lock
            server.wait()
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 2 and "Traceback" not in err, err
    result = json.loads(out.strip().splitlines()[-1])
    msg = result["error"]
    assert "\n" not in msg and S3_TEST_SECRET not in msg
    assert msg.startswith(f"could not renew the run lock on {uri} for ")
    assert "cannot reach the object store" in msg and "run the same command again to resume" in msg
    assert result["renewed_at"] > locked_at + 0.4  # the heartbeat worked before the server went away
    # each upload to a dead endpoint takes 1-2 s (the SDK's own retries), more on a loaded machine (tests
    # run two at a time): stale_s = 12 leaves room for >= 2, which means retried, not given up
    assert result["failures"] >= 2
    assert result["stopped_at"] < result["renewed_at"] + 12.0  # before another driver would take over (stale_s)


def test_reading_parquet_rows_does_not_abort_a_process_that_imported_optuna(tmp_path):
    """Arrow's decode threads + optuna made such processes abort at exit (134) about half the time:
    `status` printed everything, then died. Reading with one thread made it rarer, not gone (pyarrow 26
    still aborts 1-7 processes of 16 after any to_pylist()): the CLI's entry point leaves without
    interpreter teardown once rows were decoded. Six processes that read, then exit the CLI's way:
    all must exit 0."""
    import subprocess
    import sys

    from heretic_dist.rundir.parquet import rows_to_parquet

    # 40 columns: the more columns, the likelier the abort (5 of 6 processes without the fix)
    rows = [{f"c{j}": i * j if j % 3 == 0 else ("s" * j if j % 3 == 1 else {"k": j}) for j in range(40)}
            for i in range(200)]
    (tmp_path / "t.parquet").write_bytes(rows_to_parquet(rows, "t"))
    code = ("import optuna\nfrom heretic_dist.rundir.parquet import parquet_to_rows\n"
            f"rows = parquet_to_rows(open({str(tmp_path / 't.parquet')!r}, 'rb').read())\nassert len(rows) == 200\n"
            "from heretic_dist.__main__ import leave_process\nimport sys\nsys.exit(leave_process(0))\n")
    for _ in range(6):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]


def test_a_read_while_the_object_is_overwritten_is_whole(s3_bucket: str, tmp_path: Path) -> None:
    """pyarrow reads an object as a HEAD then a ranged GET; an overwrite in between used to give the new
    object cut to the old size (the lock's heartbeat vs a reader of .lock: broken JSON, 35 of 300 reads
    here). Every read is now one whole version."""
    import threading

    run = RunDir(f"s3://{s3_bucket}/runs/overwritten", cache_dir=tmp_path / "a")
    run.ensure()
    run.write_bytes(".lock", b'{"time": 0}')
    stop = threading.Event()

    def overwrite() -> None:
        i = 0
        while not stop.is_set():  # versions of different lengths, as the heartbeat's times and hosts give
            run.write_bytes(".lock", json.dumps({"time": time.time(), "pad": "x" * (i % 7)}).encode())
            i += 1
            time.sleep(0.02)

    writer = threading.Thread(target=overwrite)
    writer.start()
    try:
        broken = 0
        for _ in range(300):
            try:
                json.loads(run.read_bytes(".lock"))
            except json.JSONDecodeError:
                broken += 1
    finally:
        stop.set()
        writer.join()
    assert broken == 0
