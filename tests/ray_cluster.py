"""A real multi-node Ray cluster on this machine for tests: a `ray start --head` node and worker nodes,
each a `ray start --block` process group, token authentication on. Stopped by pid, never with `ray stop`
(which would end every Ray process on the machine, other people's included)."""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

# what `ray[default]` adds to `ray[tune]` and the dashboard (and so the job server) cannot start without
DASHBOARD_MODULES = ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "prometheus_client", "colorful")


# Ray's GCS marks a lost node dead after failed health checks: with these 3, one a second (Ray's
# default: 5, one every 3 s, the first after 5 s), so that a node loss is noticed within seconds (a
# check fails at once when the raylet is gone; a live one only fails it by not answering in time)
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_failure_threshold": "3"}


@contextlib.contextmanager
def embedded_ray(object_store_mb: int = 200) -> Iterator[Any]:
    """One 2-CPU local Ray for a test module (no dashboard, quiet); shut down at the end."""
    import ray

    from heretic_dist.distributed.pool import quiet_ray_env

    quiet_ray_env()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=object_store_mb * 1024**2,
             logging_level="WARNING", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def finishing_tells(journal: str | Path) -> Counter:
    """How many times each trial was moved to a finished state, read from the Optuna journal itself."""
    told: Counter = Counter()
    for line in open(journal):
        op = json.loads(line)
        if op["op_code"] == 6 and op["state"] in (1, 3, 4):  # SET_TRIAL_STATE_VALUES: COMPLETE/PRUNED/FAIL
            told[op["trial_id"]] += 1
    return told


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_sockets(pid: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket that process and its descendants listen on."""
    import psutil

    root = psutil.Process(pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            found |= {(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def missing_dashboard_modules() -> list[str]:
    return [name for name in DASHBOARD_MODULES if not _importable(name)]


def _importable(name: str) -> bool:
    """Whether `import name` would find the module, without importing it. A module already imported
    counts as found without asking importlib: `colorful` (imported by ray's CLI logger whenever it is
    installed) replaces its own sys.modules entry with an object whose __spec__ is None, and
    importlib.util.find_spec then raises ValueError ("colorful.__spec__ is None") instead of answering."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class LocalCluster:
    """Real Ray nodes on this machine. Extra nodes share the host's IP unless `add_node(node_ip=...)`
    gives one its own loopback address (127.0.0.2, ...: Ray turns only 127.0.0.1 into the host IP)."""

    def __init__(self) -> None:
        # the interpreter's folder first: a job's entrypoint (`heretic-dist run ...`) runs in the
        # environment of the node's processes
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_worker_niceness="0", PATH=path)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = ""
        self.agent_port = 0  # the head's dashboard agent (HTTP): the job server hands jobs to it
        self.temp_dir = ""
        self.procs: list[subprocess.Popen] = []
        self.killed = 0

    def _start(self, *args: str) -> None:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--disable-usage-stats", "--block"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        self.wait_for_nodes(len(self.procs) - self.killed)

    def start_head(self, cpus: int = 1, gpus: int = 0, dashboard: bool = False, own_temp_dir: bool = False) -> None:
        """dashboard=True: the dashboard and its job server on 127.0.0.1 (`ray job submit` target).
        own_temp_dir=True: Ray's files in a folder of this cluster's own. A job's driver joins the cluster
        that the head's temp dir names as the machine's latest (Ray's job supervisor sets RAY_ADDRESS
        from its ray_current_cluster file): in the shared /tmp/ray, another `ray start` on this machine
        after ours would take the job's driver to that other cluster."""
        args = ["--head", "--port", str(self.port), "--num-cpus", str(cpus), "--num-gpus", str(gpus),
                "--object-store-memory", str(150 * 1024**2)]
        if own_temp_dir:  # short: Ray's unix socket paths live under it
            self.temp_dir = tempfile.mkdtemp(prefix="hdray-", dir="/tmp")
            args.append(f"--temp-dir={self.temp_dir}")
        if dashboard:
            port, self.agent_port = free_port(), free_port()
            self.dashboard_url = f"http://127.0.0.1:{port}"
            # the agent's own port: Ray's default (52365) is one per machine, and any other Ray node here
            # (another test's, another user's) holding it leaves this head's agent without HTTP, so that
            # every `ray job submit` fails with "No available agent to submit job"
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}",
                     f"--dashboard-agent-listen-port={self.agent_port}"]
        else:
            args.append("--include-dashboard=false")
        self._start(*args)
        if dashboard:
            self.wait_for_dashboard()

    def add_node(self, cpus: int = 1, gpus: int = 0, node_ip: str | None = None) -> None:
        extra = ["--node-ip-address", node_ip] if node_ip else []
        self._start("--address", self.address, "--num-cpus", str(cpus), "--num-gpus", str(gpus),
                    "--object-store-memory", str(100 * 1024**2), *extra)

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
                "print('NODES ' + json.dumps([{'id': x['NodeID'], 'alive': x['Alive'], 'cpus': x['Resources'].get('CPU', 0), "
                "'ip': x['NodeManagerAddress']} for x in ray.nodes()]))")
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

    def wait_for_dashboard(self, timeout_s: float = 60) -> None:
        """Until the dashboard answers HTTP (any status: with token authentication on, a request without
        the token is refused, which still says that the server is up), then until the head's dashboard
        agent listens."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                opener.open(self.dashboard_url + "/api/version", timeout=2).read()
                return
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"the dashboard at {self.dashboard_url} did not answer")
        # the job server hands a submission to the head's agent, which starts after the dashboard; a
        # submission while it is not listening yet waits 10 s and fails
        while time.monotonic() < deadline:
            if any(port == self.agent_port for _, _, port in listening_sockets(self.procs[0].pid)):
                return
            time.sleep(0.5)
        raise AssertionError(f"the head's dashboard agent did not listen on port {self.agent_port}")

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """The `ray` CLI (`ray job submit ...`) with this cluster's environment."""
        return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout)

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
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def drain_node(self, node_id: str, deadline_s: int) -> None:
        """`ray drain-node` for a spot preemption: what KubeRay and Ray's autoscaler send before a node
        goes away (the node is not killed by it; Ray ends it once nothing runs on it)."""
        done = self.ray("drain-node", "--address", self.address, "--node-id", node_id, "--reason",
                        "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot preemption (test)",
                        "--deadline-remaining-seconds", str(deadline_s), timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
