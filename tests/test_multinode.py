"""A real multi-node Ray cluster on this machine (`ray start` head + worker nodes, the first two sharing
the host's IP, fresh ones on their own loopback addresses): node losses mid-run, fresh nodes joining,
the run's own processes kept on the driver's node."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ray_cluster import FAST_NODE_DEATH, LocalCluster

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


PROGRESS_LINE = re.compile(r"\s*\[(\d+)/\d+\]")


class DriverRun:
    """`heretic-dist run run.toml --run-dir run --address HEAD [extra ...]` in tmp_path against the test
    cluster, its output collected line by line as it comes (a reader thread)."""

    def __init__(self, tmp_path: Path, cluster: LocalCluster, *extra: str):
        self.tmp_path = tmp_path
        self.proc = subprocess.Popen([sys.executable, "-m", "heretic_dist", "run", "run.toml", "--run-dir", "run",
                                      "--address", cluster.address, *extra], cwd=tmp_path,
                                     env=dict(cluster.env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def output(self) -> str:
        return "".join(self.lines)

    def done(self) -> int:
        """Trials done, as the progress lines printed so far say."""
        return max((int(m.group(1)) for x in list(self.lines) if (m := PROGRESS_LINE.match(x))), default=0)

    def wait_until(self, ready, what: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        assert ready(), f"{what}: not in time, or the run ended first; " + self.output()[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def finished(self, n: int) -> tuple[str, list]:
        """The ended run's output and trial records, once it is checked to have ended well: exit 0,
        exactly n trials and all COMPLETE (none failed, none told twice), no traceback or raw Ray log."""
        self.reader.join(timeout=10)
        out = self.output()
        (self.tmp_path / "run-output.txt").write_text(out)  # for a look after a failure
        assert self.proc.returncode == 0, out[-3000:]
        trials = _trial_records(self.tmp_path / "run")
        assert len(trials) == n and all(t.state.name == "COMPLETE" for t in trials), out[-3000:]
        assert "Traceback" not in out and "(raylet)" not in out, out[-3000:]
        return out, trials


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


def test_two_node_losses_with_fresh_nodes_joining_lose_no_trial(tmp_path: Path, cluster: LocalCluster):
    """SIGKILL of a worker node's raylet mid-trial, twice, a fresh node joining after each: every
    trial completes once, each lost worker is replaced, and the fresh nodes serve trials."""
    cluster.start_head()  # 1 CPU: the driver's node, one model worker
    cluster.add_node()  # 1 CPU: the second worker
    hold = tmp_path / "hold"
    config = (CONFIG.replace("n_trials = 10", "n_trials = 28")
              + f'[engine_options]\nfake_trial_seconds = 2.0\nfake_hold_file = "{hold}"\n')
    (tmp_path / "run.toml").write_text(config)
    run = DriverRun(tmp_path, cluster)
    steps = [("127.0.0.2", lambda: run.done() >= 2), ("127.0.0.3", lambda: "w2" in served(tmp_path / "run"))]
    for fresh_ip, ready in steps:
        # kill the newest worker node once `ready` (the second time: once the first replacement, on the
        # first fresh node, has served a trial), then a fresh node joins, on an IP of its own
        deadline = time.monotonic() + 300
        while not ready() and run.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert run.proc.poll() is None, "the run ended before the node loss: " + run.output()[-2000:]
        cluster.kill_node(len(cluster.procs) - 1)
        time.sleep(2)
        hold.touch()  # the trials in flight wait until the replacement has joined, however slow its start
        try:
            cluster.add_node(node_ip=fresh_ip)
            replacement = f"w{2 if fresh_ip.endswith('.2') else 3}"
            deadline = time.monotonic() + 300
            while replacement not in pool_stats(cluster).get("nodes", {}) and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            hold.unlink()
    run.proc.wait(timeout=600)
    out, trials = run.finished(28)
    assert "4 model loads (2 replacements)" in out, out[-1500:]
    workers = {w for t in trials if t.state.name == "COMPLETE" for w in t.user_attrs["worker_ids"]}
    assert {"w2", "w3"} <= workers, workers  # the replacements on the fresh nodes served trials
    # every trial function ran on the driver's node, chosen by node id: the nodes share one IP, so the
    # old `node:<ip>` pin let Tune place them on the worker nodes, and a lost node took them along
    driver_node = json.loads((tmp_path / "run" / st.RUN_INFO).read_text())["driver_node"]
    assert {t.user_attrs["trial_node"] for t in trials} == {driver_node}
    ips = {node["ip"] for node in cluster.nodes()}  # the lost nodes too
    assert {"127.0.0.2", "127.0.0.3"} < ips, ips  # and the host's IP, shared by the first two nodes



NO_ROOM = re.compile(r"^worker (w1|w2) lost with its node; its replacement w3 waits for a node with 1 CPU "
                     r"\(the run goes on with 2 workers\)$")
def test_elastic_start_then_a_node_loss_with_no_room_left(tmp_path: Path, cluster: LocalCluster):
    """--workers 3 --min-workers 1 on a one-node cluster: trials start and finish before the two other
    nodes exist; the workers that wait for them join once the nodes come and serve trials. Then one of
    those nodes is lost and no node has room for its replacement: the run goes on with the two others,
    says so in one line, and ends with every trial COMPLETE (the replacement still pending). The fake
    engine's hold file keeps trials in flight while the cluster changes, so no step races the run."""
    n = 12
    hold = tmp_path / "hold"
    cluster.env.update(FAST_NODE_DEATH)
    cluster.start_head()  # 1 CPU: the driver's node and the one worker trials start with
    config = CONFIG.replace("n_trials = 10", f"n_trials = {n}").replace("workers = 2", "workers = 3")
    (tmp_path / "run.toml").write_text(config + f'[engine_options]\nfake_trial_seconds = 0.5\nfake_hold_file = "{hold}"\n')
    run = DriverRun(tmp_path, cluster, "--min-workers", "1")
    wait_until = run.wait_until
    try:
        wait_until(lambda: any(re.match(rf"\s*\[2/{n}\]", x) for x in run.lines), "two trials done on one worker")
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
        run.proc.wait(timeout=240)
    finally:
        hold.unlink(missing_ok=True)
        run.kill()
    out, trials = run.finished(n)
    # elastic start: 1 of 3 workers ready, trials done before the other nodes existed, then all 3 served
    assert "1 of 3 workers ready (2 pending" in out and "; workers 1 ready, 2 pending" in out, out[-3000:]
    assert len([t for t in trials if t.datetime_complete.timestamp() < t_add]) >= 2
    assert {"w0", "w1", "w2"} <= {w for t in trials if t.state.name == "COMPLETE" for w in t.user_attrs["worker_ids"]}
    # the node loss: one plain line; the trials after it ran on the two survivors
    assert len([x for x in run.lines if NO_ROOM.match(x.strip())]) == 1, out[-3000:]
    after = [t for t in trials if t.datetime_start.timestamp() > t_kill]
    assert after and all("w3" not in t.user_attrs["worker_ids"] for t in after), out[-3000:]
    assert "workers at the end: 2 ready, 1 still pending (w3)" in out, out[-3000:]
    assert "3 model loads (0 replacements)" in out, out[-1500:]
    # what `status` shows: the workers per node and the pending one, as the driver last recorded them
    from heretic_dist.display import workers_line

    pool = json.loads((tmp_path / "run" / st.RUN_INFO).read_text())["pool"]
    assert pool["pending"] == ["w3"] and len(pool["ready"]) == 2 and len(set(pool["ready"].values())) == 2, pool
    assert re.match(r"workers: 2 ready \(node \w+: w\d; node \w+: w\d\), 1 pending \(w3\)", workers_line(pool))


def test_drain_of_a_busy_node_for_preemption_loses_no_trial(tmp_path: Path, cluster: LocalCluster):
    """`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` of the node whose worker is busy: that
    worker gets no new lease, finishes the shard it runs, then leaves (so its node, with nothing left
    on it, ends well before the deadline); its replacement starts on the spare node at once and serves
    the rest of the run. No trial is lost, failed or run twice."""
    n = 12
    hold = tmp_path / "hold"
    cluster.start_head()  # 1 CPU: the driver's node, worker w0
    cluster.add_node(node_ip="127.0.0.2")  # 1 CPU: worker w1, the node that will be drained
    config = CONFIG.replace("n_trials = 10", f"n_trials = {n}")
    (tmp_path / "run.toml").write_text(config + f'[engine_options]\nfake_trial_seconds = 0.5\nfake_hold_file = "{hold}"\n')
    run = DriverRun(tmp_path, cluster)
    wait_until = run.wait_until
    try:
        wait_until(lambda: {"w0", "w1"} <= served(tmp_path / "run"), "both workers served a trial")
        hold.touch()  # from here the trials in flight wait: w1 is busy when its node is drained
        cluster.add_node(node_ip="127.0.0.3")  # the spare node, where the replacement goes
        drained_node = next(x["id"] for x in cluster.nodes() if x["ip"] == "127.0.0.2" and x["alive"])
        t_drain = time.time()
        cluster.drain_node(drained_node, deadline_s=120)
        wait_until(lambda: any("is being drained: worker w1 leaves once its shard is done" in x for x in run.lines),
                   "the drain was noticed")
        # the replacement loads on the spare node while w1 still runs its shard
        wait_until(lambda: "w2" in pool_stats(cluster).get("nodes", {}), "the replacement joined")
        hold.unlink()
        # w1 finishes its shard and ends; with nothing left on it, Ray ends the node long before the deadline
        wait_until(lambda: not any(x["alive"] for x in cluster.nodes() if x["id"] == drained_node),
                   "the drained node ended", timeout_s=90)
        t_gone = time.time()
        run.proc.wait(timeout=240)
    finally:
        hold.unlink(missing_ok=True)
        run.kill()
    out, trials = run.finished(n)
    assert t_gone - t_drain < 90  # the node went away because its worker left, not at the deadline
    assert "3 model loads (1 replacements)" in out, out[-1500:]
    # no trial that started after the drain was seen ran on w1; its replacement w2 served trials
    noticed = t_drain + 2 * 2.0 + 1  # two polls of the broker (nodes.DRAIN_POLL_S) and a margin
    late = [t for t in trials if t.datetime_start.timestamp() > noticed]
    assert late and all("w1" not in t.user_attrs["worker_ids"] for t in late), out[-3000:]
    assert "w2" in {w for t in trials for w in t.user_attrs["worker_ids"]}
    assert "waits for a node" not in out, out[-3000:]  # the spare node had room for it
    assert "w2" in json.loads((tmp_path / "run" / st.RUN_INFO).read_text())["pool"]["ready"]


IDLE_POOL = """
import json, sys, time, ray
ray.init(address={address!r}, log_to_driver=False)
from heretic_dist.distributed.pool import WorkerPool
with WorkerPool("fake", {{}}, n_workers=2, cpus_per_worker=1.0) as pool:
    print("NODES " + json.dumps(pool.stats()["nodes"]), flush=True)
    deadline = time.time() + 150
    while time.time() < deadline:
        stats = pool.stats()
        if stats["drained"] and len(stats["nodes"]) == 2:
            break
        time.sleep(0.2)
    print("STATS " + json.dumps(stats), flush=True)
"""


def test_an_idle_worker_on_a_drained_node_leaves_at_once(cluster: LocalCluster):
    """No lease out: the drained node's worker leaves within a poll of the broker, its replacement
    joins on the spare node, and the drained node, left with nothing on it, ends by itself."""
    cluster.start_head()
    cluster.add_node(node_ip="127.0.0.2")
    proc = subprocess.Popen([sys.executable, "-c", IDLE_POOL.format(address=cluster.address)], env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = json.loads(proc.stdout.readline().removeprefix("NODES "))
        by_ip = {x["id"]: x["ip"] for x in cluster.nodes()}
        (on_drained,) = [w for w, node in first.items() if by_ip[node] == "127.0.0.2"]
        cluster.add_node(node_ip="127.0.0.3")
        t_drain = time.monotonic()
        cluster.drain_node(first[on_drained], deadline_s=300)
        stats = json.loads(proc.stdout.readline().removeprefix("STATS "))
        t_left = time.monotonic()
        while time.monotonic() - t_left < 60 and any(x["alive"] for x in cluster.nodes() if x["id"] == first[on_drained]):
            time.sleep(1)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [d["worker_id"] for d in stats["drained"]] == [on_drained], stats
    (replacement,) = set(stats["nodes"]) - set(first)
    by_ip = {x["id"]: x["ip"] for x in cluster.nodes()}
    assert by_ip[stats["nodes"][replacement]] == "127.0.0.3" and stats["replacements"] == 1, stats
    assert t_left - t_drain < 60, t_left - t_drain  # a poll (2 s) and a model load, not the 300 s deadline
    assert not [x for x in cluster.nodes() if x["id"] == first[on_drained] and x["alive"]]  # the node ended


def test_a_real_model_run_survives_a_node_loss(tmp_path: Path, cluster: LocalCluster):
    """SmolLM2 (the real engine) on two nodes: the worker node's raylet is killed mid-run and a fresh
    node joins; every trial completes once, the lost worker is replaced, and no trial failed."""
    from test_gguf import smollm2_gguf

    n = 6
    cluster.env.update(FAST_NODE_DEATH)
    cluster.start_head()
    cluster.add_node()
    (tmp_path / "run.toml").write_text(f"""
model = "{smollm2_gguf()}"
dtypes = ["float32"]
max_response_length = 4
batch_size = 8
n_trials = {n}
n_startup_trials = {n}
seed = 5
response_prefix = ""
refusal_markers = ["sorry", "i can", "harm"]
good_prompts = {{ dataset = "builtin:demo_harmless", split = "[:4]" }}
bad_prompts = {{ dataset = "builtin:demo_harmful", split = "[:4]" }}
good_evaluation_prompts = {{ dataset = "builtin:demo_harmless", split = "[4:12]" }}
bad_evaluation_prompts = {{ dataset = "builtin:demo_harmful", split = "[4:12]" }}
[cluster]
workers = 2
cpus_per_worker = 1
""")
    run = DriverRun(tmp_path, cluster)
    try:
        run.wait_until(lambda: run.done() >= 1, "the first trial done", timeout_s=400)
        cluster.kill_node(1)  # the worker node, with its worker's trial in flight (trials take seconds)
        time.sleep(2)
        cluster.add_node(node_ip="127.0.0.2")
        run.proc.wait(timeout=600)
    finally:
        run.kill()
    out, trials = run.finished(n)
    # w1 was lost: on the shard it ran then, or on the next one it was leased (a dead actor fails the
    # call at once); that shard ran again on another worker inside the same trial
    losses = [loss for t in trials for loss in t.user_attrs.get("worker_losses", [])]
    assert [loss["worker_id"] for loss in losses] == ["w1"], losses
    retried = [t for t in trials if t.user_attrs.get("attempts", 1) == 2]
    assert len(retried) == 1 and "w1" not in retried[0].user_attrs["worker_ids"], out[-2000:]
    # its replacement w2 was started: ready, or still loading when the run ended (the fresh node's
    # model load can take longer than the trials left)
    pool = json.loads((tmp_path / "run" / st.RUN_INFO).read_text())["pool"]
    assert "w2" in pool["ready"] or pool["pending"] == ["w2"], pool
