"""A real multi-node Ray cluster on this machine (`ray start` head + worker nodes, the first two sharing
the host's IP, fresh ones on their own loopback addresses): node losses mid-run, fresh nodes joining,
the run's own processes kept on the driver's node."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_cluster import LocalCluster

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
    steps = [("127.0.0.2", lambda: progress["done"] >= 2), ("127.0.0.3", lambda: "w2" in served(tmp_path / "run"))]
    for fresh_ip, ready in steps:
        # kill the newest worker node once `ready` (the second time: once the first replacement, on the
        # first fresh node, has served a trial), then a fresh node joins, on an IP of its own
        deadline = time.monotonic() + 300
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before the node loss: " + "".join(lines)[-2000:]
        cluster.kill_node(len(cluster.procs) - 1)
        time.sleep(2)
        cluster.add_node(node_ip=fresh_ip)
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
    ips = {node["ip"] for node in cluster.nodes()}  # the lost nodes too
    assert {"127.0.0.2", "127.0.0.3"} < ips, ips  # and the host's IP, shared by the first two nodes



# Ray's GCS marks a lost node dead after failed health checks: here 3, one a second (Ray's default: 5,
# one every 3 s, the first after 5 s), so that the node loss below is noticed within seconds (a check
# fails at once when the raylet is gone; a live one only fails it by not answering in time)
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_failure_threshold": "3"}
NO_ROOM = re.compile(r"^worker (w1|w2) lost with its node; its replacement w3 waits for a node with 1 CPU "
                     r"\(the run goes on with 2 workers\)$")
POOL_STATS = """
import json, ray
ray.init(address={address!r}, log_to_driver=False)
found = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("heretic-pool-")]
stats = ray.get(ray.get_actor(found[0]["name"], namespace=found[0]["namespace"]).stats.remote()) if found else {{}}
print("STATS " + json.dumps(stats))
"""


def pool_stats(cluster: LocalCluster) -> dict:
    """The run's WorkerBroker stats (workers loaded, pending, waiting), asked from another driver."""
    done = subprocess.run([sys.executable, "-c", POOL_STATS.format(address=cluster.address)], capture_output=True,
                          text=True, env=cluster.env, timeout=120)
    found = [x for x in done.stdout.splitlines() if x.startswith("STATS ")]
    return json.loads(found[0].removeprefix("STATS ")) if found else {}


def test_elastic_start_then_a_node_loss_with_no_room_left(tmp_path: Path, cluster: LocalCluster):
    """--workers 3 --min-workers 1 on a one-node cluster: trials start and finish before the two other
    nodes exist; the workers that wait for them join once the nodes come and serve trials. Then one of
    those nodes is lost and no node has room for its replacement: the run goes on with the two others,
    says so in one line, and ends with every trial COMPLETE (the replacement still pending). The fake
    engine's hold file keeps trials in flight while the cluster changes, so no step races the run."""
    import threading

    n = 12
    hold = tmp_path / "hold"
    cluster.env.update(FAST_NODE_DEATH)
    cluster.start_head()  # 1 CPU: the driver's node and the one worker trials start with
    config = CONFIG.replace("n_trials = 10", f"n_trials = {n}").replace("workers = 2", "workers = 3")
    (tmp_path / "run.toml").write_text(config + f'[engine_options]\nfake_trial_seconds = 0.5\nfake_hold_file = "{hold}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "heretic_dist", "run", "run.toml", "--run-dir", "run",
                             "--address", cluster.address, "--min-workers", "1"], cwd=tmp_path,
                            env=dict(cluster.env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def wait_until(ready, what: str) -> None:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        assert ready(), f"{what}: not before the run ended; " + "".join(lines)[-3000:]

    try:
        wait_until(lambda: any(re.match(rf"\s*\[2/{n}\]", x) for x in lines), "two trials done on one worker")
        hold.touch()
        t_add = time.time()  # the nodes for the two other workers do not exist yet
        cluster.add_node()
        cluster.add_node()
        wait_until(lambda: pool_stats(cluster).get("workers") == 3, "the two pending workers joined")
        hold.unlink()
        wait_until(lambda: {"w0", "w1", "w2"} <= served(tmp_path / "run"), "all three workers served")
        hold.touch()
        t_kill = time.time()
        cluster.kill_node(len(cluster.procs) - 1)  # its worker (w1 or w2) is lost; no node has room left
        wait_until(lambda: pool_stats(cluster).get("waiting") == ["w3"], "the replacement waits for a node")
        hold.unlink()
        proc.wait(timeout=240)
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    (tmp_path / "run-output.txt").write_text(out)  # for a look after a failure
    assert proc.returncode == 0, out[-3000:]
    trials = _trial_records(tmp_path / "run")
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == n and "FAIL" not in states, out[-3000:]
    assert "Traceback" not in out and "(raylet)" not in out, out[-3000:]
    # elastic start: 1 of 3 workers ready, trials done before the other nodes existed, then all 3 served
    assert "1 of 3 workers ready (2 pending" in out and "; workers 1 ready, 2 pending" in out, out[-3000:]
    assert len([t for t in trials if t.datetime_complete.timestamp() < t_add]) >= 2
    assert {"w0", "w1", "w2"} <= {w for t in trials if t.state.name == "COMPLETE" for w in t.user_attrs["worker_ids"]}
    # the node loss: one plain line; the trials after it ran on the two survivors
    assert len([x for x in lines if NO_ROOM.match(x.strip())]) == 1, out[-3000:]
    after = [t for t in trials if t.datetime_start.timestamp() > t_kill]
    assert after and all("w3" not in t.user_attrs["worker_ids"] for t in after), out[-3000:]
    assert "workers at the end: 2 ready, 1 still pending (w3)" in out, out[-3000:]
    assert "3 model loads (0 replacements)" in out, out[-1500:]
    # what `status` shows: the workers per node and the pending one, as the driver last recorded them
    from heretic_dist.display import workers_line

    pool = json.loads((tmp_path / "run" / st.RUN_INFO).read_text())["pool"]
    assert pool["pending"] == ["w3"] and len(pool["ready"]) == 2 and len(set(pool["ready"].values())) == 2, pool
    assert re.match(r"workers: 2 ready \(node \w+: w\d; node \w+: w\d\), 1 pending \(w3\)", workers_line(pool))
