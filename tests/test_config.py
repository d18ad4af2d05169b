"""Settings: TOML loading, overrides, validation messages, upstream compatibility, default.toml."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from heretic_dist.config import (
    DEFAULT_REFUSAL_MARKERS,
    VALID_DTYPES,
    ClusterSettings,
    PromptSetSpec,
    Settings,
    check_table,
    did_you_mean,
    load_settings,
    merge_tables,
    settings_from_layers,
)
from heretic_dist.config.evaluation import EvaluationSettings
from heretic_dist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_TOML = REPO / "configs" / "default.toml"


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, f"error must be one line: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------------
# Defaults and upstream parity


def test_defaults_match_upstream_1_4_0():
    s = Settings(model="m")
    assert s.dtypes == ["auto", "float16", "bfloat16", "float32"]
    assert s.quantization == "none" and s.device_map == "auto" and s.max_memory is None
    assert (s.batch_size, s.max_batch_size, s.max_response_length) == (0, 128, 100)
    assert (s.kl_divergence_scale, s.kl_divergence_target) == (1.0, 0.01)
    assert s.orthogonalize_direction is True and s.row_normalization == "full"
    assert s.full_normalization_lora_rank == 3 and s.winsorization_quantile == 1.0
    assert (s.n_trials, s.n_startup_trials, s.seed) == (200, 60, None)
    assert s.system_prompt == "You are a helpful assistant."
    assert len(s.refusal_markers) == 33 and len(set(s.refusal_markers)) == 33
    assert s.refusal_markers[0] == "disclaimer" and s.refusal_markers[-1] == "ethical boundaries"
    assert len(s.chain_of_thought_skips) == 4
    assert s.chain_of_thought_skips[0] == ("<think>", "<think></think>")
    assert s.good_prompts == PromptSetSpec(dataset="mlabonne/harmless_alpaca", split="train[:400]", column="text")
    assert s.bad_prompts.dataset == "mlabonne/harmful_behaviors" and s.bad_prompts.split == "train[:400]"
    assert s.good_evaluation_prompts.split == "test[:100]" and s.bad_evaluation_prompts.split == "test[:100]"
    assert s.allow_mlp_off is False and s.kl_gate is None and s.trust_remote_code is False
    assert s.cluster == ClusterSettings()
    assert (s.cluster.workers, s.cluster.shards_per_trial, s.cluster.max_trial_attempts) == (2, 1, 3)


def test_default_lists_are_not_shared_between_instances():
    a, b = Settings(model="a"), Settings(model="b")
    a.refusal_markers.append("x")
    assert len(b.refusal_markers) == 33 and len(DEFAULT_REFUSAL_MARKERS) == 33


def test_upstream_example_config_loads_with_a_warning(caplog):
    example = SHARED / "scripts" / "upstream" / "example-config.toml"
    if not example.is_file():
        pytest.skip(f"shared upstream example not found at {example} (../shared beside the repo)")
    with caplog.at_level(logging.WARNING, logger="heretic_dist.config"):
        s = load_settings(example)
    assert s.dtypes == ["float32"] and s.device_map == "cpu" and s.batch_size == 16
    assert (s.n_trials, s.n_startup_trials, s.seed, s.max_response_length) == (6, 3, 42, 30)
    assert s.good_prompts.dataset.endswith("harmless_train.txt") and s.good_prompts.split is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("export_strategy" in w for w in warnings)


def test_every_ignored_upstream_key_loads_with_one_warning(tmp_path, caplog):
    cfg = write(
        tmp_path,
        """
model = "m"
offload_outputs_to_cpu = true
print_responses = true
print_residual_geometry = false
plot_residuals = false
residual_plot_path = "plots"
residual_plot_title = "t"
residual_plot_style = "dark_background"
study_checkpoint_dir = "checkpoints"
export_strategy = "merge"
max_shard_size = "5GB"
collect_reproducibles = "x"
reproduce = "r.json"
benchmarks = [{ task = "mmlu", name = "MMLU", description = "d" }]
[good_prompts]
dataset = "mlabonne/harmless_alpaca"
split = "train[:400]"
column = "text"
residual_plot_label = "Harmless"
residual_plot_color = "royalblue"
""",
    )
    with caplog.at_level(logging.WARNING, logger="heretic_dist.config"):
        s = load_settings(cfg)
    msgs = [r.getMessage() for r in caplog.records]
    for key in ("offload_outputs_to_cpu", "benchmarks", "reproduce", "good_prompts.residual_plot_label"):
        assert sum(f"'{key}'" in m for m in msgs) == 1, (key, msgs)
    assert all("\n" not in m for m in msgs)
    assert s.good_prompts.column == "text"


# ---------------------------------------------------------------------------------------------------
# Errors: one line, naming the file and the key


def test_unknown_key_suggests_closest(tmp_path):
    cfg = write(tmp_path, 'model = "m"\nn_trails = 10\n')
    msg = error_of(load_settings, cfg)
    assert msg == f"unknown key 'n_trails' in {cfg}; did you mean 'n_trials'?"


def test_unknown_key_in_table_suggests_dotted(tmp_path):
    cfg = write(tmp_path, 'model = "m"\n[cluster]\nworkrs = 4\n')
    assert error_of(load_settings, cfg) == f"unknown key 'cluster.workrs' in {cfg}; did you mean 'cluster.workers'?"
    cfg = write(tmp_path, 'model = "m"\n[bad_prompts]\ndataset = "x.txt"\nsplti = "[:3]"\n')
    assert "'bad_prompts.split'" in error_of(load_settings, cfg)


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path):
    cfg = write(tmp_path, 'model = "m"\nzzzzqqq = 1\n')
    assert error_of(load_settings, cfg) == f"unknown key 'zzzzqqq' in {cfg}"


@pytest.mark.parametrize(
    "line, key, expect",
    [
        ("n_trials = -3", "n_trials", "must be an integer >= 1"),
        ('n_trials = "ten"', "n_trials", "must be an integer >= 1"),
        ("n_trials = 2.5", "n_trials", "must be an integer >= 1"),
        ("batch_size = -1", "batch_size", "must be an integer >= 0"),
        ("kl_divergence_scale = 0", "kl_divergence_scale", "must be a number > 0"),
        ("kl_divergence_target = -0.1", "kl_divergence_target", "must be a number >= 0"),
        ("winsorization_quantile = 1.5", "winsorization_quantile", "must be a number > 0 and <= 1"),
        ("winsorization_quantile = 0.0", "winsorization_quantile", "must be a number > 0 and <= 1"),
        ('orthogonalize_direction = "yes"', "orthogonalize_direction", "must be true or false"),
        ("orthogonalize_direction = 1", "orthogonalize_direction", "must be true or false"),
        ('row_normalization = "post"', "row_normalization", 'must be one of "none", "pre", "full"'),
        ('quantization = "int8"', "quantization", 'must be one of "none", "bnb_4bit"'),
        ("system_prompt = 3", "system_prompt", "must be a string"),
        ('refusal_markers = "sorry"', "refusal_markers", "must be a list of strings"),
        ("refusal_markers = [1, 2]", "refusal_markers", "must be a list of strings"),
        ("dtypes = []", "dtypes", "must be a list of strings (at least one)"),
        ("kl_gate = 0", "kl_gate", "must be a number > 0 (or left out)"),
        ('seed = "x"', "seed", "must be an integer (or left out)"),
        ('chain_of_thought_skips = [["a"]]', "chain_of_thought_skips", "string pairs"),
        ("device_map = 0", "device_map", "must be a string"),
    ],
)
def test_wrong_type_or_range_names_key_value_and_file(tmp_path, line, key, expect):
    cfg = write(tmp_path, f'model = "m"\n{line}\n')
    msg = error_of(load_settings, cfg)
    value = line.split("=", 1)[1].strip()
    assert msg.startswith(f"'{key}' = "), msg
    assert f" in {cfg}: " in msg and expect in msg
    if not value.startswith("["):
        assert f"= {value} in" in msg


def test_wrong_value_in_table(tmp_path):
    cfg = write(tmp_path, 'model = "m"\n[cluster]\nworkers = 0\n')
    assert error_of(load_settings, cfg) == f"'cluster.workers' = 0 in {cfg}: must be an integer >= 1"
    cfg = write(tmp_path, 'model = "m"\n[cluster]\ngpus_per_worker = -0.5\n')
    assert "'cluster.gpus_per_worker' = -0.5" in error_of(load_settings, cfg)
    cfg = write(tmp_path, 'model = "m"\n[good_prompts]\ndataset = "x.txt"\nsplit = 3\n')
    assert error_of(load_settings, cfg) == f"'good_prompts.split' = 3 in {cfg}: must be a string (or left out)"


def test_table_key_given_as_scalar(tmp_path):
    cfg = write(tmp_path, 'model = "m"\ncluster = 3\n')
    assert "'cluster' = 3" in error_of(load_settings, cfg)


def test_prompt_table_without_dataset(tmp_path):
    cfg = write(tmp_path, 'model = "m"\n[bad_prompts]\nsplit = "[:5]"\n')
    assert error_of(load_settings, cfg) == f"missing required key 'bad_prompts.dataset' in {cfg}"


def test_shards_must_divide_workers(tmp_path):
    cfg = write(tmp_path, 'model = "m"\n[cluster]\nworkers = 4\nshards_per_trial = 3\n')
    msg = error_of(load_settings, cfg)
    assert str(cfg) in msg and "shards_per_trial = 3 must divide cluster.workers = 4" in msg
    assert load_settings(cfg, {"cluster.shards_per_trial": 2}).cluster.shards_per_trial == 2
    with pytest.raises(ValueError):
        ClusterSettings(workers=3, shards_per_trial=2)


def test_missing_model(tmp_path):
    cfg = write(tmp_path, "n_trials = 3\n")
    msg = error_of(load_settings, cfg)
    assert msg.startswith(f"missing required key 'model' in {cfg}")
    assert "model" in error_of(load_settings, None)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    cfg = write(tmp_path, 'model = "m"\nn_trials = \nseed = 1\n')
    msg = error_of(load_settings, cfg)
    assert msg.startswith(f"invalid TOML in {cfg}:") and "line 2" in msg


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    assert error_of(load_settings, missing) == f"config file not found: {missing}"
    assert "not a file" in error_of(load_settings, tmp_path)


def test_n_startup_trials_may_exceed_n_trials(tmp_path):
    s = load_settings(write(tmp_path, 'model = "m"\nn_trials = 5\nn_startup_trials = 60\n'))
    assert (s.n_trials, s.n_startup_trials) == (5, 60)


# ---------------------------------------------------------------------------------------------------
# Overrides


def test_overrides_apply_on_top_of_the_file(tmp_path):
    cfg = write(tmp_path, 'model = "m"\nn_trials = 50\n[cluster]\nworkers = 2\ndashboard = true\n')
    s = load_settings(
        cfg,
        {"n_trials": 10, "cluster.workers": 4, "good_prompts.split": "[:20]", "seed": None, "model": None},
    )
    assert s.n_trials == 10 and s.model == "m" and s.seed is None
    assert s.cluster.workers == 4 and s.cluster.dashboard is True  # other table keys kept
    # A sub-key of a table absent from the file starts from that table's defaults.
    assert s.good_prompts == PromptSetSpec(dataset="mlabonne/harmless_alpaca", split="[:20]", column="text")


def test_overrides_without_a_file():
    s = load_settings(None, {"model": "m", "cluster.shards_per_trial": 2, "cluster.workers": 4})
    assert s.model == "m" and s.cluster.shards_per_trial == 2


def test_override_strings_are_parsed_for_non_string_settings():
    s = load_settings(
        None,
        {"model": "m", "n_trials": "12", "orthogonalize_direction": "false", "dtypes": '["float32"]',
         "cluster.gpus_per_worker": "0.5", "system_prompt": "42"},
    )
    assert s.n_trials == 12 and s.orthogonalize_direction is False and s.dtypes == ["float32"]
    assert s.cluster.gpus_per_worker == 0.5 and s.system_prompt == "42"


def test_override_errors_name_the_override(tmp_path):
    cfg = write(tmp_path, 'model = "m"\n')
    assert error_of(load_settings, cfg, {"n_trails": 3}) == "unknown key 'n_trails' in overrides; did you mean 'n_trials'?"
    assert "'cluster.wrkers'" in error_of(load_settings, cfg, {"cluster.wrkers": 3})
    assert error_of(load_settings, cfg, {"n_trials": -3}) == "'n_trials' = -3 in overrides: must be an integer >= 1"
    assert "has no sub-keys" in error_of(load_settings, cfg, {"n_trials.x": 1})
    # A bad value in the file is still blamed on the file.
    cfg2 = write(tmp_path, 'model = "m"\nseed = "x"\n', "cfg2.toml")
    assert f"in {cfg2}" in error_of(load_settings, cfg2, {"n_trials": 3})


def test_whole_table_override():
    s = load_settings(None, {"model": "m", "cluster": {"workers": 6, "shards_per_trial": 3}})
    assert s.cluster.workers == 6 and s.cluster.shards_per_trial == 3


# ---------------------------------------------------------------------------------------------------
# Paths


def test_relative_dataset_resolved_against_config_dir(tmp_path, monkeypatch):
    cfgdir = tmp_path / "cfgs"
    cfgdir.mkdir()
    (cfgdir / "good.txt").write_text("a\n")
    cfg = write(
        cfgdir,
        'model = "m"\n[good_prompts]\ndataset = "good.txt"\n[bad_prompts]\ndataset = "elsewhere.txt"\n'
        '[good_evaluation_prompts]\ndataset = "builtin:demo"\n',
    )
    monkeypatch.chdir(tmp_path)
    s = load_settings(cfg)
    assert Path(s.good_prompts.dataset) == cfgdir / "good.txt"
    assert s.bad_prompts.dataset == "elsewhere.txt"  # not beside the config: left for the cwd
    assert s.good_evaluation_prompts.dataset == "builtin:demo"
    # An override is relative to the cwd, not to the config.
    s = load_settings(cfg, {"good_prompts.dataset": "good.txt"})
    assert s.good_prompts.dataset == "good.txt"


# ---------------------------------------------------------------------------------------------------
# result_affecting and writing back


def test_result_affecting_contains_search_settings_only():
    s = Settings(model="m")
    ra = s.result_affecting()
    json.dumps(ra)  # JSON-able
    speed_only = {"cluster", "batch_size", "max_batch_size", "prepack_weights", "draft_tokens", "device_map",
                  "max_memory", "n_trials", "evaluate_model", "trust_remote_code", "engine_options",
                  # research mode's keys (plots and tables, never trial results)
                  "print_residual_geometry", "plot_residuals", "residual_plot_path", "residual_plot_title",
                  "residual_plot_style",
                  # read after the search (evaluate-front), never by a trial
                  "evaluation"}
    assert not speed_only & set(ra)
    expected = set(Settings.model_fields) - speed_only
    assert set(ra) == expected
    assert "residual_plot_label" not in ra["good_prompts"]
    assert ra["chain_of_thought_skips"][0] == ["<think>", "<think></think>"]


def test_result_affecting_changes_exactly_when_results_can():
    base = Settings(model="m").result_affecting()
    same = load_settings(None, {"model": "m", "n_trials": 7, "cluster.workers": 8, "batch_size": 4,
                                "device_map": "cpu", "trust_remote_code": True}).result_affecting()
    assert same == base
    for key, value in [("seed", 1), ("kl_gate", 0.5), ("allow_mlp_off", True), ("n_startup_trials", 3),
                       ("good_prompts.split", "train[:10]"), ("system_prompt", "x"), ("row_normalization", "pre")]:
        assert load_settings(None, {"model": "m", key: value}).result_affecting() != base, key


def test_to_toml_round_trips(tmp_path):
    s = load_settings(
        None,
        {"model": "m", "seed": 7, "kl_gate": 0.25, "max_memory": {"0": "20GB", "cpu": "64GB"},
         "device_map": {"model.layers.0": 0, "lm_head": "cpu"}, "system_prompt": 'say "hi"\n',
         "bad_prompts.prefix": "Q:", "cluster.address": "auto"},
    )
    cfg = write(tmp_path, s.to_toml(), "resolved.toml")
    assert load_settings(cfg) == s
    assert "null" not in s.to_toml() and "None" not in json.dumps(s.to_toml_dict())


# ---------------------------------------------------------------------------------------------------
# configs/default.toml


def test_default_toml_loads_and_equals_the_defaults():
    s = load_settings(DEFAULT_TOML)
    assert s.model
    assert s == Settings(model=s.model)


def _all_keys() -> list[str]:
    keys = [k for k in Settings.model_fields]
    for table in ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts"):
        keys += [f"{table}.{k}" for k in PromptSetSpec.model_fields if not k.startswith("residual_plot")]
    keys += [f"cluster.{k}" for k in ClusterSettings.model_fields]
    keys += [f"evaluation.{k}" for k in EvaluationSettings.model_fields]
    return keys


def test_default_toml_mentions_every_key_with_a_comment():
    lines = DEFAULT_TOML.read_text(encoding="utf-8").splitlines()
    table = ""
    seen: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = re.match(r"^\[(\w+)\]\s*$", line)
        if m:
            table = m.group(1)
            seen[table] = i
            continue
        m = re.match(r"^#?\s?(\w+) = ", line)
        if m and not line.startswith("#  "):
            seen[f"{table}.{m.group(1)}" if table else m.group(1)] = i
    for key in _all_keys():
        assert key in seen, f"{key} missing from configs/default.toml"
        if not key.endswith(".dataset") and key not in ("model",):
            # A one-line comment right above each key.
            above = lines[seen[key] - 1]
            assert above.startswith("# ") and not re.match(r"^# ?\w+ = ", above), key


def test_default_toml_commented_examples_are_valid(tmp_path):
    """Un-commenting every example value still gives a valid config."""
    text = DEFAULT_TOML.read_text(encoding="utf-8")
    uncommented = re.sub(r"(?m)^# (\w+ = )", r"\1", text)
    s = load_settings(write(tmp_path, uncommented))
    assert s.seed == 42 and s.kl_gate == 1.0 and s.cluster.address == "auto"


# ---------------------------------------------------------------------------------------------------
# Runtime-only fields are marked on the field


OLD_NOT_RESULT_AFFECTING = {"cluster", "batch_size", "max_batch_size", "prepack_weights", "device_map",
                            "max_memory", "n_trials", "evaluate_model", "trust_remote_code"}


def test_result_affecting_equals_the_old_explicit_list():
    for s in (Settings(model="m"),
              load_settings(None, {"model": "m", "seed": 3, "engine": "fake", "engine_options": {"x": 1},
                                   "max_memory": {"0": "1GB"}, "cluster.workers": 4})):
        assert s.result_affecting() == s.model_dump(mode="json", exclude=OLD_NOT_RESULT_AFFECTING | NEW_RUNTIME_ONLY)
    # engine_options (new, runtime-only: how an engine runs, e.g. the fake's sleeps) and research mode's
    # plot/table keys join the old list
    assert Settings.runtime_only_fields() == OLD_NOT_RESULT_AFFECTING | NEW_RUNTIME_ONLY


NEW_RUNTIME_ONLY = {"engine_options", "print_residual_geometry", "plot_residuals", "residual_plot_path",
                    "residual_plot_title", "residual_plot_style", "evaluation", "draft_tokens"}


def test_engine_is_result_affecting_and_its_options_are_not():
    ra = Settings(model="m", engine="fake", engine_options={"fake_trial_seconds": 0.5}).result_affecting()
    assert ra["engine"] == "fake" and "engine_options" not in ra
    assert Settings(model="m").result_affecting() != ra
    assert Settings(model="m", engine="fake").result_affecting() == ra


def test_runtime_only_marker_is_on_the_field():
    from heretic_dist.config.schema import is_runtime_only

    assert is_runtime_only(Settings.model_fields["n_trials"])
    assert not is_runtime_only(Settings.model_fields["seed"])


# ---------------------------------------------------------------------------------------------------
# dtypes are checked with the config, not at model load


def test_unknown_dtype_is_refused_by_the_config(tmp_path):
    cfg = write(tmp_path, 'model = "m"\ndtypes = ["auto", "float13"]\n')
    msg = error_of(load_settings, cfg)
    assert msg.startswith(f"'dtypes' = [\"auto\", \"float13\"] in {cfg}: "), msg
    assert '"float13"' in msg.split(": ", 1)[1]
    for name in VALID_DTYPES:
        assert f'"{name}"' in msg
    assert error_of(load_settings, cfg, {"dtypes": '["bf16"]'}).startswith("'dtypes' = [\"bf16\"] in overrides: ")


def test_every_valid_dtype_loads(tmp_path):
    assert {"auto", "float16", "bfloat16", "float32", "float64"} <= set(VALID_DTYPES)
    cfg = write(tmp_path, f'model = "m"\ndtypes = {json.dumps(list(VALID_DTYPES))}\n')
    assert load_settings(cfg).dtypes == list(VALID_DTYPES)


# ---------------------------------------------------------------------------------------------------
# Python 3.10: tomllib's backport


def test_tomli_is_a_dependency_on_python_3_10():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert "tomli>=2; python_version < '3.11'" in deps


def test_toml_reader_falls_back_to_tomli(monkeypatch):
    """Without tomllib (Python 3.10) config/load.py reads TOML with the `tomli` module."""
    import importlib.util
    import sys
    import types

    fake = types.ModuleType("tomli")
    fake.TOMLDecodeError = ValueError
    fake.loads = lambda text: {"read_by": "tomli"}
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now fails like on 3.10
    monkeypatch.setitem(sys.modules, "tomli", fake)
    path = REPO / "heretic_dist" / "config" / "load.py"
    spec = importlib.util.spec_from_file_location("heretic_dist.config._load_on_py310", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.tomllib is fake
    assert module.parse_toml("x = 1", "t.toml") == {"read_by": "tomli"}


# ---------------------------------------------------------------------------------------------------
# One definition of the refusal markers


def test_default_refusal_markers_are_defined_once():
    defining = [p.relative_to(REPO).as_posix() for p in (REPO / "heretic_dist").rglob("*.py")
                if re.search(r"(?m)^DEFAULT_REFUSAL_MARKERS\b.*=", p.read_text(encoding="utf-8"))]
    assert defining == ["heretic_dist/config/schema.py"]


# ---------------------------------------------------------------------------------------------------
# The public merge for batch manifests


def test_did_you_mean():
    assert did_you_mean("n_trails", Settings.model_fields) == "; did you mean 'n_trials'?"
    assert did_you_mean("wokers", ["workers"], "cluster.") == "; did you mean 'cluster.workers'?"
    assert did_you_mean("zzzzqqq", Settings.model_fields) == ""


def test_check_table_expands_checks_and_resolves(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("a\n")
    raw = {'cluster.workers': 2, "export_strategy": "merge", "good_prompts": {"dataset": "good.txt"}}
    with caplog.at_level(logging.WARNING, logger="heretic_dist.config"):
        checked = check_table(raw, "layer A", tmp_path)
    assert checked == {"cluster": {"workers": 2}, "good_prompts": {"dataset": str(tmp_path / "good.txt")}}
    assert "cluster.workers" in raw and raw["good_prompts"]["dataset"] == "good.txt"  # input untouched
    assert any("'export_strategy' in layer A" in r.getMessage() for r in caplog.records)
    # the first base dir that has the file wins; a path found in none stays as written
    other = tmp_path / "other"
    other.mkdir()
    (other / "good.txt").write_text("b\n")
    assert check_table({"good_prompts": {"dataset": "good.txt"}}, "x", other, tmp_path)["good_prompts"] == {
        "dataset": str(other / "good.txt")}
    assert check_table({"bad_prompts": {"dataset": "nowhere.txt"}}, "x", tmp_path)["bad_prompts"] == {
        "dataset": "nowhere.txt"}
    assert error_of(check_table, {"n_trails": 1}, "layer A") == "unknown key 'n_trails' in layer A; did you mean 'n_trials'?"
    assert error_of(check_table, {"cluster": {"wrkers": 1}}, "B") == (
        "unknown key 'cluster.wrkers' in B; did you mean 'cluster.workers'?")


def test_merge_tables_merges_sub_tables_key_by_key():
    defaults = {"n_trials": 3, "cluster": {"workers": 1, "dashboard": True}}
    entry = {"n_trials": 5, "cluster": {"workers": 2}, "seed": 1}
    merged = merge_tables(defaults, entry)
    assert merged == {"n_trials": 5, "cluster": {"workers": 2, "dashboard": True}, "seed": 1}
    assert defaults == {"n_trials": 3, "cluster": {"workers": 1, "dashboard": True}}  # not changed
    merged["cluster"]["workers"] = 9
    assert entry["cluster"]["workers"] == 2


def test_settings_from_layers_blames_the_layer_of_the_key():
    defaults = ("manifest [defaults]", {"n_trials": 3, "cluster": {"workers": 1}})
    s = settings_from_layers([defaults, ("entry 'a'", {"model": "a", "cluster": {"cpus_per_worker": 0.5}})])
    assert (s.model, s.n_trials, s.cluster.workers, s.cluster.cpus_per_worker) == ("a", 3, 1, 0.5)
    bad_default = ("manifest [defaults]", {"n_trials": 0})
    assert error_of(settings_from_layers, [bad_default, ("entry 'a'", {"model": "a"})]) == (
        "'n_trials' = 0 in manifest [defaults]: must be an integer >= 1")
    assert error_of(settings_from_layers, [defaults, ("entry 'a'", {"model": "a", "n_trials": 0})]) == (
        "'n_trials' = 0 in entry 'a': must be an integer >= 1")
    assert error_of(settings_from_layers, [defaults, ("entry 'b'", {})]).startswith(
        "missing required key 'model' in entry 'b'")
