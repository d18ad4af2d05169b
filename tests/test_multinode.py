"""A real multi-node Ray cluster on this machine (`ray start` head + one more node, sharing the host's IP):
the run's own processes stay on the driver's node, chosen by node id."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heretic_dist import rundir as st
from heretic_dist.search.study import open_study

pytestmark = pytest.mark.slow

CONFIG = """
engine = "fake"
model = "fake-multinode"
n_trials = 10
n_startup_trials = 6
seed = 5
good_prompts = { dataset = "builtin:demo_harmless", split = "[:10]" }
bad_prompts = { dataset = "builtin:demo_harmful", split = "[:10]" }
good_evaluation_prompts = { dataset = "builtin:demo_harmless", split = "[10:20]" }
bad_evaluation_prompts = { dataset = "builtin:demo_harmful", split = "[10:20]" }
[cluster]
workers = 2
cpus_per_worker = 1
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes(tmp_path: Path):
    """Head (1 CPU) + a second node (2 CPUs), token authentication on (Ray's default for a head it
    starts); stopped by pid (never `ray stop`, which would end every Ray process on the machine)."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_worker_niceness="0")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--include-dashboard=false", "--disable-usage-stats", "--block"]
    procs = [subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port", str(port),
                               *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        _wait_for_nodes(address, env, 1)
        procs.append(subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--address", address,
                                       "--num-cpus", "2", "--disable-usage-stats", "--block"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        nodes = _wait_for_nodes(address, env, 2)
        yield address, env, nodes
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _wait_for_nodes(address: str, env: dict[str, str], n: int, timeout_s: float = 90) -> list[dict]:
    code = (f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(json.dumps([{'id': x['NodeID'], 'cpus': x['Resources'].get('CPU', 0), 'head': "
            "'node:__internal_head__' in x['Resources']} for x in ray.nodes() if x['Alive']]))")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        if done.returncode == 0:
            nodes = json.loads(done.stdout.strip().splitlines()[-1])
            if len(nodes) >= n:
                return nodes
        time.sleep(1)
    raise AssertionError(f"the test cluster did not reach {n} nodes: {done.stderr[-1000:]}")


def test_trial_functions_stay_on_the_drivers_node_when_nodes_share_an_ip(tmp_path: Path, two_nodes):
    address, env, nodes = two_nodes
    (tmp_path / "run.toml").write_text(CONFIG)
    done = subprocess.run([sys.executable, "-m", "heretic_dist", "run", "run.toml", "--run-dir", "run",
                           "--address", address], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run_dir = tmp_path / "run"
    driver_node = json.loads((run_dir / st.RUN_INFO).read_text())["driver_node"]
    assert driver_node in {n["id"] for n in nodes}
    manifest = json.loads((run_dir / st.MANIFEST).read_text())
    trials = open_study(str(run_dir / st.JOURNAL), manifest["run_id"]).trials
    assert len(trials) == 10 and {t.user_attrs["trial_node"] for t in trials} == {driver_node}
    # the model workers used both nodes (the head has room for one): the pool really spans two nodes
    assert len({w for t in trials for w in t.user_attrs["worker_ids"]}) == 2
