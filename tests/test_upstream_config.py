"""Upstream Heretic configs in the shapes of 1.4.0, master (scorer plugins) and 2.x (modifier plugins)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from heretic_dist.config import check_table, load_settings
from heretic_dist.config.upstream_shapes import detect_shape, translate_upstream
from heretic_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO / "configs" / "upstream"
V1_4_0, MASTER, V2X = (UPSTREAM / f"heretic-{v}.toml" for v in ("1.4.0", "master", "2.x"))
MARKERS = ["disclaimer", "sorry", "i can'", "i cant", "i cannot", "i won'", "i will not", "as an ai",
           "illegal", "unethical"]
LOGGER = "heretic_dist.config"


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg, f"error must be one line: {msg!r}"
    return msg


def lines(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def load_logged(path: Path, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        return load_settings(path)


# ---------------------------------------------------------------------------------------------------
# The three example files


def test_1_4_0_example_loads_as_before_with_the_notice(caplog):
    s = load_logged(V1_4_0, caplog)
    (notice,) = lines(caplog, logging.INFO)
    assert notice.startswith(f"upstream Heretic 1.4.0 config in {V1_4_0}: translated nothing")
    assert s.refusal_markers == MARKERS and s.row_normalization == "pre"
    assert (s.kl_divergence_scale, s.kl_divergence_target) == (1.0, 0.01)  # 1.4.0's own objectives
    assert (s.good_prompts.dataset, s.good_prompts.split) == ("builtin:demo_harmless", "[:20]")
    assert (s.bad_evaluation_prompts.dataset, s.bad_evaluation_prompts.split) == ("builtin:demo_harmful", "[20:40]")
    warnings = lines(caplog, logging.WARNING)  # one per ignored key, as before
    for key in ("offload_outputs_to_cpu", "print_responses", "export_strategy", "good_prompts.residual_plot_label"):
        assert sum(f"'{key}'" in w for w in warnings) == 1, (key, warnings)


def test_master_example_translates_scorer_tables(caplog):
    s = load_logged(MASTER, caplog)
    (notice,) = lines(caplog, logging.INFO)
    assert notice.startswith(f"upstream Heretic master config in {MASTER}: translated ")
    for note in ("scorer.KeywordRate.keyword_markers -> refusal_markers",
                 "scorer.KeywordRate.prompts -> bad_evaluation_prompts",
                 "scorer.KLDivergence.prompts -> good_evaluation_prompts",
                 "kl_divergence_scale = 1, kl_divergence_target = 0"):
        assert note in notice
    assert s.refusal_markers == MARKERS
    assert (s.bad_evaluation_prompts.dataset, s.bad_evaluation_prompts.split) == ("builtin:demo_harmful", "[20:40]")
    assert (s.good_evaluation_prompts.dataset, s.good_evaluation_prompts.split) == ("builtin:demo_harmless", "[20:40]")
    assert (s.good_prompts.dataset, s.bad_prompts.split) == ("builtin:demo_harmless", "[:20]")
    assert (s.row_normalization, s.full_normalization_lora_rank, s.winsorization_quantile) == ("full", 2, 0.95)
    assert (s.kl_divergence_scale, s.kl_divergence_target) == (1.0, 0.0)  # raw KL, as upstream
    (warning,) = lines(caplog, logging.WARNING)
    assert warning.startswith(f"upstream Heretic master config in {MASTER}: no equivalent here, ignored: ")
    for key in ("n_additional_trials", "trial_index", "model_action", "save_directory", "checkpoint_action",
                "scorer.KeywordRate.print_responses", "export_strategy", "good_prompts.residual_plot_label"):
        assert key in warning, key


def test_2x_example_translates_modifier_tables(caplog):
    s = load_logged(V2X, caplog)
    (notice,) = lines(caplog, logging.INFO)
    assert notice.startswith(f"upstream Heretic 2.x config in {V2X}: translated modifiers = [Abliteration]")
    assert "modifier.Abliteration.{orthogonalize_direction, row_normalization" in notice
    assert "scorer.KeywordRate.keyword_markers -> refusal_markers" in notice
    assert s.orthogonalize_direction is False and s.row_normalization == "none"
    assert (s.full_normalization_lora_rank, s.winsorization_quantile) == (3, 1.0)
    assert (s.good_prompts.dataset, s.good_prompts.split) == ("builtin:demo_harmless", "[:20]")
    assert (s.bad_prompts.dataset, s.bad_prompts.split) == ("builtin:demo_harmful", "[:20]")
    assert s.bad_evaluation_prompts.split == "[20:40]" and s.refusal_markers == MARKERS
    assert (s.kl_divergence_scale, s.kl_divergence_target) == (1.0, 0.0)
    (warning,) = lines(caplog, logging.WARNING)
    for key in ("scorer.KeywordRate.score_name", "scorer.KeywordRate.print_responses", "print_debug_information"):
        assert key in warning, key


@pytest.mark.parametrize("path", [V1_4_0, MASTER, V2X], ids=["1.4.0", "master", "2.x"])
def test_check_no_model_passes(path):
    proc = subprocess.run([sys.executable, "-m", "heretic_dist", "check", str(path), "--no-model"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "is valid" in proc.stdout and "bad_evaluation_prompts: 20 prompts" in proc.stdout
    assert "upstream Heretic" in proc.stderr + proc.stdout


# ---------------------------------------------------------------------------------------------------
# Shapes and the pure translation


def test_detect_shape():
    assert detect_shape({"model": "m", "n_trials": 3}) is None
    assert detect_shape({"model": "m", "export_strategy": "merge"}) == "1.4.0"
    assert detect_shape({"good_prompts": {"dataset": "d", "residual_plot_color": "red"}}) == "1.4.0"
    assert detect_shape({"scorer": {}}) == "master" and detect_shape({"trial_index": 0}) == "master"
    assert detect_shape({"modifiers": [], "scorers": []}) == "2.x"


def test_translate_upstream_is_pure():
    raw = {"model": "m", "trial_index": 1,
           "scorer": {"KeywordRate": {"keyword_markers": ["no"], "prompts": {"dataset": "d", "split": "[:3]"}}}}
    before = repr(raw)
    t = translate_upstream(raw, "cfg")
    assert repr(raw) == before
    assert t.shape == "master"
    assert t.data == {"model": "m", "refusal_markers": ["no"],
                      "bad_evaluation_prompts": {"dataset": "d", "split": "[:3]"},
                      "kl_divergence_scale": 1.0, "kl_divergence_target": 0.0}
    assert t.translated[:2] == ["scorer.KeywordRate.keyword_markers -> refusal_markers",
                                "scorer.KeywordRate.prompts -> bad_evaluation_prompts"]
    assert [key for key, _ in t.no_equivalent] == ["trial_index"]


def test_own_config_gets_no_notice(tmp_path, caplog):
    s = load_logged(write(tmp_path, 'model = "m"\nn_trials = 3\n'), caplog)
    assert s.n_trials == 3 and lines(caplog, logging.INFO) == [] and lines(caplog, logging.WARNING) == []


def test_explicit_kl_keys_in_a_master_config_are_kept(tmp_path, caplog):
    s = load_logged(write(tmp_path, 'model = "m"\nkl_divergence_target = 0.05\ntrial_index = 0\n'), caplog)
    assert (s.kl_divergence_scale, s.kl_divergence_target) == (1.0, 0.05)
    assert "kl_divergence_target kept as written" in lines(caplog, logging.INFO)[0]


def test_instance_tables_override_the_class_table(tmp_path, caplog):
    cfg = write(tmp_path, """
model = "m"
scorers = [
    { plugin = "heretic.scorers.keyword_rate.KeywordRate", optimization = "minimize", instance_name = "small" },
    { plugin = "heretic.scorers.kl_divergence.KLDivergence", optimization = "minimize" },
]
[scorer.KeywordRate.prompts]
dataset = "builtin:demo_harmful"
split = "[20:40]"
[scorer.KeywordRate_small.prompts]
split = "[20:30]"
""")
    s = load_logged(cfg, caplog)
    assert (s.bad_evaluation_prompts.dataset, s.bad_evaluation_prompts.split) == ("builtin:demo_harmful", "[20:30]")
    assert "scorer.KeywordRate_small.prompts -> bad_evaluation_prompts" in lines(caplog, logging.INFO)[0]


def test_scorers_we_do_not_have_are_named_in_the_warning(tmp_path, caplog):
    cfg = write(tmp_path, """
model = "m"
scorers = [
    { plugin = "heretic.scorers.keyword_rate.KeywordRate", optimization = "minimize" },
    { plugin = "heretic.scorers.llm_judge.LLMJudge", optimization = "none" },
]
[scorer.LLMJudge]
model = "judge"
""")
    load_logged(cfg, caplog)
    (warning,) = lines(caplog, logging.WARNING)
    for part in ("scorers: heretic.scorers.llm_judge.LLMJudge", "[scorer.LLMJudge]", "scorers without KLDivergence"):
        assert part in warning, part


def test_check_table_translates_a_batch_layer(caplog):
    layer = {"model": "m", "scorer.KeywordRate.keyword_markers": ["no"],
             "modifier": {"Abliteration": {"row_normalization": "pre"}}}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        checked = check_table(layer, "manifest [defaults]")
    assert checked["refusal_markers"] == ["no"] and checked["row_normalization"] == "pre"
    assert "scorer" not in checked and "modifier" not in checked
    assert lines(caplog, logging.INFO)[0].startswith("upstream Heretic 2.x config in manifest [defaults]: ")


# ---------------------------------------------------------------------------------------------------
# Refusals: one line each


def test_other_modifier_is_refused_with_one_line(tmp_path):
    cfg = write(tmp_path, 'model = "m"\nmodifiers = [{ plugin = "heretic.modifiers.ara.ARA" }]\n')
    msg = error_of(load_settings, cfg)
    assert msg == (f"modifier plugin 'heretic.modifiers.ara.ARA' in {cfg} is not supported: heretic-dist "
                   "implements only Abliteration (heretic.modifiers.abliteration.Abliteration)")
    abliteration = '{ plugin = "heretic.modifiers.abliteration.Abliteration" }'
    two = write(tmp_path, f'model = "m"\nmodifiers = [{abliteration}, {abliteration}]\n', "two.toml")
    assert "lists 2 modifiers: give exactly one" in error_of(load_settings, two)


@pytest.mark.parametrize("text, expected", [
    ('[scorer.KeywordRate]\nkeyword_marker = ["x"]\n',
     "unknown key 'scorer.KeywordRate.keyword_marker' in {cfg}; did you mean 'scorer.KeywordRate.keyword_markers'?"),
    ('[scorer.KLDivergence.prompts]\ndataset = "d"\nsplt = "[:1]"\n',
     "unknown key 'scorer.KLDivergence.prompts.splt' in {cfg}; did you mean 'scorer.KLDivergence.prompts.split'?"),
    ('[modifier.Abliteration]\nrow_normalisation = "pre"\n',
     "unknown key 'modifier.Abliteration.row_normalisation' in {cfg}; did you mean "
     "'modifier.Abliteration.row_normalization'?"),
    ('scorers = [{ plugin = "heretic.scorers.kl_divergence.KLDivergence", optimisation = "minimize" }]\n',
     "unknown key 'optimisation' in scorers entry 1 in {cfg}; did you mean 'optimization'?"),
    ('[scorer.KeywordRate]\nprompts = [{ dataset = "a" }, { dataset = "b" }]\n',
     "'scorer.KeywordRate.prompts' in {cfg} must be one table of dataset keys ([scorer.KeywordRate.prompts] "
     "with dataset, split, column, ...)"),
    ('refusal_markers = ["a"]\n[scorer.KeywordRate]\nkeyword_markers = ["b"]\n',
     "'refusal_markers' and 'scorer.KeywordRate.keyword_markers' in {cfg} are the same setting with different "
     "values: keep one of them"),
])
def test_plugin_table_errors_are_one_clear_line(tmp_path, text, expected):
    cfg = write(tmp_path, 'model = "m"\n' + text)
    assert error_of(load_settings, cfg) == expected.format(cfg=cfg)


def test_unknown_top_level_key_of_a_master_config_still_fails(tmp_path):
    cfg = write(tmp_path, 'model = "m"\ntrial_index = 0\nn_trails = 3\n')
    assert error_of(load_settings, cfg) == f"unknown key 'n_trails' in {cfg}; did you mean 'n_trials'?"
