"""A real multi-node Ray cluster on this machine (`ray start` head + worker nodes, all sharing the host's
IP): node losses mid-run, fresh nodes joining, the run's own processes kept on the driver's node."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
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


class LocalCluster:
    """Real Ray nodes on this machine, each a `ray start --block` process group; token authentication
    on (Ray's default for a head it starts). Stopped by pid, never with `ray stop` (which would end
    every Ray process on the machine)."""

    def __init__(self) -> None:
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_worker_niceness="0")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.killed = 0

    def _start(self, *args: str) -> None:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--disable-usage-stats", "--block"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        self.wait_for_nodes(len(self.procs) - self.killed)

    def start_head(self, cpus: int = 1, gpus: int = 0) -> None:
        self._start("--head", "--port", str(self.port), "--num-cpus", str(cpus), "--num-gpus", str(gpus),
                    "--include-dashboard=false")

    def add_node(self, cpus: int = 1, gpus: int = 0) -> None:
        self._start("--address", self.address, "--num-cpus", str(cpus), "--num-gpus", str(gpus))

    def kill_node(self, index: int) -> None:
        """SIGKILL of that node's raylet: what a vanished spot instance looks like to the cluster."""
        import psutil

        raylets = [c for c in psutil.Process(self.procs[index].pid).children(recursive=True) if "raylet" in c.name()]
        assert raylets, f"node {index} has no raylet"
        for raylet in raylets:
            raylet.kill()
        self.killed += 1

    def nodes(self) -> list[dict]:
        code = (f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False); "
                "print('NODES ' + json.dumps([{'id': x['NodeID'], 'alive': x['Alive'], 'cpus': x['Resources'].get('CPU', 0)} "
                "for x in ray.nodes()]))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=120)
        assert done.returncode == 0, done.stderr[-1000:]
        (line,) = [x for x in done.stdout.splitlines() if x.startswith("NODES ")]
        return json.loads(line.removeprefix("NODES "))

    def wait_for_nodes(self, n: int, timeout_s: float = 90) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(AssertionError, ValueError, subprocess.TimeoutExpired):
                alive = [x for x in self.nodes() if x["alive"]]
                if len(alive) >= n:
                    return alive
            time.sleep(1)
        raise AssertionError(f"the test cluster did not reach {n} live nodes")

    def stop(self) -> None:
        # a killed head leaves Ray's "current cluster" file behind, and every later ray.init() without
        # an address would try to join that dead cluster
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{self.port}"):
                current.unlink()
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # a throwaway test cluster: no graceful stop needed
        for proc in self.procs:
            proc.wait(timeout=60)


@pytest.fixture
def cluster():
    c = LocalCluster()
    try:
        yield c
    finally:
        c.stop()


def served(run_dir: Path) -> set[str]:
    """Worker ids that have served a finished trial so far (read from the live study journal)."""
    with contextlib.suppress(Exception):
        return {w for t in _trial_records(run_dir) if t.state.name == "COMPLETE" for w in t.user_attrs["worker_ids"]}
    return set()


def _trial_records(run_dir: Path) -> list:
    manifest = json.loads((run_dir / st.MANIFEST).read_text())
    return open_study(str(run_dir / st.JOURNAL), manifest["run_id"]).trials


def test_two_node_losses_with_fresh_nodes_joining_lose_no_trial(tmp_path: Path, cluster: LocalCluster):
    """SIGKILL of a worker node's raylet mid-trial, twice, a fresh node joining after each: every
    trial completes once, each lost worker is replaced, and the fresh nodes serve trials."""
    import threading

    cluster.start_head()  # 1 CPU: the driver's node, one model worker
    cluster.add_node()  # 1 CPU: the second worker
    config = CONFIG.replace("n_trials = 10", "n_trials = 28") + "[engine_options]\nfake_trial_seconds = 2.0\n"
    (tmp_path / "run.toml").write_text(config)
    proc = subprocess.Popen([sys.executable, "-m", "heretic_dist", "run", "run.toml", "--run-dir", "run",
                             "--address", cluster.address], cwd=tmp_path, env=dict(cluster.env, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = {"done": 0}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            found = re.match(r"\s*\[(\d+)/28\]", line)
            if found:
                progress["done"] = int(found.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for ready in (lambda: progress["done"] >= 2, lambda: "w2" in served(tmp_path / "run")):
        # kill the newest worker node once `ready` (the second time: once the first replacement, on the
        # first fresh node, has served a trial), then a fresh node joins
        deadline = time.monotonic() + 300
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before the node loss: " + "".join(lines)[-2000:]
        cluster.kill_node(len(cluster.procs) - 1)
        time.sleep(2)
        cluster.add_node()
    proc.wait(timeout=600)
    reader.join(timeout=10)
    out = "".join(lines)
    (tmp_path / "run-output.txt").write_text(out)  # for a look after a failure
    assert proc.returncode == 0, out[-3000:]
    trials = _trial_records(tmp_path / "run")
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 28 and "FAIL" not in states, out[-3000:]
    assert "Traceback" not in out and "(raylet)" not in out, out[-3000:]
    assert "4 model loads (2 replacements)" in out, out[-1500:]
    workers = {w for t in trials if t.state.name == "COMPLETE" for w in t.user_attrs["worker_ids"]}
    assert {"w2", "w3"} <= workers, workers  # the replacements on the fresh nodes served trials
    # every trial function ran on the driver's node, chosen by node id: the nodes share one IP, so the
    # old `node:<ip>` pin let Tune place them on the worker nodes, and a lost node took them along
    driver_node = json.loads((tmp_path / "run" / st.RUN_INFO).read_text())["driver_node"]
    assert {t.user_attrs["trial_node"] for t in trials} == {driver_node}
