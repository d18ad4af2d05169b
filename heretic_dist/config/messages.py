"""One-line messages for settings that fail validation: the key, its value, where it came from, and
what the key accepts in words ("'n_trials' = 0 in cfg.toml: must be an integer >= 1")."""

from __future__ import annotations

import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from .schema import TABLES, Settings


def explain(err: Any, data: dict[str, Any], source: str, origin: dict[str, str]) -> str:
    loc = list(err["loc"])
    # The settings path: leading field names (the rest are list indexes or union branches).
    names: list[str] = []
    model: type[BaseModel] | None = Settings
    for part in loc:
        if model is not None and isinstance(part, str) and part in model.model_fields:
            names.append(part)
            model = TABLES.get(part) if len(names) == 1 else None
        else:
            break
    key = ".".join(names)
    where = origin.get(key, source)
    msg = str(err.get("msg", "")).removeprefix("Value error, ")

    if err["type"] == "missing" and len(names) == len(loc):
        return _missing(key, where)
    if not names or (len(names) == 1 and names[0] in TABLES and len(loc) == 1):
        # A model-level validator (e.g. shards_per_trial must divide workers).
        if key == "cluster":
            where = origin.get("cluster.shards_per_trial", origin.get("cluster.workers", where))
        return f"invalid settings in {where}: {msg}"

    value = _lookup(data, names)
    field = _field_info(names)
    if err["type"] == "value_error":  # a field validator's own words (e.g. an unknown dtype)
        expect: str | None = msg
    else:
        expect = _expectation(field) if field is not None else None
    if expect is None:
        expect = str(err.get("msg", "invalid value")).lower()
    return f"'{key}' = {format_value(value)} in {where}: {expect}"


def _missing(key: str, where: str) -> str:
    if key == "model" and where == "<defaults>":
        return "missing required key 'model': give a config file that sets it, or set it on the command line"
    if key == "model":
        return f"missing required key 'model' in {where} (the Hugging Face model id or local path of the model to edit)"
    return f"missing required key '{key}' in {where}"


def _lookup(data: dict[str, Any], names: list[str]) -> Any:
    cur: Any = data
    for n in names:
        if not isinstance(cur, dict) or n not in cur:
            return None
        cur = cur[n]
    return cur


def _field_info(names: list[str]) -> Any:
    if len(names) == 1:
        return Settings.model_fields.get(names[0])
    model = TABLES.get(names[0])
    return model.model_fields.get(names[1]) if model is not None else None


def _bounds(field: Any) -> str:
    parts = []
    for m in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {v}")
    return " and ".join(parts)


def _expectation(field: Any) -> str | None:
    """What a field accepts, in words ("must be an integer >= 1"); None when there are no plain words."""
    ann = field.annotation
    optional = False
    args = get_args(ann)
    if get_origin(ann) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        optional = True
        if len(rest) == 1:
            ann = rest[0]
    bounds = _bounds(field)
    suffix = f" {bounds}" if bounds else ""
    if ann is bool:
        text = "must be true or false"
    elif ann is int:
        text = f"must be an integer{suffix}"
    elif ann is float:
        text = f"must be a number{suffix}"
    elif ann is str:
        text = "must be a string"
    elif get_origin(ann) is Literal:
        text = "must be one of " + ", ".join(f'"{a}"' for a in get_args(ann))
    elif get_origin(ann) is list and get_args(ann) == (str,):
        text = "must be a list of strings" + (" (at least one)" if _min_len(field) else "")
    elif get_origin(ann) is list and get_origin(get_args(ann)[0]) is tuple:
        text = 'must be a list of string pairs, e.g. [["<think>", "<think></think>"]]'
    elif get_origin(ann) is dict:
        text = 'must be a table of strings, e.g. { "0" = "20GB", "cpu" = "64GB" }'
    elif set(args) - {float} and all(a is float or get_origin(a) is Literal for a in args) and float in args:
        words = " or ".join(f'"{w}"' for a in args if a is not float for w in get_args(a))
        text = f"must be a number >= 0 or {words}"
    elif field is Settings.model_fields["device_map"]:
        text = 'must be a string (e.g. "auto", "cpu") or a table of module names to devices'
    else:
        return None
    if optional:
        text += " (or left out)"
    return text


def _min_len(field: Any) -> bool:
    return any(getattr(m, "min_length", None) for m in field.metadata)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
