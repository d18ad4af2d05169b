"""Running a batch: one Ray cluster, one `python -m heretic_dist --child PID run ...` process per model.

Each child's workers are Ray actors with their own CPU/GPU reservations, so up to `--parallel-models`
children share the cluster without sharing workers. A child that fails marks its model failed and the
batch goes on; Ctrl-C or SIGTERM stops the children so that their studies resume on the next run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Callable

from .. import rundir as st
from ..config import ClusterSettings
from ..errors import UserError
from .plan import (STATE, STATUSES, ModelSpec, Say, check_fit, load_manifest, new_state, now, plan, read_state,
                   run_uri)
from .status import SUMMARY, best_summary_point, drops_filesystems, model_summary, write_summary

BATCH_LOG = "batch.log"
EXIT_FAILED = 1  # some model is not done (failed); user errors exit 2 through the CLI
INTERRUPT_GRACE_SECONDS = 60  # for children to leave their studies resumable after SIGINT


@dataclass
class BatchOptions:
    manifest: str
    batch_dir: str | None = None
    parallel_models: int = 1
    address: str | None = None
    retry_failed: bool = False
    say: Callable[[str], None] = print


@dataclass
class _Child:
    entry: dict[str, Any]
    proc: subprocess.Popen
    log_path: Path
    log_offset: int  # where this attempt's output starts in the model's log
    t0: float
    logf: IO[bytes] | None = field(repr=False, default=None)


class _Out:
    """Lines to stdout and, once the batch dir is locked, to batch.log (timestamped)."""

    def __init__(self, say: Say):
        self.say = say
        self.path: Path | None = None
        self.pending: list[str] = []

    def __call__(self, line: str) -> None:
        self.say(line)
        stamped = f"{now()} {line}\n"
        if self.path is None:
            self.pending.append(stamped)
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(stamped)

    def attach(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(self.pending)
        self.pending = []


def _cluster_for(models: list[ModelSpec], address: str | None) -> ClusterSettings:
    """The one cluster's settings: --address, else the manifest's; the largest object store asked for."""
    clusters = [m.settings.cluster for m in models]
    first = clusters[0]
    return first.model_copy(update={
        "address": address or next((c.address for c in clusters if c.address), None),
        "object_store_memory_mb": max(c.object_store_memory_mb for c in clusters),
        "dashboard": any(c.dashboard for c in clusters),
    })


def _sized(spec: ModelSpec) -> ModelSpec:
    """gpus_per_worker = "auto" resolved on the cluster, for the fit check (each child sizes its own)."""
    from ..distributed.sizing import resolve_cluster

    try:
        return replace(spec, settings=resolve_cluster(spec.settings)[0])
    except UserError as error:
        raise UserError(f"models entry '{spec.name}': {error}") from None


@drops_filesystems
def run_batch(options: BatchOptions) -> int:
    """Run (or resume) a batch. Returns 0 when every model of the manifest is done, 1 otherwise."""
    from ..distributed.driver import start_ray

    if options.parallel_models < 1:
        raise UserError(f"--parallel-models must be at least 1, got {options.parallel_models}")
    manifest = load_manifest(options.manifest)
    batch = st.RunDir(options.batch_dir or str(Path("batches") / Path(options.manifest).stem))
    batch.check_access(write=False)  # missing bucket, no credentials, a file: one line, nothing written
    old = read_state(batch)
    if old is None and batch.exists(st.MANIFEST):
        raise UserError(f"{batch.uri} is a run directory, not a batch directory: choose another --batch-dir")
    out = _Out(options.say)
    if old is not None and old.get("manifest_sha256") != manifest.sha256:
        out(f"note: {manifest.path} changed since this batch last ran")
    models, todo = plan(batch, manifest, old, options.retry_failed, out)

    if batch.is_local and batch.local_path is not None and batch.local_path.is_dir():
        with st.RunLock(batch):  # another batch driver on it: say so now, before starting a cluster
            pass
    specs = {m.name: m for m in manifest.models}
    started_ray = start_ray(_cluster_for(manifest.models, options.address), 0, 0) if todo else False
    try:
        address = None
        if todo:  # nothing to run: no cluster
            import ray

            resources = ray.cluster_resources()
            check_fit([_sized(specs[e["name"]]) for e in todo], options.parallel_models, resources.get("CPU", 0.0),
                      resources.get("GPU", 0.0))
            address = ray.get_runtime_context().gcs_address
        batch.check_access(write=True)
        with st.RunLock(batch):
            local = _local_folder(batch)
            out.attach(local / BATCH_LOG)
            state = new_state(manifest, old, models)
            for spec in manifest.models:  # the record of what runs (a done model keeps what it ran)
                entry = next(e for e in models if e["name"] == spec.name)
                if entry["status"] != "done" or not batch.exists(entry["config"]):
                    batch.write_bytes(entry["config"], spec.toml.encode())
            runner = _Runner(batch, local, state, out, address, options.parallel_models)
            runner.save()
            out(f"batch {batch.uri}: {len(models)} models, {len(todo)} to run"
                + (f", {options.parallel_models} at a time; Ray at {address} "
                   f"({'started here' if started_ray else 'joined'})" if todo else ""))
            runner.run(todo)
            if not todo:
                runner.write_summary()
            return _closing_line(batch, models, set(specs), runner, out)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _closing_line(batch: st.RunDir, models: list[dict[str, Any]], in_manifest: set[str], runner: _Runner,
                  out: _Out) -> int:
    """Say how the batch ended; the exit code: 0 when every model of the manifest is done."""
    counts = {s: sum(e["status"] == s for e in models) for s in STATUSES}
    ok = all(e["status"] == "done" for e in models if e["name"] in in_manifest)
    hint = " (retry them with --retry-failed)" if counts["failed"] else ""
    out(f"batch: {counts['done']} done, {counts['failed']} failed{hint}, "
        f"{counts['queued'] + counts['running']} not finished; summary: {batch.uri}/{SUMMARY}")
    runner.upload_log(BATCH_LOG)
    return 0 if ok else EXIT_FAILED


def _local_folder(batch: st.RunDir) -> Path:
    """Where logs and child configs live on this machine: the batch dir itself, or a cache folder."""
    if batch.is_local:
        assert batch.local_path is not None
        return batch.local_path
    return st.cache_root() / "batches" / st.cache_key(batch.uri)


class _Runner:
    """The children of one batch run, and the state file, logs and summary they update."""

    def __init__(self, batch: st.RunDir, local: Path, state: dict[str, Any], out: _Out, address: str | None,
                 parallel: int):
        self.batch, self.local, self.state, self.out = batch, local, state, out
        self.address, self.parallel = address, parallel
        self.active: list[_Child] = []

    # -- files ------------------------------------------------------------------------------------

    def save(self) -> None:
        self.state["updated"] = now()
        self.batch.write_json(STATE, self.state)

    def write_summary(self) -> None:
        write_summary(self.batch, [model_summary(self.batch, e) for e in self.state["models"]])

    def upload_log(self, name: str) -> None:
        if self.batch.is_local:
            return
        path = self.local / name
        if path.exists():
            try:
                self.batch.write_bytes(name, path.read_bytes())
            except UserError as error:
                self.out(f"warning: could not upload {name}: {error}")

    def _shown(self, name: str) -> str:
        return str(self.local / name) if self.batch.is_local else f"{self.batch.uri}/{name}"

    # -- children ---------------------------------------------------------------------------------

    def run(self, todo: list[dict[str, Any]]) -> None:
        queue = list(todo)
        total = len(queue)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while queue or self.active:
                while queue and len(self.active) < self.parallel:
                    self.start(queue.pop(0), total - len(queue), total)
                time.sleep(0.2)
                for child in list(self.active):
                    if child.proc.poll() is not None:
                        self.active.remove(child)
                        self.finish(child)
        except KeyboardInterrupt:
            self.interrupt()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)

    def start(self, entry: dict[str, Any], position: int, total: int) -> None:
        name = entry["name"]
        config = self.local / entry["config"]
        if not self.batch.is_local:
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_bytes(self.batch.read_bytes(entry["config"]))
        log_path = self.local / entry["log"]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.batch.is_local and not log_path.exists() and self.batch.exists(entry["log"]):
            log_path.write_bytes(self.batch.read_bytes(entry["log"]))  # resumed on another machine
        resuming = entry["status"] == "running"
        entry.update(status="running", reason=None, attempts=int(entry.get("attempts") or 0) + 1,
                     started=entry.get("started") or now(), finished=None)
        assert self.address is not None  # a cluster is up whenever there is something to run
        cli_args = ["run", str(config), "--run-dir", run_uri(self.batch, entry["run_dir"]),
                    "--address", self.address]
        logf = open(log_path, "ab")
        offset = logf.tell()
        logf.write(f"\n=== heretic-dist batch: attempt {entry['attempts']} of {name} at {now()}\n"
                   f"$ {sys.executable} -m heretic_dist {' '.join(cli_args)}\n".encode())
        logf.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # --child: the child dies with this process (heretic_dist/__main__.py), as a lost machine takes both
        proc = subprocess.Popen([sys.executable, "-m", "heretic_dist", "--child", str(os.getpid()),
                                 *cli_args], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
        self.active.append(_Child(entry, proc, log_path, offset, time.monotonic(), logf))
        self.save()
        self.out(f"model {name}: running ({'resumed, ' if resuming else ''}{position}/{total}, "
                 f"attempt {entry['attempts']}); log {self._shown(entry['log'])}")

    def finish(self, child: _Child, interrupted: bool = False) -> None:
        entry, rc = child.entry, child.proc.returncode
        if child.logf is not None:
            child.logf.close()
        seconds = time.monotonic() - child.t0
        entry["wall_seconds"] = round(float(entry.get("wall_seconds") or 0.0) + seconds, 3)
        name = entry["name"]
        if interrupted or rc in (130, -signal.SIGINT):
            self.save()  # stays "running": the same command resumes it
            self.out(f"model {name}: interrupted after {seconds:.0f} s; it resumes on the next batch run")
            self.upload_log(entry["log"])
            return
        entry["finished"] = now()
        rc = self._settle(child, rc)
        self.save()
        self.upload_log(entry["log"])
        self.upload_log(BATCH_LOG)
        try:
            self.write_summary()
        except (UserError, OSError, ValueError) as error:
            self.out(f"warning: could not write {SUMMARY}: {error}")
        if rc == 0:
            row = model_summary(self.batch, entry)
            best = best_summary_point(row.get("pareto"))
            facts = f"; {row['complete_trials']} complete trials" if row.get("complete_trials") is not None else ""
            if best is not None:
                facts += f"; best {best['refusals']}/{row.get('n_bad')} refusals at KL {best['kl']:.4f}"
            self.out(f"model {name}: done in {seconds:.0f} s{facts}")
        else:
            self.out(f"model {name}: failed after {seconds:.0f} s: {entry['reason']}")

    def _settle(self, child: _Child, rc: int) -> int:
        """Mark a finished child's model done or failed; the exit code, -1 for a run that ended short."""
        entry = child.entry
        row = model_summary(self.batch, entry) if rc == 0 else {}
        complete, wanted = row.get("complete_trials"), row.get("n_trials")
        if rc == 0 and (complete is None or (wanted is not None and complete < wanted)):
            # `run` can end cleanly short of n_trials (Ray Tune stops its loop on SIGINT): not done
            entry.update(status="failed", reason=f"the run ended with {complete or 0} of {wanted or '?'} complete "
                                                 "trials (interrupted?); --retry-failed resumes it")
            return -1
        if rc == 0:
            entry.update(status="done", reason=None)
        else:
            entry.update(status="failed", reason=_failure_reason(child.log_path, child.log_offset, rc))
        return rc

    def interrupt(self) -> None:
        """Ctrl-C / SIGTERM: stop the children (they leave their studies resumable), keep them running."""
        for child in self.active:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
        for child in self.active:
            try:
                child.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            self.finish(child, interrupted=True)
        self.active = []
        with contextlib.suppress(Exception):
            self.write_summary()


def _raise_interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def _failure_reason(log_path: Path, offset: int, rc: int) -> str:
    """The child's last `heretic-dist: error:` line, else the last line of its output, else the code."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines()[2:] if line.strip()]  # after our header
    errors = [line for line in lines if line.startswith("heretic-dist: error:")]
    if errors:
        reason = errors[-1].removeprefix("heretic-dist: error:").strip()
    elif lines:
        reason = lines[-1]
    else:
        reason = ""
    if rc < 0:
        with contextlib.suppress(ValueError):
            sig = signal.Signals(-rc).name
            reason = f"killed by {sig}" + (f" ({reason})" if reason else "")
    if not reason:
        reason = f"exit code {rc}"
    return reason[:500]
