"""Upstream Heretic's config keys: those that load here with no effect, and those later versions moved.

Three upstream shapes load (the translation is in upstream_shapes.py):
- 1.4.0:  flat keys with our names; the keys in IGNORED_UPSTREAM_KEYS are dropped with one warning each
          instead of failing as unknown keys.
- master: (after 1.4.0) scorer plugins: a `scorers` list, `[scorer.<Class>]` tables holding the refusal
          markers and the evaluation prompt sets, headless answers (`trial_index`, ...) at the top level.
- 2.x:    modifier plugins as well: `modifiers = [{ plugin = ... }]` and `[modifier.Abliteration]` holding
          the direction prompt sets and the abliteration options.
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
PLOT_KEY_REASON = "plots are not supported"

# ----------------------------------------------------------------------------------------------------
# After 1.4.0 (master and 2.x)

_EXPORT = "`heretic-dist export RUN_DIR --trial N --out DIR` saves a trial"
LATER_UPSTREAM_KEYS: dict[str, str] = {  # top-level key -> why it has no equivalent here
    "checkpoint_action": "`run` continues its run directory; --new-run starts over",
    "n_additional_trials": "`run --n-trials N` extends a finished run",
    "trial_index": _EXPORT,
    "model_action": _EXPORT,
    "save_directory": _EXPORT,
    "upload_repo_id": "uploading is not supported",
    "upload_repo_private": "uploading is not supported",
    "upload_reproducibility_information": "uploading is not supported",
    "ignore_mismatches": "reproducing is not supported",
    "print_debug_information": "use `heretic-dist -v`",
}

KEYWORD_RATE = "heretic.scorers.keyword_rate.KeywordRate"
KL_DIVERGENCE = "heretic.scorers.kl_divergence.KLDivergence"
SCORER_CLASSES = {KEYWORD_RATE: "KeywordRate", KL_DIVERGENCE: "KLDivergence"}  # plugin -> class name
DEFAULT_SCORERS = [{"plugin": KEYWORD_RATE, "optimization": "minimize"},
                   {"plugin": KL_DIVERGENCE, "optimization": "minimize"}]
SCORER_ENTRY_KEYS = ("plugin", "optimization", "instance_name")

# [scorer.<Class>] key -> our key, or None when it has no equivalent (the reason: PLUGIN_KEY_REASONS)
SCORER_KEYS: dict[str, dict[str, str | None]] = {
    "KeywordRate": {
        "keyword_markers": "refusal_markers",
        "prompts": "bad_evaluation_prompts",
        "print_responses": None,
        "score_name": None,
    },
    "KLDivergence": {"prompts": "good_evaluation_prompts"},
}
PLUGIN_KEY_REASONS = {
    "print_responses": "not supported",
    "score_name": "the objective is always named refusals here",
}

ABLITERATION = "heretic.modifiers.abliteration.Abliteration"
MODIFIER_ENTRY_KEYS = ("plugin", "instance_name")
# [modifier.Abliteration] keys: each is the top-level key of the same name here (and in 1.4.0).
ABLITERATION_KEYS = (
    "good_prompts",
    "bad_prompts",
    "orthogonalize_direction",
    "row_normalization",
    "full_normalization_lora_rank",
    "winsorization_quantile",
)

# Upstream master and 2.x score raw rates: the keyword-match rate and the raw KL divergence.
RAW_OBJECTIVES = {"kl_divergence_scale": 1.0, "kl_divergence_target": 0.0}
RAW_OBJECTIVES_NOTE = (
    "kl_divergence_scale = 1, kl_divergence_target = 0 (upstream's objectives are raw rates: the KL "
    "objective is now the raw KL; the refusal objective stays refusals / baseline refusals, a fixed "
    "multiple of upstream's keyword rate, so the same trials make the Pareto front)"
)


def warn_ignored_key(key: str, source: str) -> None:
    log.warning("ignoring upstream Heretic key '%s' in %s (%s)", key, source, IGNORED_UPSTREAM_KEYS[key])


def warn_ignored_prompt_set_key(table: str, key: str, source: str) -> None:
    log.warning("ignoring upstream Heretic key '%s.%s' in %s (%s)", table, key, source, PLOT_KEY_REASON)
