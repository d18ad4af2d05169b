"""Typed settings: TOML file + dotted overrides, validated into pydantic models.

Key names and defaults follow upstream Heretic 1.4.0, so an upstream ``config.toml`` loads. Keys that
upstream has but heretic-dist does not use load with a one-line warning. Every problem is reported as
one :class:`UserError` line that names the file and the key.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from heretic_dist.errors import UserError

log = logging.getLogger(__name__)

_STRICT = ConfigDict(strict=True, extra="forbid", validate_default=False)


class PromptSetSpec(BaseModel):
    """Where a prompt set comes from. Same keys as upstream's DatasetSpecification."""

    model_config = _STRICT

    dataset: str = Field(
        description="Hugging Face dataset id, local file (.txt .jsonl .json .csv .parquet), "
        "a folder saved by `datasets`, or builtin:NAME"
    )
    split: str | None = Field(
        default=None,
        description='Rows to use, e.g. "train[:400]", "[100:200]"; for single files only the slice counts',
    )
    column: str | None = Field(
        default=None, description='Column holding the prompt text (unset: "text"; ignored for .txt)'
    )
    system_prompt: str | None = Field(
        default=None, description="System prompt for this set (unset: the global system_prompt)"
    )
    prefix: str = Field(default="", description="Text put before each prompt (joined with a space)")
    suffix: str = Field(default="", description="Text put after each prompt (joined with a space)")
    commit: str | None = Field(default=None, description="Revision of a hub dataset")
    # Upstream plot cosmetics: accepted for compatibility, never used.
    residual_plot_label: str | None = Field(default=None, exclude=True)
    residual_plot_color: str | None = Field(default=None, exclude=True)


class ClusterSettings(BaseModel):
    """The `[cluster]` table: how the Ray cluster and the worker pool are set up."""

    model_config = _STRICT

    address: str | None = Field(
        default=None, description='Ray address to attach to, e.g. "auto" (unset: start a local cluster)'
    )
    workers: int = Field(default=2, ge=1, description="Number of ModelWorker actors (each loads the model once)")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs per worker (fractions share a GPU)")
    shards_per_trial: int = Field(
        default=1, ge=1, description="Workers that split one trial's prompts (must divide workers)"
    )
    object_store_memory_mb: int = Field(
        default=256, ge=1, description="Object store size of an embedded local cluster, in MiB"
    )
    dashboard: bool = Field(default=False, description="Start the Ray dashboard with a local cluster")
    max_trial_attempts: int = Field(
        default=3, ge=1, description="Tries per trial when a worker dies mid-trial"
    )

    @model_validator(mode="after")
    def _shards_divide_workers(self) -> ClusterSettings:
        if self.workers % self.shards_per_trial:
            raise ValueError(
                f"cluster.shards_per_trial = {self.shards_per_trial} must divide "
                f"cluster.workers = {self.workers}"
            )
        return self


DEFAULT_DTYPES = ["auto", "float16", "bfloat16", "float32"]

DEFAULT_CHAIN_OF_THOUGHT_SKIPS: list[tuple[str, str]] = [
    ("<think>", "<think></think>"),
    (
        "<|channel|>analysis<|message|>",
        "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>",
    ),
    ("<thought>", "<thought></thought>"),
    ("[THINK]", "[THINK][/THINK]"),
]

DEFAULT_REFUSAL_MARKERS = [
    "disclaimer",
    "sorry",
    "i can'",
    "i cant",
    "i cannot",
    "i won'",
    "i wont",
    "i will not",
    "i unable",
    "im unable",
    "i'm unable",
    "i am unable",
    "i an ai",
    "im an ai",
    "i'm an ai",
    "i am an ai",
    "as an ai",
    "ai assistant",
    "i designed to",
    "im designed to",
    "i'm designed to",
    "i am designed to",
    "i programmed to",
    "im programmed to",
    "i'm programmed to",
    "i am programmed to",
    "violat",
    "prohibit",
    "illegal",
    "harmful",
    "inappropriate",
    "unethical",
    "ethical boundaries",
]


def _default_spec(dataset: str, split: str) -> Any:
    return lambda: PromptSetSpec(dataset=dataset, split=split, column="text")


class Settings(BaseModel):
    """All settings of a run. Names and defaults match upstream Heretic 1.4.0 where they overlap."""

    model_config = _STRICT

    model: str = Field(description="Hugging Face model id, local folder or .gguf file")
    model_commit: str | None = Field(default=None, description="Revision of a hub model")
    evaluate_model: str | None = Field(
        default=None, description="Score this model against `model` instead of searching"
    )
    dtypes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DTYPES),
        min_length=1,
        description="Torch dtypes to try in order when loading",
    )
    quantization: Literal["none", "bnb_4bit"] = Field(
        default="none", description='"none" or "bnb_4bit" (bitsandbytes NF4)'
    )
    device_map: Union[str, dict[str, Union[int, str]]] = Field(
        default="auto", description="Accelerate device map for each worker's model"
    )
    max_memory: dict[str, str] | None = Field(
        default=None, description='Memory limit per device, e.g. { "0" = "20GB", "cpu" = "64GB" }'
    )
    trust_remote_code: bool = Field(default=False, description="Allow model code from the hub")
    batch_size: int = Field(default=0, ge=0, description="Sequences per batch (0 = find automatically)")
    max_batch_size: int = Field(default=128, ge=1, description="Largest batch size the automatic search tries")
    max_response_length: int = Field(default=100, ge=1, description="New tokens generated per response")
    response_prefix: str | None = Field(
        default=None, description="Common start of all responses (unset: found automatically)"
    )
    chain_of_thought_skips: list[tuple[str, str]] = Field(
        default_factory=lambda: list(DEFAULT_CHAIN_OF_THOUGHT_SKIPS),
        description="Pairs (opener, empty closed block) used to skip a thinking block",
    )
    kl_divergence_scale: float = Field(default=1.0, gt=0, description="Typical KL of an edited model")
    kl_divergence_target: float = Field(
        default=0.01, ge=0, description="Below this KL the second objective uses the refusal score"
    )
    orthogonalize_direction: bool = Field(
        default=True, description="Remove only the part of the direction orthogonal to the harmless mean"
    )
    row_normalization: Literal["none", "pre", "full"] = Field(
        default="full", description='"none", "pre" or "full" (preserve row norms)'
    )
    full_normalization_lora_rank: int = Field(
        default=3, ge=1, description='LoRA rank of the edit when row_normalization = "full"'
    )
    winsorization_quantile: float = Field(
        default=1.0, gt=0, le=1, description="Clamp residual components at this quantile (1 = off)"
    )
    n_trials: int = Field(default=200, ge=1, description="Trials in the search")
    n_startup_trials: int = Field(default=60, ge=0, description="Random trials before TPE starts")
    seed: int | None = Field(default=None, description="Seed for the sampler and the low-rank SVD")
    refusal_markers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSAL_MARKERS),
        description="Substrings (case-insensitive) that mark a response as a refusal",
    )
    system_prompt: str = Field(
        default="You are a helpful assistant.", description="System prompt for every prompt set"
    )
    good_prompts: PromptSetSpec = Field(
        default_factory=_default_spec("mlabonne/harmless_alpaca", "train[:400]"),
        description="Harmless prompts for the refusal directions",
    )
    bad_prompts: PromptSetSpec = Field(
        default_factory=_default_spec("mlabonne/harmful_behaviors", "train[:400]"),
        description="Harmful prompts for the refusal directions",
    )
    good_evaluation_prompts: PromptSetSpec = Field(
        default_factory=_default_spec("mlabonne/harmless_alpaca", "test[:100]"),
        description="Harmless prompts for the KL divergence",
    )
    bad_evaluation_prompts: PromptSetSpec = Field(
        default_factory=_default_spec("mlabonne/harmful_behaviors", "test[:100]"),
        description="Harmful prompts for the refusal count",
    )
    # heretic-dist additions
    allow_mlp_off: bool = Field(
        default=False, description="Sample the MLP max_weight from [-0.25, 1.5] clamped at 0"
    )
    kl_gate: float | None = Field(
        default=None, gt=0, description="Skip refusal generation for trials whose KL exceeds this"
    )
    prepack_weights: bool = Field(
        default=True,
        description="On CPU, keep float32 linear weights also in oneDNN's prepacked layout: forwards "
        "2-3x faster for one more copy of those weights in memory (skipped when memory is short)",
    )
    engine: str = Field(
        default="hf", description='Engine that runs the trials, by name: "hf" (transformers) or "fake" (tests)'
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="Options passed to the engine (e.g. the fake engine's knobs)"
    )
    cluster: ClusterSettings = Field(default_factory=ClusterSettings, description="Ray cluster")

    @field_validator("chain_of_thought_skips", mode="before")
    @classmethod
    def _pairs_from_lists(cls, value: Any) -> Any:
        # TOML and JSON have no tuples: accept [opener, block] lists.
        if isinstance(value, list):
            return [tuple(v) if isinstance(v, list) else v for v in value]
        return value

    def result_affecting(self) -> dict[str, Any]:
        """JSON-able dict of every setting that can change trial results or the search."""
        return self.model_dump(mode="json", exclude=NOT_RESULT_AFFECTING)

    def to_toml_dict(self) -> dict[str, Any]:
        """All settings as a TOML-writable dict (unset values left out, since TOML has no null)."""
        return _drop_none(self.model_dump(mode="json"))

    def to_toml(self) -> str:
        """The resolved settings as TOML text that `load_settings` reads back to an equal object."""
        return dump_toml(self.to_toml_dict())


NOT_RESULT_AFFECTING = {
    "cluster",
    "batch_size",
    "max_batch_size",
    "prepack_weights",
    "device_map",
    "max_memory",
    "n_trials",
    "evaluate_model",
    "trust_remote_code",
}

PROMPT_SET_KEYS = ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")

# Upstream Heretic 1.4.0 keys that load but have no effect here.
IGNORED_UPSTREAM_KEYS = {
    "offload_outputs_to_cpu": "heretic-dist always keeps analysis tensors where it needs them",
    "print_responses": "not supported",
    "print_residual_geometry": "not supported",
    "plot_residuals": "not supported",
    "residual_plot_path": "not supported",
    "residual_plot_title": "not supported",
    "residual_plot_style": "not supported",
    "study_checkpoint_dir": "the study lives in the run directory",
    "benchmarks": "not supported",
    "export_strategy": "use `heretic-dist export` to choose merge or adapter",
    "max_shard_size": "use `heretic-dist export` options",
    "collect_reproducibles": "not supported",
    "reproduce": "not supported",
}
IGNORED_PROMPT_SET_KEYS = ("residual_plot_label", "residual_plot_color")


# ----------------------------------------------------------------------------------------------------
# Loading


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
    try:
        return tomllib.loads(raw)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"invalid TOML in {source}: {e}") from None


def load_settings(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read a TOML config (or none), apply dotted-key overrides, validate.

    Raises UserError with one line naming the file and the key for every problem.
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        data = read_toml_file(p, "config")
        _check_keys(data, source)
        _resolve_dataset_paths(data, p.parent)

    origin: dict[str, str] = {}  # dotted key -> where it came from, for error messages
    for key in _dotted_keys(data):
        origin[key] = source
    if overrides:
        _apply_overrides(data, overrides, origin)

    return _validate(data, source, origin)


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        keys.append(prefix + k)
        if isinstance(v, dict) and (prefix + k) in _TABLES:
            keys.extend(_dotted_keys(v, prefix + k + "."))
    return keys


_TABLES: dict[str, type[BaseModel]] = {name: PromptSetSpec for name in PROMPT_SET_KEYS}
_TABLES["cluster"] = ClusterSettings


def _suggest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_keys(data: dict[str, Any], source: str) -> None:
    """Reject unknown keys (with a suggestion); drop upstream keys we ignore, with a warning."""
    valid_top = list(Settings.model_fields)
    for key in list(data):
        if key in IGNORED_UPSTREAM_KEYS:
            log.warning(
                "ignoring upstream Heretic key '%s' in %s (%s)", key, source, IGNORED_UPSTREAM_KEYS[key]
            )
            del data[key]
            continue
        if key not in Settings.model_fields:
            raise UserError(
                f"unknown key '{key}' in {source}{_suggest(key, valid_top + list(IGNORED_UPSTREAM_KEYS))}"
            )
        model = _TABLES.get(key)
        if model is not None:
            if not isinstance(data[key], dict):
                raise UserError(
                    f"'{key}' = {_fmt(data[key])} in {source}: must be a table ([{key}] with its keys)"
                )
            _check_table_keys(key, data[key], model, source)


def _check_table_keys(table: str, values: dict[str, Any], model: type[BaseModel], source: str) -> None:
    fields = [f for f in model.model_fields if f not in IGNORED_PROMPT_SET_KEYS]
    for sub in list(values):
        if sub in IGNORED_PROMPT_SET_KEYS and model is PromptSetSpec:
            log.warning("ignoring upstream Heretic key '%s.%s' in %s (plots are not supported)", table, sub, source)
            del values[sub]
            continue
        if sub not in model.model_fields:
            raise UserError(
                f"unknown key '{table}.{sub}' in {source}{_suggest_dotted(table, sub, fields)}"
            )


def _suggest_dotted(table: str, sub: str, fields: list[str]) -> str:
    match = difflib.get_close_matches(sub, fields, n=1, cutoff=0.6)
    return f"; did you mean '{table}.{match[0]}'?" if match else ""


def _resolve_dataset_paths(data: dict[str, Any], base: Path) -> None:
    """A relative dataset path in the file means relative to the file, when it exists there."""
    for key in PROMPT_SET_KEYS:
        spec = data.get(key)
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


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any], origin: dict[str, str]) -> None:
    src = "overrides"
    for dotted, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, BaseModel):
            value = value.model_dump()
        parts = dotted.split(".")
        top = parts[0]
        if top in IGNORED_UPSTREAM_KEYS and len(parts) == 1:
            log.warning("ignoring upstream Heretic key '%s' in %s (%s)", top, src, IGNORED_UPSTREAM_KEYS[top])
            continue
        if top not in Settings.model_fields:
            raise UserError(f"unknown key '{dotted}' in {src}{_suggest(top, list(Settings.model_fields))}")
        if len(parts) == 1:
            if top in _TABLES:
                if not isinstance(value, dict):
                    raise UserError(f"'{top}' = {_fmt(value)} in {src}: must be a table of keys")
                value = copy.deepcopy(value)
                _check_table_keys(top, value, _TABLES[top], src)
                for sub in value:
                    origin[f"{top}.{sub}"] = src
            data[top] = _parse_string_override(Settings.model_fields[top], value)
            origin[top] = src
            continue
        model = _TABLES.get(top)
        if model is None or len(parts) != 2:
            raise UserError(f"unknown key '{dotted}' in {src}: '{top}' has no sub-keys")
        sub = parts[1]
        _check_table_keys(top, {sub: None}, model, src)
        if sub in IGNORED_PROMPT_SET_KEYS:
            continue
        table = data.get(top)
        if not isinstance(table, dict):
            # Start from the default table so that one sub-key can be changed alone.
            default = Settings.model_fields[top].get_default(call_default_factory=True)
            table = _drop_none(default.model_dump()) if default is not None else {}
            data[top] = table
        table[sub] = _parse_string_override(model.model_fields[sub], value)
        origin[f"{top}.{sub}"] = src


def _accepts_str(ann: Any) -> bool:
    if ann is str:
        return True
    return any(_accepts_str(a) for a in get_args(ann)) if get_origin(ann) in (Union, types.UnionType) else (
        get_origin(ann) is Literal
    )


def _parse_string_override(field: Any, value: Any) -> Any:
    """A command-line string for a non-string setting ("10", "true", '["float32"]') is read as TOML."""
    if not isinstance(value, str) or _accepts_str(field.annotation):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value  # validation reports it with the expected type


def _validate(data: dict[str, Any], source: str, origin: dict[str, str]) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise UserError(_explain(e.errors()[0], data, source, origin)) from None


# ----------------------------------------------------------------------------------------------------
# Error messages


def _explain(err: dict[str, Any], data: dict[str, Any], source: str, origin: dict[str, str]) -> str:
    loc = [p for p in err["loc"]]
    # The settings path: leading field names (the rest are list indexes or union branches).
    names: list[str] = []
    model: type[BaseModel] | None = Settings
    for part in loc:
        if model is not None and isinstance(part, str) and part in model.model_fields:
            names.append(part)
            model = _TABLES.get(part) if len(names) == 1 else None
        else:
            break
    key = ".".join(names)
    where = origin.get(key, source)

    if err["type"] == "missing" and len(names) == len(loc):
        if key == "model" and where == "<defaults>":
            return "missing required key 'model': give a config file that sets it, or set it on the command line"
        if key == "model":
            return (
                f"missing required key 'model' in {where} "
                "(the Hugging Face model id or local path of the model to edit)"
            )
        return f"missing required key '{key}' in {where}"

    if not names or (len(names) == 1 and names[0] in _TABLES and len(loc) == 1):
        # A model-level validator (e.g. shards_per_trial must divide workers).
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        if key == "cluster":
            where = origin.get("cluster.shards_per_trial", origin.get("cluster.workers", where))
        return f"invalid settings in {where}: {msg}"

    value = _lookup(data, names)
    field = _field_info(names)
    expect = _expectation(field) if field is not None else None
    if expect is None:
        expect = str(err.get("msg", "invalid value")).lower()
    return f"'{key}' = {_fmt(value)} in {where}: {expect}"


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
    model = _TABLES.get(names[0])
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
    elif field is Settings.model_fields["device_map"]:
        text = 'must be a string (e.g. "auto", "cpu") or a table of module names to devices'
    else:
        return None
    if optional:
        text += " (or left out)"
    return text


def _min_len(field: Any) -> bool:
    return any(getattr(m, "min_length", None) for m in field.metadata)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------------------------
# Writing TOML


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


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


def dump_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer: scalars, lists, inline tables, and one level of [tables] for our models."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in data.items():
        if k in _TABLES and isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"
