"""What scripts/bench_scale.py measures inside a run (its child process): the run's processes by kind
(CPU, RSS/PSS/USS), wall and CPU time of the driver's study-thread operations and journal I/O (class-level
wrappers, restored after the run), and the embedded Ray cluster advertising N CPUs."""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import defaultdict

MIB, GIB = 1024**2, 1024**3


# --------------------------------------------------------------------------------------------------
# Processes of the run (in the child): kind, CPU, memory


def classify(proc, driver_pid: int) -> str:
    if proc.pid == driver_pid:
        return "driver"
    cmd = " ".join(proc.cmdline())
    for prefix, kind in (("ray::ModelWorker", "worker"), ("ray::WorkerBroker", "broker"), ("ray::IDLE", "idle"),
                         ("ray::ImplicitFunc", "trial")):
        if cmd.startswith(prefix):
            return kind
    if "default_worker.py" in cmd or "setup_worker.py" in cmd:
        return "starting"  # a Ray worker process before it takes a task or an actor
    return "actor:" + cmd.split()[0][5:].split(".")[0] if cmd.startswith("ray::") else "ray-system"


class ProcessSampler:
    """A thread over the driver's descendants every poll_s: the last CPU seen per pid, pids per kind, and
    memory when the trial processes reach a new high and every mem_every_s. Kept: per kind, the sample
    holding most processes of it; in all, the sample with the largest total PSS."""

    def __init__(self, poll_s: float = 3.0, mem_every_s: float = 30.0):
        import psutil

        self.psutil, self.me = psutil, psutil.Process()
        self.poll_s, self.mem_every_s = poll_s, mem_every_s
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, user + system seconds since start)
        self.base: dict[int, float] = {}
        self.kinds: dict[int, str] = {}
        self.memory: dict = {"all": {"pss_total": 0.0, "n": 0, "by_kind": {}}}
        self.peaks: dict[tuple[int, str], tuple[int, int, int]] = {}  # (pid, kind) -> peak rss, pss, uss
        self.counts: dict[str, int] = {}  # kind -> most processes of it in one sample
        self.max_trials, self.min_available = 0, mem_available()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def _each(self, fn):
        for proc in [self.me] + self.me.children(recursive=True):
            try:
                if self.kinds.get(proc.pid, "starting") in ("idle", "starting"):  # it may become an actor
                    self.kinds[proc.pid] = classify(proc, self.me.pid)
                yield proc, self.kinds[proc.pid], fn(proc)
            except self.psutil.Error:
                continue

    def start(self) -> None:
        self.base = {p.pid: t.user + t.system for p, _, t in self._each(lambda p: p.cpu_times())}
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample_cpu()

    def sample_cpu(self) -> int:
        trials = 0
        for proc, kind, t in self._each(lambda p: p.cpu_times()):
            self.cpu[proc.pid] = (kind, t.user + t.system - self.base.get(proc.pid, 0.0))
            trials += kind == "trial"
        self.min_available = min(self.min_available, mem_available())
        return trials

    def sample_memory(self) -> None:
        per: dict[str, list] = defaultdict(list)
        for proc, kind, m in self._each(lambda p: p.memory_full_info()):
            per[kind].append(m.pss)
            old = self.peaks.get((proc.pid, kind), (0, 0, 0))
            self.peaks[(proc.pid, kind)] = (max(old[0], m.rss), max(old[1], m.pss), max(old[2], m.uss))
        for kind, v in per.items():
            self.counts[kind] = max(self.counts.get(kind, 0), len(v))
        by_kind = {k: sum(v) / MIB for k, v in per.items()}
        if sum(by_kind.values()) > self.memory["all"]["pss_total"]:
            self.memory["all"] = dict(pss_total=sum(by_kind.values()), n=sum(map(len, per.values())), by_kind=by_kind)

    def memory_by_kind(self) -> dict:
        """Per kind: the median over its processes of each one's peak RSS/PSS/USS (MiB), and the most of
        them alive at once; "all": the sample with the largest total PSS."""
        out = dict(self.memory)
        for kind in self.counts:
            peaks = [p for (_, k), p in self.peaks.items() if k == kind]
            out[kind] = dict(n=self.counts[kind], pids=len(peaks), **{
                name: statistics.median(p[i] for p in peaks) / MIB for i, name in enumerate(("rss", "pss", "uss"))})
        return out

    def _loop(self) -> None:
        next_mem = 0.0
        while not self._stop.wait(self.poll_s):
            trials, now = self.sample_cpu(), time.monotonic()
            if trials > self.max_trials:  # sample after the newest ones finished importing
                self.max_trials, next_mem = trials, min(next_mem, now + self.poll_s)
            if now >= next_mem:
                self.sample_memory()
                next_mem = now + self.mem_every_s

    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for kind, seconds in self.cpu.values():
            out[kind] += seconds
        return dict(out)


def mem_available() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


# --------------------------------------------------------------------------------------------------
# Driver-side timers (in the child): class-level wrappers, restored afterwards


class Timers:
    """Wall and thread-CPU seconds per operation; a journal call is charged to the op that encloses it."""

    def __init__(self):
        self.ops: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # n, wall, cpu
        self.local = threading.local()
        self.undo: list = []

    def wrap(self, owner, name: str, op: str, journal: bool = False) -> None:
        orig, timers = getattr(owner, name), self

        def wrapper(*a, **kw):
            outer = getattr(timers.local, "op", None)
            key = f"journal {op} in {outer or 'other'}" if journal else op
            timers.local.op = outer if journal else op
            w, c = time.perf_counter(), time.thread_time()
            try:
                return orig(*a, **kw)
            finally:
                rec = timers.ops[key]
                rec[0], rec[1], rec[2] = rec[0] + 1, rec[1] + time.perf_counter() - w, rec[2] + time.thread_time() - c
                timers.local.op = outer

        setattr(owner, name, wrapper)
        self.undo.append(lambda: setattr(owner, name, orig))

    def restore(self) -> None:
        while self.undo:
            self.undo.pop()()


class TuneActorLog(logging.Handler):
    """Counts Tune's trial-actor decisions in its controller's debug log; passes WARNING and above on."""

    NAME = "ray.tune.execution.tune_controller"
    EVENTS = {"Scheduled new ACTOR": "new trial actors requested", "Reusing ACTOR": "trials on a cached actor",
              "Removing ORIGINAL ACTOR": "requested actors dropped (their trial took a cached actor)"}

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.counts = dict.fromkeys(self.EVENTS.values(), 0)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.msg if isinstance(record.msg, str) else ""
        for prefix, name in self.EVENTS.items():
            self.counts[name] += msg.startswith(prefix)
        if record.levelno >= logging.WARNING:
            logging.getLogger(self.NAME.rsplit(".", 1)[0]).handle(record)

    def attach(self, undo: list) -> None:
        logger = logging.getLogger(self.NAME)
        level, propagate = logger.level, logger.propagate
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(self)
        undo.append(lambda: (logger.removeHandler(self), logger.setLevel(level), setattr(logger, "propagate", propagate)))


def instrument(timers: Timers, marks: dict, samplers: list, tune_log: TuneActorLog) -> None:
    """TPE ask, tell, progress, journal I/O; main-thread and process CPU of the search phase; the sampler."""
    import psutil
    from optuna.storages.journal import JournalFileBackend

    from heretic_dist.distributed import tune as search
    from heretic_dist.distributed.progress import Progress
    from heretic_dist.distributed.searcher import StudySearcher

    timers.wrap(StudySearcher, "_ask", "ask")
    timers.wrap(StudySearcher, "_tell", "tell")
    timers.wrap(Progress, "told", "progress")
    timers.wrap(JournalFileBackend, "append_logs", "append", journal=True)
    timers.wrap(JournalFileBackend, "read_logs", "read", journal=True)
    tune_log.attach(timers.undo)
    orig = search.run_search  # bench_overhead.run_driver wraps this wrapper in turn

    def mark(suffix: str) -> None:
        cpu = psutil.Process().cpu_times()
        marks.update({"t" + suffix: time.perf_counter(), "main" + suffix: time.thread_time(),
                      "proc" + suffix: cpu.user + cpu.system})

    def run_search(*a, **kw):
        samplers.append(ProcessSampler())
        mark("0")
        samplers[0].start()
        try:
            return orig(*a, **kw)
        finally:
            mark("1")
            samplers[0].stop()

    search.run_search = run_search
    timers.undo.append(lambda: setattr(search, "run_search", orig))


def start_ray(n: int):
    """An embedded cluster advertising n CPUs, started as driver.start_ray starts one (same options)."""
    import logging

    from heretic_dist.distributed.driver import import_ray_loopback
    from heretic_dist.distributed.pool import quiet_ray_env

    ray = import_ray_loopback()
    quiet_ray_env()
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=n, include_dashboard=False, object_store_memory=100 * MIB,
             log_to_driver=False, configure_logging=True, logging_level=logging.ERROR)
    return ray
