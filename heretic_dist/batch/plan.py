"""The manifest and the plan: which models a batch holds, with what settings, and which to run now.

A manifest's `[defaults]` and each `[[models]]` entry are layers of settings keys, merged and checked
by config's public merge (`check_table`, `settings_from_layers`), so their messages are the same as a
config file's and name the entry a bad key came from.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .. import rundir as st
from ..config import (PROMPT_SET_KEYS, Settings, check_table, did_you_mean, parse_toml, read_toml_file,
                      settings_from_layers)
from ..errors import UserError

STATE = "batch_state.json"
STATE_VERSION = 1
STATUSES = ("queued", "running", "done", "failed")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TOP_KEYS = ("defaults", "models")

Say = Callable[[str], None]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Manifest


@dataclass
class ModelSpec:
    name: str
    index: int  # 1-based position in the manifest
    settings: Settings
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


def load_manifest(path: str | Path, *, check_prompts: bool = True) -> Manifest:
    """Read and validate a batch manifest: every model's merged settings, names, duplicates, and (with
    check_prompts) every distinct prompt set. Raises one-line UserErrors naming the entry."""
    path = Path(path)
    data = read_toml_file(path, "manifest")
    src = str(path)
    _check_top_keys(data, src)
    # Relative dataset paths: beside the manifest, else the cwd; made absolute so that the child
    # reads the same file from its config in the batch dir.
    bases = (path.resolve().parent, Path.cwd())
    defaults_src = f"{src} [defaults]"
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError(f"'defaults' in {src} must be a table ([defaults] with settings keys)")
    defaults = check_table(defaults, defaults_src, *bases)

    entries = data.get("models")
    if entries is None or (isinstance(entries, list) and not entries):
        raise UserError(f"no models in {src}: add [[models]] entries, each with a model = \"...\"")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"'models' in {src} must be an array of tables ([[models]] entries)")

    specs: list[ModelSpec] = []
    by_name: dict[str, ModelSpec] = {}
    by_settings: dict[str, ModelSpec] = {}
    for i, raw_entry in enumerate(entries, start=1):
        entry = dict(raw_entry)
        name = _entry_name(entry.pop("name", None), entry.get("model", defaults.get("model")), src, i)
        label = f"{src}, models entry '{name}'"
        settings = settings_from_layers([(defaults_src, defaults), (label, check_table(entry, label, *bases))])
        toml = settings.to_toml()
        spec = ModelSpec(name, i, settings, toml, _sha256(toml))
        _check_unique(spec, by_name, by_settings, src)
        specs.append(spec)

    if check_prompts:
        _check_prompt_sets(specs)
    return Manifest(path, _sha256(path.read_bytes()), specs)


def _check_top_keys(data: dict[str, Any], src: str) -> None:
    for key in data:
        if key in _TOP_KEYS:
            continue
        if key in Settings.model_fields:
            raise UserError(f"'{key}' at the top of {src}: settings go in [defaults] or in a [[models]] entry")
        raise UserError(f"unknown key '{key}' in {src}{did_you_mean(key, _TOP_KEYS)} "
                        "(a manifest holds [defaults] and [[models]] entries)")


def _entry_name(name: Any, model: Any, src: str, index: int) -> str:
    """The entry's `name`, else one derived from its model; a safe folder name either way."""
    if name is None:
        if not isinstance(model, str) or not model:
            raise UserError(f"missing required key 'model' in {src}, models entry #{index} "
                            "(the Hugging Face model id or local path of the model to edit)")
        name = derive_name(model)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UserError(f"'name' = {json.dumps(name)} in {src}, models entry #{index}: must be a folder name "
                        "of letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    return name


def _check_unique(spec: ModelSpec, by_name: dict[str, ModelSpec], by_settings: dict[str, ModelSpec],
                  src: str) -> None:
    """No two entries with the same settings, nor with the same name; records `spec` in both."""
    settings_key = spec.settings.model_dump_json()
    if settings_key in by_settings:
        other = by_settings[settings_key]
        raise UserError(f"duplicate model entry in {src}: '{spec.name}' (#{spec.index}) repeats '{other.name}' "
                        f"(#{other.index}): same model {spec.model!r} with the same settings")
    if spec.name in by_name:
        raise UserError(f"duplicate model name '{spec.name}' in {src} (models entries #{by_name[spec.name].index} "
                        f"and #{spec.index}): give each entry its own name = \"...\"")
    by_name[spec.name] = by_settings[settings_key] = spec


def _check_prompt_sets(specs: list[ModelSpec]) -> None:
    """Load every distinct prompt set once, so a bad one stops the batch now, not hours later."""
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


def check_fit(models: list[ModelSpec], parallel: int, cpus: float, gpus: float) -> None:
    """The `parallel` hungriest models at once must fit the cluster, else one clear line."""
    if not models:
        return
    for kind, have in (("CPU", cpus), ("GPU", gpus)):
        needs = sorted(((_need(m, kind), m) for m in models), key=lambda x: -x[0])
        biggest, model = needs[0]
        if biggest > have + 1e-9:
            c = model.settings.cluster
            raise UserError(
                f"model '{model.name}' needs {biggest:g} {kind}s ({c.workers} workers x {_per_worker(model, kind):g}), "
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
            parts = [f"{spec.name}: {spec.settings.cluster.workers} workers x {_per_worker(spec, kind):g}"
                     for _, spec in needs[:m]]
            raise UserError(
                f"--parallel-models {parallel}: {m} models at once need {total:g} {kind}s ({', '.join(parts)}), "
                f"the Ray cluster has {have:g}: use --parallel-models {max(fit, 1)}")


def _per_worker(spec: ModelSpec, kind: str) -> float:
    """What one worker (one replica: tensor_parallel ranks) takes; gpus_per_worker resolved before."""
    c = spec.settings.cluster
    return (c.cpus_per_worker if kind == "CPU" else float(c.gpus_per_worker)) * c.tensor_parallel


def _need(spec: ModelSpec, kind: str) -> float:
    return spec.settings.cluster.workers * _per_worker(spec, kind)


# --------------------------------------------------------------------------------------------------
# State: batch_state.json, the source of truth for resume


def new_entry(spec: ModelSpec) -> dict[str, Any]:
    return {"name": spec.name, "model": spec.model, "status": "queued", "reason": None,
            "run_dir": f"runs/{spec.name}", "config": f"configs/{spec.name}.toml", "log": f"logs/{spec.name}.log",
            "settings_sha256": spec.sha256, "attempts": 0, "started": None, "finished": None,
            "wall_seconds": 0.0}


def new_state(manifest: Manifest, old: dict[str, Any] | None, models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"version": STATE_VERSION, "manifest": str(manifest.path.resolve()),
            "manifest_sha256": manifest.sha256, "created": (old or {}).get("created", now()),
            "updated": now(), "models": models}


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


def plan(batch: st.RunDir, manifest: Manifest, old: dict[str, Any] | None, retry_failed: bool,
         out: Say) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Merge the manifest with a previous state: the new models list and the entries to run now."""
    previous = {e["name"]: e for e in (old or {}).get("models", [])}
    models, todo = [], []
    for spec in manifest.models:
        entry = previous.pop(spec.name, None)
        entry = new_entry(spec) if entry is None else _updated_entry(batch, spec, entry, out)
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


def _updated_entry(batch: st.RunDir, spec: ModelSpec, entry: dict[str, Any], out: Say) -> dict[str, Any]:
    """A previous state entry for this spec: a done model keeps what it ran, others take the new settings."""
    entry = {**new_entry(spec), **entry}
    changed = entry.get("settings_sha256") != spec.sha256
    what = _changed_keys(batch, entry, spec) if changed else ""
    if entry["status"] == "done":
        if changed:
            out(f"model {spec.name}: note: its manifest entry changed since it ran{what}; it stays done "
                f"(its run is kept; give the entry a new name to run the new settings)")
        return entry
    if changed:
        out(f"model {spec.name}: note: its settings changed since the last attempt{what}; the new ones are used")
    entry["model"] = spec.model
    entry["settings_sha256"] = spec.sha256
    return entry


def _changed_keys(batch: st.RunDir, entry: dict[str, Any], spec: ModelSpec) -> str:
    """' (n_trials, cluster.workers)': the keys that differ from the config the model ran with."""
    config = entry.get("config") or f"configs/{spec.name}.toml"
    try:
        ran = parse_toml(batch.read_bytes(config).decode(), config)
    except (OSError, UserError, ValueError):
        return ""
    keys = st.manifest_diff(ran, spec.settings.to_toml_dict())
    return f" ({', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})" if keys else ""
