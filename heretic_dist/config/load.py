"""Reading settings: TOML files, dotted-key overrides (`--set`), and layered tables (batch manifests).

Every problem is one :class:`UserError` line that names the file (or layer) and the key; the wording of
validation errors is in messages.py. Writing TOML back (`dump_toml`) is here too, so that a resolved
config round-trips through the same reader.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import types
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the `tomli` backport, a dependency there (pyproject.toml)
    import tomli as tomllib  # type: ignore[no-redef]

from heretic_dist.errors import UserError

from .evaluation import EVALUATION_PROMPT_SETS
from .messages import explain, format_value
from .schema import PROMPT_SET_KEYS, TABLES, PromptSetSpec, Settings, drop_none
from .upstream import IGNORED_PROMPT_SET_KEYS, IGNORED_UPSTREAM_KEYS, warn_ignored_key, warn_ignored_prompt_set_key
from .upstream_shapes import from_upstream

OVERRIDES = "overrides"  # how errors name command-line `--set` values


# ----------------------------------------------------------------------------------------------------
# Files


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """TOML text as a dict; bad TOML is one UserError naming `source` and the line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"invalid TOML in {source}: {e}") from None


def read_toml_file(path: Path, kind: str) -> dict[str, Any]:
    """A TOML file as a dict; every problem (missing, not a file, not UTF-8, unreadable, bad TOML) is
    one UserError naming the file. kind names it in messages ("config", "manifest")."""
    source = str(path)
    if not path.is_file():
        raise UserError(f"{kind} {'file not found' if not path.exists() else 'path is not a file'}: {source}")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {kind} file {source}: {e.strerror or e}") from None
    return parse_toml(raw, source)


def load_settings(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read a TOML config (or none), apply dotted-key overrides, validate.

    Raises UserError with one line naming the file and the key for every problem.
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        data = from_upstream(read_toml_file(p, "config"), source)  # upstream master/2.x shapes to ours
        _check_keys(data, source)
        resolve_dataset_paths(data, p.parent)

    origin = {key: source for key in _dotted_keys(data)}  # dotted key -> where it came from, for errors
    if overrides:
        _apply_overrides(data, overrides, origin)
    return _validate(data, source, origin)


# ----------------------------------------------------------------------------------------------------
# Layers: the public merge that batch manifests use ([defaults], then each [[models]] entry)


def did_you_mean(key: str, valid: Iterable[str], prefix: str = "") -> str:
    """"; did you mean 'PREFIXmatch'?" for the closest valid key, or "" when none is close."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


def check_table(table: Mapping[str, Any], source: str, *base_dirs: Path) -> dict[str, Any]:
    """One layer of settings keys, checked, as a new dict: quoted dotted keys (`"cluster.workers" = 2`)
    expanded, unknown keys refused with a did-you-mean, ignored upstream keys dropped with a warning, and
    relative dataset paths that exist under a base dir made to point there (the first that has it)."""
    checked = from_upstream(_expand_dotted(copy.deepcopy(dict(table))), source)
    _check_keys(checked, source)
    for base in base_dirs:
        resolve_dataset_paths(checked, base)
    return checked


def merge_tables(defaults: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """Entry over defaults; tables (cluster, prompt sets) are merged key by key. Neither is changed."""
    merged = copy.deepcopy(dict(defaults))
    for key, value in entry.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def settings_from_layers(layers: Sequence[tuple[str, Mapping[str, Any]]]) -> Settings:
    """Validated Settings from (source label, checked table) layers, each merged over the ones before.
    An error names the layer its key came from; a missing key is blamed on the last layer."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, table in layers:
        merged = merge_tables(merged, table)
        origin.update({key: source for key in _dotted_keys(table)})
    return _validate(merged, layers[-1][0] if layers else "<defaults>", origin)


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


def _dotted_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        keys.append(prefix + k)
        if isinstance(v, dict) and (prefix + k) in TABLES:
            keys.extend(_dotted_keys(v, prefix + k + "."))
    return keys


# ----------------------------------------------------------------------------------------------------
# Key checks


def _check_keys(data: dict[str, Any], source: str) -> None:
    """Reject unknown keys (with a suggestion); drop upstream keys we ignore, with a warning."""
    known = list(Settings.model_fields) + list(IGNORED_UPSTREAM_KEYS)
    for key in list(data):
        if key in IGNORED_UPSTREAM_KEYS:
            warn_ignored_key(key, source)
            del data[key]
            continue
        if key not in Settings.model_fields:
            raise UserError(f"unknown key '{key}' in {source}{did_you_mean(key, known)}")
        model = TABLES.get(key)
        if model is not None:
            if not isinstance(data[key], dict):
                raise UserError(
                    f"'{key}' = {format_value(data[key])} in {source}: must be a table ([{key}] with its keys)"
                )
            _check_table_keys(key, data[key], model, source)


def _check_table_keys(table: str, values: dict[str, Any], model: type[BaseModel], source: str) -> None:
    fields = [f for f in model.model_fields if f not in IGNORED_PROMPT_SET_KEYS]
    for sub in list(values):
        if sub in IGNORED_PROMPT_SET_KEYS and model is PromptSetSpec:
            warn_ignored_prompt_set_key(table, sub, source)
            del values[sub]
            continue
        if sub not in model.model_fields:
            raise UserError(f"unknown key '{table}.{sub}' in {source}{did_you_mean(sub, fields, f'{table}.')}")


def resolve_dataset_paths(data: dict[str, Any], base: Path) -> None:
    """A relative dataset path in the file means relative to the file, when it exists there."""
    evaluation = data.get("evaluation") if isinstance(data.get("evaluation"), dict) else {}
    specs = [data.get(key) for key in PROMPT_SET_KEYS] + [evaluation.get(k) for k in EVALUATION_PROMPT_SETS]
    for spec in specs:
        if not isinstance(spec, dict):
            continue
        ds = spec.get("dataset")
        if not isinstance(ds, str) or not ds or ds.startswith("builtin:"):
            continue
        p = Path(ds).expanduser()
        if p.is_absolute():
            continue
        candidate = base / p
        if candidate.exists():
            spec["dataset"] = str(candidate)


# ----------------------------------------------------------------------------------------------------
# Overrides (`--set key=value`, and library callers' dicts)


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any], origin: dict[str, str]) -> None:
    for dotted, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, BaseModel):
            value = value.model_dump()
        parts = dotted.split(".")
        top = parts[0]
        if top in IGNORED_UPSTREAM_KEYS and len(parts) == 1:
            warn_ignored_key(top, OVERRIDES)
            continue
        if top not in Settings.model_fields:
            raise UserError(f"unknown key '{dotted}' in {OVERRIDES}{did_you_mean(top, Settings.model_fields)}")
        if len(parts) == 1:
            _override_top(data, top, value, origin)
        else:
            _override_sub(data, dotted, parts, value, origin)


def _override_top(data: dict[str, Any], key: str, value: Any, origin: dict[str, str]) -> None:
    if key in TABLES:
        if not isinstance(value, dict):
            raise UserError(f"'{key}' = {format_value(value)} in {OVERRIDES}: must be a table of keys")
        value = copy.deepcopy(value)
        _check_table_keys(key, value, TABLES[key], OVERRIDES)
        for sub in value:
            origin[f"{key}.{sub}"] = OVERRIDES
    data[key] = _parse_string_override(Settings.model_fields[key], value)
    origin[key] = OVERRIDES


def _override_sub(data: dict[str, Any], dotted: str, parts: list[str], value: Any, origin: dict[str, str]) -> None:
    top = parts[0]
    model = TABLES.get(top)
    if model is None or len(parts) != 2:
        raise UserError(f"unknown key '{dotted}' in {OVERRIDES}: '{top}' has no sub-keys")
    sub = parts[1]
    _check_table_keys(top, {sub: None}, model, OVERRIDES)
    if sub in IGNORED_PROMPT_SET_KEYS:
        return
    table = data.get(top)
    if not isinstance(table, dict):
        # Start from the default table so that one sub-key can be changed alone.
        default = Settings.model_fields[top].get_default(call_default_factory=True)
        table = drop_none(default.model_dump()) if default is not None else {}
        data[top] = table
    table[sub] = _parse_string_override(model.model_fields[sub], value)
    origin[f"{top}.{sub}"] = OVERRIDES


def _accepts_str(ann: Any) -> bool:
    """Any string at all (a Literal's words: `_literal_strings`)."""
    if ann is str:
        return True
    return get_origin(ann) in (Union, types.UnionType) and any(_accepts_str(a) for a in get_args(ann))


def _literal_strings(ann: Any) -> set[str]:
    if get_origin(ann) is Literal:
        return {a for a in get_args(ann) if isinstance(a, str)}
    if get_origin(ann) in (Union, types.UnionType):
        return set().union(*(_literal_strings(a) for a in get_args(ann)))
    return set()


def _parse_string_override(field: Any, value: Any) -> Any:
    """A command-line string for a non-string setting ("10", "true", '["float32"]') is read as TOML;
    for a number-or-word setting (gpus_per_worker: 0.5 or "auto") a word stays a string."""
    ann = field.annotation
    if not isinstance(value, str) or _accepts_str(ann) or get_origin(ann) is Literal or value in _literal_strings(ann):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value  # validation reports it with the expected type


# ----------------------------------------------------------------------------------------------------
# Validation (messages: messages.py)


def _validate(data: dict[str, Any], source: str, origin: dict[str, str]) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise UserError(explain(e.errors()[0], data, source, origin)) from None


# ----------------------------------------------------------------------------------------------------
# Writing TOML


def dump_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer: scalars, lists, inline tables, and one level of [tables] for our models."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in data.items():
        if k in TABLES and isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "-_" for c in key) and key.isascii():
        return key
    return json.dumps(key)
