"""The whole `heretic-dist run` as a user runs it: a real local Ray cluster in a subprocess (listening on
loopback only), the fake engine where the model does not matter; SIGKILL of the driver, resume, changed
settings, more trials."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from ray_cluster import is_loopback, listening_sockets

from heretic_dist import rundir as st
from heretic_dist.search.study import open_storage

pytestmark = pytest.mark.slow

CONFIG = """
model = "fake"
engine = "fake"
n_trials = {n_trials}
n_startup_trials = 4
seed = 7
max_response_length = 8
[good_prompts]
dataset = "builtin:demo_harmless"
split = "[:10]"
[bad_prompts]
dataset = "builtin:demo_harmful"
split = "[:10]"
[good_evaluation_prompts]
dataset = "builtin:demo_harmless"
split = "[10:30]"
[bad_evaluation_prompts]
dataset = "builtin:demo_harmful"
split = "[10:30]"
[cluster]
workers = 2
cpus_per_worker = 1
object_store_memory_mb = 100
"""


def write_config(tmp_path: Path, n_trials: int) -> Path:
    path = tmp_path / "fake.toml"
    path.write_text(CONFIG.format(n_trials=n_trials))
    return path


def cli(config: Path, run_dir: Path | str, *extra: str, trial_seconds: float = 0.0, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.Popen:
    # the fake engine's sleep per trial is one of its engine_options (runtime-only: a resume with
    # another value is the same run)
    timed = config.with_name(f"{config.stem}-{trial_seconds:g}s.toml")
    timed.write_text(config.read_text() + f"\n[engine_options]\nfake_trial_seconds = {trial_seconds}\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "heretic_dist", "run", str(timed), "--run-dir", str(run_dir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True, cwd=cwd)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def study_of(run_dir: Path) -> optuna.Study:
    manifest = json.loads((run_dir / st.MANIFEST).read_text())
    return optuna.load_study(study_name=manifest["run_id"], storage=open_storage(str(run_dir / st.JOURNAL)))


def complete_numbers(run_dir: Path) -> list[int]:
    return [t.number for t in study_of(run_dir).trials if t.state.name == "COMPLETE"]


def file_hashes(run_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.iterdir() if p.is_file()}


def _live_members(pgid: int) -> list[str]:
    """Processes of a process group that are still running (zombies do not count)."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,comm=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.split()[1:2] and not line.split()[1].startswith("Z")]


def test_sigkill_driver_then_same_command_resumes(tmp_path):
    config, run_dir = write_config(tmp_path, 10), tmp_path / "run"
    proc = cli(config, run_dir, trial_seconds=1.0)
    deadline = time.time() + 180
    while time.time() < deadline:  # kill once a few trials are in the study
        if (run_dir / st.JOURNAL).exists() and len(complete_numbers(run_dir)) >= 3:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"no progress: {proc.communicate()[0][-3000:]}")
    listening = listening_sockets(proc.pid)  # checked below, once the driver is gone
    os.kill(proc.pid, signal.SIGKILL)  # the driver process alone, as a crash would
    proc.wait()
    # the embedded cluster (GCS, raylet, workers, agents) listened on loopback only
    assert any(name == "gcs_server" for name, _, _ in listening), listening
    assert all(is_loopback(ip) for _, ip, _ in listening), sorted(listening)
    killed_at = len(complete_numbers(run_dir))
    assert killed_at < 10

    code, out = finish(cli(config, run_dir))
    # Ray's processes share the killed driver's fate (its agents exit within about a minute)
    deadline = time.time() + 90
    while (alive := _live_members(proc.pid)) and time.time() < deadline:
        time.sleep(2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # never leave strays behind, even if the check fails
    assert not alive, f"processes outlived the killed driver: {alive}"
    assert code == 0, out[-3000:]
    assert "directions: loaded from the run directory" in out  # cache hit: not recomputed
    assert "directions: computed" not in out
    study = study_of(run_dir)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 10
    assert "RUNNING" not in states
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    # every failed trial is an interrupted one, failed cleanly with its reason
    assert all("interrupted" in t.user_attrs.get("fail_reason", "") or "not told" in t.user_attrs.get("fail_reason", "")
               for t in study.trials if t.state.name == "FAIL")
    rows = st.RunDir(str(run_dir)).read_parquet(st.TRIALS)
    assert sorted(r["number"] for r in rows) == sorted(numbers)
    # the study opens with plain Optuna, and its best trials are pareto.parquet
    pareto = st.RunDir(str(run_dir)).read_parquet(st.PARETO)
    assert sorted(t.number for t in study.best_trials) == sorted(r["number"] for r in pareto)


def test_changed_setting_is_refused_and_more_trials_are_added(tmp_path):
    config, run_dir = write_config(tmp_path, 4), tmp_path / "run"
    code, out = finish(cli(config, run_dir))
    assert code == 0, out[-3000:]
    assert "[4/4]" in out and "Pareto front" in out
    before = file_hashes(run_dir)

    code, out = finish(cli(config, run_dir, "--set", "max_response_length=9", "--set", "seed=8"))
    assert code == 2
    assert "settings.max_response_length" in out and "settings.seed" in out and "--new-run" in out
    assert "Traceback" not in out
    assert file_hashes(run_dir) == before  # nothing damaged

    code, out = finish(cli(config, run_dir, "--n-trials", "6"))
    assert code == 0, out[-3000:]
    assert len(complete_numbers(run_dir)) == 6
    assert "[6/6]" in out


def test_bad_input_stops_before_ray_with_one_line(tmp_path):
    config = write_config(tmp_path, 4)
    config.write_text(config.read_text().replace('split = "[:10]"', 'split = "[:10"', 1))
    start = time.time()
    code, out = finish(cli(config, tmp_path / "run"))
    assert code == 2 and "Traceback" not in out
    assert out.strip().count("\n") == 0 and "split" in out
    assert not (tmp_path / "run").exists()
    assert time.time() - start < 30


def test_s3_run_dir_survives_a_killed_driver_and_resumes_elsewhere(tmp_path, s3_bucket):
    """The run directory lives on an S3 server; the second driver has another cwd and an empty cache."""
    config, uri = write_config(tmp_path, 8), f"s3://{s3_bucket}/runs/fake"
    first, second = tmp_path / "machine-a", tmp_path / "machine-b"
    first.mkdir(), second.mkdir()
    proc = cli(config, uri, trial_seconds=1.0, cwd=first, env={"HERETIC_DIST_CACHE": str(first / "cache")})
    journal_a = None
    deadline = time.time() + 180
    while time.time() < deadline:
        found = list((first / "cache").glob("journals/*/study.journal"))
        if found and len(re.findall(r'"state":\s*1\b', found[0].read_text())) >= 2:
            journal_a = found[0]
            break
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    out_a = proc.communicate()[0]
    assert journal_a is not None, out_a[-3000:]
    assert "[8/8]" not in out_a  # killed in the middle

    code, out = finish(cli(config, uri, cwd=second, env={"HERETIC_DIST_CACHE": str(second / "cache")}))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, out[-3000:]
    assert "resuming" in out and "directions: loaded from the run directory" in out

    run = st.RunDir(uri, cache_dir=tmp_path / "reader")
    assert run.pull_journal()
    manifest = run.read_json(st.MANIFEST)
    study = optuna.load_study(study_name=manifest["run_id"], storage=open_storage(str(run.journal_path())))
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 8 and "RUNNING" not in states
    assert {r["number"] for r in run.read_parquet(st.TRIALS)} == {t.number for t in study.trials}
    assert not list(second.glob("runs")) and not list(first.glob("runs"))  # nothing written to the cwd


def test_an_engine_error_during_setup_is_one_line_not_a_ray_traceback(tmp_path):
    """The base model's scores run on the workers before any trial: an engine error there was Ray's
    whole RayTaskError traceback in the user's terminal."""
    config = tmp_path / "broken.toml"
    config.write_text(CONFIG.format(n_trials=2) + "\n[engine_options]\nfake_fail_base = true\n")
    done = subprocess.run([sys.executable, "-m", "heretic_dist", "run", str(config), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "a model worker failed: " in done.stderr and "fake_fail_base is set" in done.stderr


def test_a_dead_ray_address_is_one_line_within_30_s(tmp_path):
    """--address where nothing listens: Ray's client retried for minutes, printing its own log lines."""
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on once this is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(tmp_path, 2)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "heretic_dist", "run", str(config), "--run-dir", str(tmp_path / "run"),
                           "--address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 30
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in done.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the cluster answered


def test_the_embedded_cluster_keeps_rays_token_authentication(tmp_path):
    """The CLI used to set RAY_AUTH_MODE=disabled to silence a notice; an embedded cluster now runs with
    Ray's default token authentication (the CLI's own environment, as `heretic-dist run` sets it up)."""
    code = """
import os, ray
from heretic_dist.cli import _quiet_libraries
from heretic_dist.config import ClusterSettings
from heretic_dist.distributed.driver import start_ray
_quiet_libraries()
start_ray(ClusterSettings(object_store_memory_mb=100), 1, 0)
from ray._raylet import AuthenticationMode, get_authentication_mode
print(get_authentication_mode() == AuthenticationMode.TOKEN,
      ray.get(ray.remote(lambda: os.environ.get("RAY_AUTH_MODE")).remote()))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", "token"], done.stdout + done.stderr[-2000:]
    assert "Token authentication" not in done.stdout + done.stderr  # Ray's notice stays quiet
