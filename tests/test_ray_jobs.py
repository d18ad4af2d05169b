"""`heretic-dist run` as a Ray job: `ray job submit` to a real local cluster's job server (a `ray start
--head` with the dashboard on 127.0.0.1, token authentication on), `ray job stop` with trials in flight,
and the same submission resuming the run directory to exactly n_trials COMPLETE trials."""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path

import optuna
import pytest
from ray_cluster import LocalCluster, missing_dashboard_modules

from heretic_dist import rundir as st
from heretic_dist.search.study import open_study

pytestmark = pytest.mark.slow

CONFIG = """
engine = "fake"
model = "fake-jobs"
n_trials = 5
n_startup_trials = 4
seed = 11
response_prefix = ""
good_prompts = {{ dataset = "builtin:demo_harmless", split = "[:8]" }}
bad_prompts = {{ dataset = "builtin:demo_harmful", split = "[:8]" }}
good_evaluation_prompts = {{ dataset = "builtin:demo_harmless", split = "[8:16]" }}
bad_evaluation_prompts = {{ dataset = "builtin:demo_harmful", split = "[8:16]" }}
[cluster]
workers = 2
cpus_per_worker = 1
[engine_options]
fake_trial_seconds = 0.3
fake_hold_file = "{hold}"
"""


@pytest.fixture(scope="module")
def cluster():
    missing = missing_dashboard_modules()
    if missing:  # the job server is part of Ray's dashboard: `ray[default]`, in the dev extra
        message = f"Ray's job server needs ray[default]; missing: {', '.join(missing)}"
        if os.environ.get("HERETIC_DIST_CI"):  # .ci/run: the dev extra has it, so a skip would hide a break
            pytest.fail(message)
        pytest.skip(message)
    c = LocalCluster()
    # a token of this cluster's own: `ray start --head` with token authentication does not create one
    # (it fails without ~/.ray/auth_token), and a fresh machine may have none yet
    c.env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    try:
        # 4 logical CPUs: the resumed job's workers need not wait for the stopped job's to be gone
        c.start_head(cpus=4, dashboard=True, own_temp_dir=True)
        yield c
    finally:
        c.stop()


def _states(run_dir: Path) -> list[str]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # read every half second
    if not (run_dir / st.MANIFEST).exists():
        return []
    run_id = json.loads((run_dir / st.MANIFEST).read_text())["run_id"]
    return [t.state.name for t in open_study(str(run_dir / st.JOURNAL), run_id).trials]


def test_job_submit_stop_and_resume(tmp_path: Path, cluster: LocalCluster):
    config, run_dir, hold = tmp_path / "run.toml", tmp_path / "run", tmp_path / "hold"
    config.write_text(CONFIG.format(hold=hold))
    hold.touch()  # edited trials wait while it exists: the first job is stopped with both in flight
    # absolute paths: the entrypoint runs in the job supervisor's working directory, not in ours
    entrypoint = ["--", "heretic-dist", "run", str(config), "--address", "auto", "--run-dir", str(run_dir)]
    job = ["--address", cluster.dashboard_url]

    done = cluster.ray("job", "submit", *job, "--submission-id", "hd-first", "--no-wait", *entrypoint)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # a bound, not a wait: on a loaded 2-core machine the job's driver, 2 workers and the base-model
    # pass took over 120 s once
    deadline = time.monotonic() + 240
    while _states(run_dir).count("RUNNING") < 2:
        if time.monotonic() > deadline:
            log = cluster.ray("job", "logs", *job, "hd-first").stdout
            status = cluster.ray("job", "status", *job, "hd-first").stdout
            pytest.fail(f"no trials in flight within 240 s: {status[-500:]}\n{log[-3000:]}")
        time.sleep(0.5)
    stopped = cluster.ray("job", "stop", *job, "hd-first")  # SIGTERM; returns once the job has exited
    assert stopped.returncode == 0 and "'hd-first' was stopped" in stopped.stdout, stopped.stdout[-2000:]
    first_log = cluster.ray("job", "logs", *job, "hd-first").stdout
    assert "base model: 8/8 refusals" in first_log, first_log[-3000:]  # the driver's progress is in the job log
    assert "Traceback" not in first_log, first_log[-3000:]
    assert "COMPLETE" not in _states(run_dir)

    hold.unlink()
    # the same submission resumes; submit follows the job's log and exits 1 if the job fails
    done = cluster.ray("job", "submit", *job, "--submission-id", "hd-second", *entrypoint)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "'hd-second' succeeded" in out, out[-3000:]
    assert "resuming" in out and "directions: loaded from the run directory" in out, out[-3000:]
    assert re.search(r"\[5/5\]", out) and "Pareto front" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    states = _states(run_dir)
    assert states.count("COMPLETE") == 5 and "RUNNING" not in states, states
