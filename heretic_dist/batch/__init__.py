"""Batch: many models from one manifest, on one Ray cluster, one `heretic-dist run` child per model.

A manifest (TOML) holds `[defaults]` (any settings keys, tables included) and `[[models]]` entries,
each with a `name` (a safe folder name; derived from `model` when left out), a `model` and any
per-model overrides (flat keys, dotted keys or tables; tables are merged key by key over the
defaults). Everything is validated up front with the config machinery, before anything is written.

The batch directory (local path, s3:// or gs://, through storage.RunDir):

    batch_state.json        what each model is doing: queued | running | done | failed (+ reason),
                            written atomically on every change; the source of truth for resume
    batch_summary.parquet   one row per model: base refusals, trials, raw Pareto points, time, GPU-hours
    batch.log               the batch's own lines (state changes)
    configs/<name>.toml     the resolved settings each model ran with (Settings.to_toml())
    logs/<name>.log         each child's output (remote batch dirs: written locally, uploaded per model)
    runs/<name>/            each model's run directory (the driver's, so `status`/`export`/`report` work)

Execution: the batch process starts (or joins) ONE Ray cluster and runs
`python -m heretic_dist run configs/<name>.toml --run-dir runs/<name> --address <cluster>` for each
model (through a tiny launcher that makes the child die with the batch), one after another or up to
`--parallel-models` at once; each child's workers are Ray actors with their own CPU/GPU reservations,
so parallel children use disjoint worker groups. A child that fails marks its model failed and the
batch goes on. Running the same command again skips done models, resumes the running one (its run
directory resumes its study) and retries queued ones; failed ones only with `--retry-failed`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .. import rundir as st
from ..errors import UserError

STATE = "batch_state.json"
SUMMARY = "batch_summary.parquet"
BATCH_LOG = "batch.log"
STATE_VERSION = 1
KL_THRESHOLD = 0.05  # batch-status: best refusals at KL <= this (the report uses the same)
STATUSES = ("queued", "running", "done", "failed")
EXIT_FAILED = 1  # some model is not done (failed); user errors exit 2 through the CLI
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TOP_KEYS = ("defaults", "models")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Manifest


@dataclass
class ModelSpec:
    name: str
    index: int  # 1-based position in the manifest
    settings: Any  # config.Settings
    toml: str  # Settings.to_toml(): written as configs/<name>.toml, read back by the child
    sha256: str  # of `toml`: tells a changed entry on resume

    @property
    def model(self) -> str:
        return self.settings.model


@dataclass
class Manifest:
    path: Path
    sha256: str
    models: list[ModelSpec]


def derive_name(model: str) -> str:
    """A folder name from a model id/path: its last part, without .gguf, unsafe characters as '_'."""
    text = model.rstrip("/\\")
    text = text.split(":", 1)[1] if text.startswith("package:") else text
    last = re.split(r"[/\\]", text)[-1] or text
    if last.lower().endswith(".gguf"):
        last = last[: -len(".gguf")]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", last).strip("._-")
    return name[:100] or "model"


def _expand_dotted(table: dict[str, Any]) -> dict[str, Any]:
    """`"cluster.workers" = 1` (a quoted dotted key) means the same as `cluster.workers = 1`."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if "." in key:
            top, sub = key.split(".", 1)
            inner = out.setdefault(top, {})
            if isinstance(inner, dict):
                inner[sub] = value
                continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def _merge(defaults: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """Entry over defaults; tables (cluster, prompt sets) are merged key by key."""
    merged = copy.deepcopy(defaults)
    for key, value in entry.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_manifest(path: str | Path, *, check_prompts: bool = True) -> Manifest:
    """Read and validate a batch manifest: every model's merged settings, names, duplicates, and (with
    check_prompts) every distinct prompt set. Raises one-line UserErrors naming the entry."""
    from ..config import (Settings, _check_keys, _dotted_keys, _resolve_dataset_paths, _suggest, _validate,
                         read_toml_file)

    path = Path(path)
    data = read_toml_file(path, "manifest")
    src = str(path)
    base = path.resolve().parent
    for key in data:
        if key in _TOP_KEYS:
            continue
        if key in Settings.model_fields:
            raise UserError(f"'{key}' at the top of {src}: settings go in [defaults] or in a [[models]] entry")
        raise UserError(f"unknown key '{key}' in {src}{_suggest(key, list(_TOP_KEYS))} "
                        "(a manifest holds [defaults] and [[models]] entries)")

    defaults_src = f"{src} [defaults]"
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError(f"'defaults' in {src} must be a table ([defaults] with settings keys)")
    defaults = _expand_dotted(copy.deepcopy(defaults))
    _check_keys(defaults, defaults_src)
    _resolve_dataset_paths(defaults, base)

    entries = data.get("models")
    if entries is None or (isinstance(entries, list) and not entries):
        raise UserError(f"no models in {src}: add [[models]] entries, each with a model = \"...\"")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"'models' in {src} must be an array of tables ([[models]] entries)")

    specs: list[ModelSpec] = []
    by_name: dict[str, ModelSpec] = {}
    by_settings: dict[str, ModelSpec] = {}
    for i, raw_entry in enumerate(entries, start=1):
        entry = _expand_dotted(copy.deepcopy(raw_entry))
        name = entry.pop("name", None)
        model = entry.get("model", defaults.get("model"))
        if name is None:
            if not isinstance(model, str) or not model:
                raise UserError(f"missing required key 'model' in {src}, models entry #{i} "
                                "(the Hugging Face model id or local path of the model to edit)")
            name = derive_name(model)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise UserError(f"'name' = {json.dumps(name)} in {src}, models entry #{i}: must be a folder name "
                            "of letters, digits, '.', '_' and '-' (starting with a letter or digit)")
        label = f"{src}, models entry '{name}'"
        _check_keys(entry, label)
        _resolve_dataset_paths(entry, base)
        merged = _merge(defaults, entry)
        _resolve_dataset_paths(merged, Path.cwd())  # the same file for the child, whatever its folder
        origin = {k: defaults_src for k in _dotted_keys(defaults)}
        origin.update({k: label for k in _dotted_keys(entry)})
        settings = _validate(merged, label, origin)
        toml = settings.to_toml()
        spec = ModelSpec(name, i, settings, toml, _sha256(toml))
        key = settings.model_dump_json()
        if key in by_settings:
            other = by_settings[key]
            raise UserError(f"duplicate model entry in {src}: '{name}' (#{i}) repeats '{other.name}' "
                            f"(#{other.index}): same model {settings.model!r} with the same settings")
        if name in by_name:
            raise UserError(f"duplicate model name '{name}' in {src} (models entries #{by_name[name].index} and "
                            f"#{i}): give each entry its own name = \"...\"")
        by_name[name] = by_settings[key] = spec
        specs.append(spec)

    if check_prompts:
        _check_prompt_sets(specs)
    return Manifest(path, _sha256(path.read_bytes()), specs)


def _check_prompt_sets(specs: list[ModelSpec]) -> None:
    """Load every distinct prompt set once, so a bad one stops the batch now, not hours later."""
    from ..config import PROMPT_SET_KEYS
    from ..prompts import load_prompt_set

    seen: set[str] = set()
    for spec in specs:
        s = spec.settings
        for key in PROMPT_SET_KEYS:
            prompt_spec = getattr(s, key)
            ident = json.dumps([prompt_spec.model_dump(mode="json"), s.system_prompt], sort_keys=True)
            if ident in seen:
                continue
            try:
                load_prompt_set(prompt_spec, s.system_prompt, label=key)
            except UserError as error:
                raise UserError(f"models entry '{spec.name}': {error}") from None
            seen.add(ident)


# --------------------------------------------------------------------------------------------------
# State


def _entry(spec: ModelSpec) -> dict[str, Any]:
    return {"name": spec.name, "model": spec.model, "status": "queued", "reason": None,
            "run_dir": f"runs/{spec.name}", "config": f"configs/{spec.name}.toml", "log": f"logs/{spec.name}.log",
            "settings_sha256": spec.sha256, "attempts": 0, "started": None, "finished": None,
            "wall_seconds": 0.0}


def read_state(batch: st.RunDir) -> dict[str, Any] | None:
    if not batch.exists(STATE):
        return None
    state = batch.read_json(STATE)
    models = state.get("models") if isinstance(state, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("name"), str)
                                               for m in models):
        raise UserError(f"{STATE} in {batch.uri} is not a heretic-dist batch state (no 'models' list)")
    return state


def run_uri(batch: st.RunDir, ref: str) -> str:
    """A model's run directory: `ref` (runs/<name>) inside the batch dir, as a path or URI."""
    if "://" in ref or ref.startswith(("/", "~")):
        return ref
    if batch.is_local:
        assert batch.local_path is not None
        return str(batch.local_path / ref)
    return f"{batch.uri}/{ref}"


# --------------------------------------------------------------------------------------------------
# Summary


def _pareto_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from ..search.front import pareto_front

    done = [r for r in rows if r.get("state") == "COMPLETE" and r.get("refusals") is not None
            and r.get("kl") is not None]
    return [{"trial": r["number"], "refusals": r["refusals"], "kl": r["kl"]} for r in pareto_front(done)]


def model_summary(batch: st.RunDir, entry: dict[str, Any]) -> dict[str, Any]:
    """One batch_summary row, from the model's run directory (whatever it holds so far)."""
    row: dict[str, Any] = {"name": entry["name"], "model": entry.get("model"), "status": entry.get("status"),
                           "reason": entry.get("reason"), "base_refusals": None, "n_bad": None,
                           "n_trials": None, "complete_trials": None, "failed_trials": None, "pareto": [],
                           "wall_seconds": float(entry.get("wall_seconds") or 0.0), "gpu_hours": None,
                           "run_dir": entry.get("run_dir")}
    try:
        run = st.RunDir(run_uri(batch, str(entry.get("run_dir") or f"runs/{entry['name']}")))
        if run.exists(st.MANIFEST):
            manifest = run.read_json(st.MANIFEST)
            row["base_refusals"] = manifest.get("base_refusals")
            row["n_bad"] = manifest.get("n_bad_prompts")
        if run.exists(st.TRIALS):
            rows = run.read_parquet(st.TRIALS)
            row["complete_trials"] = sum(r.get("state") == "COMPLETE" for r in rows)
            row["failed_trials"] = sum(r.get("state") == "FAIL" for r in rows)
            row["pareto"] = _pareto_points(rows)
        if run.exists("run_info.json"):
            info = run.read_json("run_info.json")
            row["n_trials"] = info.get("n_trials")
            row["gpu_hours"] = (float(info.get("worker_seconds") or 0.0)
                                * float(info.get("gpus_per_worker") or 0.0) / 3600)
    except (UserError, OSError, ValueError) as error:  # a summary never stops the batch
        row["summary_error"] = str(error).splitlines()[0] if str(error) else type(error).__name__
    return row


def _summary_schema():
    import pyarrow as pa

    point = pa.struct([("trial", pa.int64()), ("refusals", pa.int64()), ("kl", pa.float64())])
    return pa.schema([("name", pa.string()), ("model", pa.string()), ("status", pa.string()),
                      ("reason", pa.string()), ("base_refusals", pa.int64()), ("n_bad", pa.int64()),
                      ("n_trials", pa.int64()), ("complete_trials", pa.int64()), ("failed_trials", pa.int64()), ("pareto", pa.list_(point)),
                      ("wall_seconds", pa.float64()), ("gpu_hours", pa.float64()), ("run_dir", pa.string()),
                      ("summary_error", pa.string())])


def write_summary(batch: st.RunDir, rows: list[dict[str, Any]]) -> None:
    """batch_summary.parquet with real columns (pareto is a list of {trial, refusals, kl} structs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_summary_schema())
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    batch.write_bytes(SUMMARY, sink.getvalue().to_pybytes())


def read_summary(batch: st.RunDir) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(batch.read_bytes(SUMMARY))).to_pylist()


def best_point(pareto: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Fewest refusals at KL <= KL_THRESHOLD, else the lowest-KL Pareto point."""
    if not pareto:
        return None
    within = [p for p in pareto if p["kl"] <= KL_THRESHOLD]
    if within:
        return min(within, key=lambda p: (p["refusals"], p["kl"]))
    return min(pareto, key=lambda p: (p["kl"], p["refusals"]))


# --------------------------------------------------------------------------------------------------
# The batch driver


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
    log_offset: int
    t0: float
    logf: Any = field(repr=False, default=None)


class _Out:
    """Lines to stdout and, once the batch dir is locked, to batch.log (timestamped)."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.path, self.pending = say, None, []

    def __call__(self, line: str) -> None:
        self.say(line)
        stamped = f"{_now()} {line}\n"
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


def _cluster_for(models: list[ModelSpec], address: str | None):
    """The one cluster's settings: --address, else the manifest's; the largest object store asked for."""
    clusters = [m.settings.cluster for m in models]
    first = clusters[0]
    return first.model_copy(update={
        "address": address or next((c.address for c in clusters if c.address), None),
        "object_store_memory_mb": max(c.object_store_memory_mb for c in clusters),
        "dashboard": any(c.dashboard for c in clusters),
    })


def check_fit(models: list[ModelSpec], parallel: int, cpus: float, gpus: float) -> None:
    """The `parallel` hungriest models at once must fit the cluster, else one clear line."""
    if not models:
        return
    for kind, have, need_of in (("CPU", cpus, lambda m: m.settings.cluster.workers * m.settings.cluster.cpus_per_worker),
                                ("GPU", gpus, lambda m: m.settings.cluster.workers * m.settings.cluster.gpus_per_worker)):
        needs = sorted(((need_of(m), m) for m in models), key=lambda x: -x[0])
        biggest, model = needs[0]
        if biggest > have + 1e-9:
            c = model.settings.cluster
            per = c.cpus_per_worker if kind == "CPU" else c.gpus_per_worker
            raise UserError(
                f"model '{model.name}' needs {biggest:g} {kind}s ({c.workers} workers x {per:g}), "
                f"the Ray cluster has {have:g}: lower cluster.workers or cluster.{kind.lower()}s_per_worker "
                "for it, or use a bigger cluster (--address)")
        m = min(parallel, len(models))
        total = sum(n for n, _ in needs[:m])
        if total > have + 1e-9:
            fit, acc = 0, 0.0
            for n, _ in needs:
                if acc + n > have + 1e-9:
                    break
                acc, fit = acc + n, fit + 1
            parts = []
            for _, spec in needs[:m]:
                c = spec.settings.cluster
                per = c.cpus_per_worker if kind == "CPU" else c.gpus_per_worker
                parts.append(f"{spec.name}: {c.workers} workers x {per:g}")
            raise UserError(
                f"--parallel-models {parallel}: {m} models at once need {total:g} {kind}s ({', '.join(parts)}), "
                f"the Ray cluster has {have:g}: use --parallel-models {max(fit, 1)}")


def _drops_filesystems(func):
    """Collect reference cycles before returning, so no pyarrow S3FileSystem outlives the call: with
    pyarrow 26, one still alive at interpreter exit after a Parquet read aborts the process
    ("terminate called without an active exception", exit 134) after all the work is done."""
    import functools
    import gc

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        finally:
            gc.collect()

    return wrapper


@_drops_filesystems
def run_batch(options: BatchOptions) -> int:
    """Run (or resume) a batch. Returns 0 when every model of the manifest is done, 1 otherwise."""
    from ..distributed.driver import start_ray

    if options.parallel_models < 1:
        raise UserError(f"--parallel-models must be at least 1, got {options.parallel_models}")
    manifest = load_manifest(options.manifest)
    batch_uri = options.batch_dir or str(Path("batches") / Path(options.manifest).stem)
    batch = st.RunDir(batch_uri)
    batch.check_access(write=False)  # missing bucket, no credentials, a file: one line, nothing written
    old = read_state(batch)
    if old is None and batch.exists(st.MANIFEST):
        raise UserError(f"{batch.uri} is a run directory, not a batch directory: choose another --batch-dir")
    out = _Out(options.say)
    if old is not None and old.get("manifest_sha256") != manifest.sha256:
        out(f"note: {manifest.path} changed since this batch last ran")
    models, todo = _plan(batch, manifest, old, options.retry_failed, out)

    if batch.is_local and batch.local_path is not None and batch.local_path.is_dir():
        with st.RunLock(batch):  # another batch driver on it: say so now, before starting a cluster
            pass
    cluster = _cluster_for(manifest.models, options.address)
    specs = {m.name: m for m in manifest.models}
    todo_specs = [specs[e["name"]] for e in todo]
    started_ray = start_ray(cluster, 0, 0) if todo else False  # nothing to run: no cluster
    try:
        address = None
        if todo:
            import ray

            resources = ray.cluster_resources()
            check_fit(todo_specs, options.parallel_models, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
            address = ray.get_runtime_context().gcs_address
        batch.check_access(write=True)
        with st.RunLock(batch):
            local = _local_folder(batch)
            out.attach(local / BATCH_LOG)
            state = {"version": STATE_VERSION, "manifest": str(manifest.path.resolve()),
                     "manifest_sha256": manifest.sha256, "created": (old or {}).get("created", _now()),
                     "updated": _now(), "models": models}
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
            counts = {s: sum(e["status"] == s for e in models) for s in STATUSES}
            in_manifest = [e for e in models if e["name"] in specs]
            ok = all(e["status"] == "done" for e in in_manifest)
            hint = " (retry them with --retry-failed)" if counts["failed"] else ""
            out(f"batch: {counts['done']} done, {counts['failed']} failed{hint}, "
                f"{counts['queued'] + counts['running']} not finished; summary: {batch.uri}/{SUMMARY}")
            runner.upload_log(BATCH_LOG)
            return 0 if ok else EXIT_FAILED
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _changed_keys(batch: st.RunDir, entry: dict[str, Any], spec: ModelSpec) -> str:
    """' (n_trials, cluster.workers)': the keys that differ from the config the model ran with."""
    from ..config import tomllib

    try:
        ran = tomllib.loads(batch.read_bytes(entry.get("config") or f"configs/{spec.name}.toml").decode())
    except (OSError, UserError, ValueError):
        return ""
    keys = st.manifest_diff(ran, spec.settings.to_toml_dict())
    return f" ({', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})" if keys else ""


def _plan(batch: st.RunDir, manifest: Manifest, old: dict[str, Any] | None, retry_failed: bool, out: _Out):
    """Merge the manifest with a previous state: the new models list and the entries to run now."""
    previous = {e["name"]: e for e in (old or {}).get("models", [])}
    models, todo = [], []
    for spec in manifest.models:
        entry = previous.pop(spec.name, None)
        if entry is None:
            entry = _entry(spec)
        else:
            entry = {**_entry(spec), **entry}
            changed = entry.get("settings_sha256") != spec.sha256
            what = _changed_keys(batch, entry, spec) if changed else ""
            if entry["status"] == "done":
                if changed:
                    out(f"model {spec.name}: note: its manifest entry changed since it ran{what}; it stays done "
                        f"(its run is kept; give the entry a new name to run the new settings)")
            else:
                if changed:
                    out(f"model {spec.name}: note: its settings changed since the last attempt{what}; "
                        "the new ones are used")
                entry["model"] = spec.model
                entry["settings_sha256"] = spec.sha256
        if entry["status"] not in STATUSES:
            entry["status"] = "queued"
        models.append(entry)
        if entry["status"] == "done":
            out(f"model {spec.name}: skipped (done)")
        elif entry["status"] == "failed" and not retry_failed:
            out(f"model {spec.name}: skipped (failed: {entry.get('reason')}; pass --retry-failed to retry)")
        else:
            todo.append(entry)
    for entry in previous.values():  # not in the manifest any more: kept for the record, never run
        out(f"model {entry['name']}: note: not in the manifest any more; kept as {entry.get('status')}")
        models.append(entry)
    return models, todo


def _local_folder(batch: st.RunDir) -> Path:
    """Where logs and child configs live on this machine: the batch dir itself, or a cache folder."""
    if batch.is_local:
        assert batch.local_path is not None
        return batch.local_path
    return st._cache_root() / "batches" / st._sha16(batch.uri)


class _Runner:
    def __init__(self, batch: st.RunDir, local: Path, state: dict[str, Any], out: _Out, address: str | None,
                 parallel: int):
        self.batch, self.local, self.state, self.out = batch, local, state, out
        self.address, self.parallel = address, parallel
        self.active: list[_Child] = []

    # -- files ------------------------------------------------------------------------------------

    def save(self) -> None:
        self.state["updated"] = _now()
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
                     started=entry.get("started") or _now(), finished=None)
        cli_args = ["run", str(config), "--run-dir", run_uri(self.batch, entry["run_dir"]),
                    "--address", self.address]
        logf = open(log_path, "ab")
        offset = logf.tell()
        logf.write(f"\n=== heretic-dist batch: attempt {entry['attempts']} of {name} at {_now()}\n"
                   f"$ {sys.executable} -m heretic_dist {' '.join(cli_args)}\n".encode())
        logf.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "heretic_dist", "--child", str(os.getpid()),
                                 *cli_args], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
        self.active.append(_Child(entry, proc, log_path, offset, time.monotonic(), logf))
        self.save()
        self.out(f"model {name}: running ({'resumed, ' if resuming else ''}{position}/{total}, "
                 f"attempt {entry['attempts']}); log {self._shown(entry['log'])}")

    def _shown(self, name: str) -> str:
        return str(self.local / name) if self.batch.is_local else f"{self.batch.uri}/{name}"

    def finish(self, child: _Child, interrupted: bool = False) -> None:
        entry, rc = child.entry, child.proc.returncode
        child.logf.close()
        seconds = time.monotonic() - child.t0
        entry["wall_seconds"] = round(float(entry.get("wall_seconds") or 0.0) + seconds, 3)
        name = entry["name"]
        if interrupted or rc in (130, -signal.SIGINT):
            self.save()  # stays "running": the same command resumes it
            self.out(f"model {name}: interrupted after {seconds:.0f} s; it resumes on the next batch run")
            self.upload_log(entry["log"])
            return
        entry["finished"] = _now()
        row = model_summary(self.batch, entry) if rc == 0 else {}
        complete, wanted = row.get("complete_trials"), row.get("n_trials")
        if rc == 0 and (complete is None or (wanted is not None and complete < wanted)):
            # `run` can end cleanly short of n_trials (Ray Tune stops its loop on SIGINT): not done
            rc = -1
            entry.update(status="failed", reason=f"the run ended with {complete or 0} of {wanted or '?'} complete "
                                                 "trials (interrupted?); --retry-failed resumes it")
        elif rc == 0:
            entry.update(status="done", reason=None)
        else:
            entry.update(status="failed", reason=_failure_reason(child.log_path, child.log_offset, rc))
        self.save()
        self.upload_log(entry["log"])
        self.upload_log(BATCH_LOG)
        try:
            self.write_summary()
        except (UserError, OSError, ValueError) as error:
            self.out(f"warning: could not write {SUMMARY}: {error}")
        if rc == 0:
            row = model_summary(self.batch, entry)
            best = best_point(row.get("pareto"))
            facts = f"; {row['complete_trials']} complete trials" if row.get("complete_trials") is not None else ""
            if best is not None:
                facts += f"; best {best['refusals']}/{row.get('n_bad')} refusals at KL {best['kl']:.4f}"
            self.out(f"model {name}: done in {seconds:.0f} s{facts}")
        else:
            self.out(f"model {name}: failed after {seconds:.0f} s: {entry['reason']}")

    def interrupt(self) -> None:
        """Ctrl-C / SIGTERM: stop the children (they leave their studies resumable), keep them running."""
        for child in self.active:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
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


def _raise_interrupt(signum, frame):  # noqa: ARG001
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


# --------------------------------------------------------------------------------------------------
# batch-status


def _fmt_duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@_drops_filesystems
def status_table(batch_dir: str) -> str:
    """The batch-status table: one line per model, from batch_state.json and batch_summary.parquet
    (models without a summary row yet are read from their run directories)."""
    batch = st.RunDir(batch_dir)
    batch.check_access(write=False)
    if batch.is_local and not (batch.local_path and batch.local_path.is_dir()):
        raise UserError(f"batch directory {batch.uri} does not exist")
    state = read_state(batch)
    if state is None:
        raise UserError(f"no {STATE} in {batch.uri}: not a heretic-dist batch directory")
    summary: dict[str, dict[str, Any]] = {}
    if batch.exists(SUMMARY):
        with contextlib.suppress(UserError, OSError, ValueError):
            summary = {r["name"]: r for r in read_summary(batch)}
    header = ["model", "status", "base", f"best (KL<={KL_THRESHOLD:g} or lowest KL)", "trials", "wall", "reason"]
    table = [header]
    counts: dict[str, int] = {}
    for entry in state["models"]:
        status = str(entry.get("status"))
        counts[status] = counts.get(status, 0) + 1
        row = summary.get(entry["name"])
        if row is None or status == "running":
            row = model_summary(batch, entry)
        n_bad = row.get("n_bad")
        base = f"{row['base_refusals']}/{n_bad}" if row.get("base_refusals") is not None else "-"
        best = best_point(row.get("pareto"))
        best_text = f"{best['refusals']}/{n_bad} at KL {best['kl']:.4f} (#{best['trial']})" if best else "-"
        trials = "-"
        if row.get("complete_trials") is not None:
            trials = f"{row['complete_trials']}" + (f" (+{row['failed_trials']} failed)" if row.get("failed_trials") else "")
        table.append([entry["name"], status, base, best_text, trials,
                      _fmt_duration(entry.get("wall_seconds")), str(entry.get("reason") or "")])
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + ("  " + r[-1] if r[-1] else "")
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ------")
    lines.append("")
    lines.append(f"{batch.uri}: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts.get(s))
                 + f"; updated {state.get('updated', '?')}")
    return "\n".join(line.rstrip() for line in lines)
