"""Typed settings: TOML file + dotted overrides, validated into pydantic models.

Key names and defaults follow upstream Heretic 1.4.0, so an upstream ``config.toml`` loads; one in the
later shapes (master's scorer plugin tables, 2.x's modifier tables) is translated to ours with one notice
line. Keys that upstream has but heretic-dist does not use load with a warning. Every problem is reported
as one :class:`UserError` line that names the file and the key.

- schema.py           the models (Settings, PromptSetSpec, ClusterSettings) and their defaults
- load.py             TOML files, `--set` overrides, the layered merge batch manifests use, dump_toml
- messages.py         the wording of validation errors
- upstream.py         upstream keys: those that load with no effect (and their warnings), those moved later
- upstream_shapes.py  upstream configs of each shape (1.4.0, master, 2.x) translated to ours
"""

from .load import (
    check_table,
    did_you_mean,
    dump_toml,
    load_settings,
    merge_tables,
    parse_toml,
    read_toml_file,
    settings_from_layers,
)
from .schema import (
    DEFAULT_CHAIN_OF_THOUGHT_SKIPS,
    DEFAULT_DTYPES,
    DEFAULT_REFUSAL_MARKERS,
    PROMPT_SET_KEYS,
    VALID_DTYPES,
    ClusterSettings,
    PromptSetSpec,
    Settings,
    cluster_count,
    runtime_only,
)
from .upstream import IGNORED_PROMPT_SET_KEYS, IGNORED_UPSTREAM_KEYS

__all__ = [
    "DEFAULT_CHAIN_OF_THOUGHT_SKIPS",
    "DEFAULT_DTYPES",
    "DEFAULT_REFUSAL_MARKERS",
    "IGNORED_PROMPT_SET_KEYS",
    "IGNORED_UPSTREAM_KEYS",
    "PROMPT_SET_KEYS",
    "VALID_DTYPES",
    "ClusterSettings",
    "PromptSetSpec",
    "Settings",
    "check_table",
    "cluster_count",
    "did_you_mean",
    "dump_toml",
    "load_settings",
    "merge_tables",
    "parse_toml",
    "read_toml_file",
    "runtime_only",
    "settings_from_layers",
]
