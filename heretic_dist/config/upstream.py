"""Upstream Heretic 1.4.0 keys that load here but have no effect, and the warning each one gets.

An upstream `config.toml` must load unchanged, so these keys are dropped with one warning line each
instead of failing as unknown keys.
"""

from __future__ import annotations

import logging

# The package's logger name, as before the split: users filter "heretic_dist.config".
log = logging.getLogger(__package__)

IGNORED_UPSTREAM_KEYS: dict[str, str] = {  # key -> why it has no effect here
    "offload_outputs_to_cpu": "heretic-dist always keeps analysis tensors where it needs them",
    "print_responses": "not supported",
    "study_checkpoint_dir": "the study lives in the run directory",
    "benchmarks": "not supported",
    "export_strategy": "use `heretic-dist export` to choose merge or adapter",
    "max_shard_size": "use `heretic-dist export` options",
    "collect_reproducibles": "not supported",
    "reproduce": "not supported",
}

# Keys of a prompt-set table (upstream's DatasetSpecification) that only style its plots.
IGNORED_PROMPT_SET_KEYS = ("residual_plot_label", "residual_plot_color")


def warn_ignored_key(key: str, source: str) -> None:
    log.warning("ignoring upstream Heretic key '%s' in %s (%s)", key, source, IGNORED_UPSTREAM_KEYS[key])


def warn_ignored_prompt_set_key(table: str, key: str, source: str) -> None:
    log.warning("ignoring upstream Heretic key '%s.%s' in %s (plots are not supported)", table, key, source)
