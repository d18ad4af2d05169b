"""Research mode: geometry on synthetic clusters with known answers, the alignment's orientation rule,
the sweep's trial, the missing-extra message, and one small end-to-end run on the fake engine."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from heretic_dist.research import embedding, geometry
from heretic_dist.research.sweep import raw_params, sweep_params
from heretic_dist.search.space import COMPONENTS, ComponentParams, TrialParams, layer_weight

REPO = Path(__file__).resolve().parents[1]
RESEARCH = REPO / "heretic_dist" / "research"


def clusters(shift: float, n: int = 60, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    good = rng.normal(size=(n, d))
    bad = rng.normal(size=(n, d))
    bad[:, 0] += shift
    return good + 5.0, bad + 5.0  # away from the origin, so the means have a direction


# -- geometry --------------------------------------------------------------------------------------


def test_identical_classes_give_cosine_one_and_silhouette_near_zero():
    good, _ = clusters(0.0)
    row = geometry.layer_geometry(good, good.copy())
    assert row["S(g,b)"] == pytest.approx(1.0, abs=1e-12)
    assert row["S(g*,b*)"] == pytest.approx(1.0, abs=1e-12)
    assert row["|r|"] == pytest.approx(0.0, abs=1e-9)
    assert abs(row["silhouette"]) < 0.05
    assert set(row) == set(geometry.COLUMNS)


def test_well_separated_classes_give_silhouette_near_one():
    good, bad = clusters(200.0)
    row = geometry.layer_geometry(good, bad)
    assert row["silhouette"] > 0.95
    assert row["|r|"] == pytest.approx(200.0, rel=0.05)
    assert row["S(b,r)"] > row["S(g,r)"]


def test_silhouette_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    good, bad = clusters(1.5)
    x = np.concatenate([good, bad])
    labels = np.array([0] * len(good) + [1] * len(bad))
    assert geometry.silhouette(x, labels) == pytest.approx(sklearn_metrics.silhouette_score(x, labels), abs=1e-9)


def test_geometric_median_ignores_one_far_outlier():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(50, 8))
    points[0] = 1e4
    median = geometry.geometric_median(points)
    assert np.linalg.norm(median) < 0.5  # the majority sits around the origin
    assert np.linalg.norm(points.mean(axis=0)) > 100  # the mean does not


def test_geometric_median_of_a_simple_set():
    square = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert geometry.geometric_median(square) == pytest.approx([1.0, 1.0], abs=1e-6)
    line = np.array([[0.0], [1.0], [10.0]])  # 1-D: the median
    assert geometry.geometric_median(line)[0] == pytest.approx(1.0, abs=1e-4)


# -- alignment ------------------------------------------------------------------------------------


def test_alignment_leaves_the_orientation_rule_true_on_every_layer():
    rng = np.random.default_rng(2)
    labels = np.array([0] * 40 + [1] * 40)
    base = np.concatenate([rng.normal(size=(40, 2)) - [3, 0], rng.normal(size=(40, 2)) + [3, 0]])
    layers = []
    for i in range(8):  # each "layer" is the same picture, turned, mirrored and scaled at random
        angle = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        if i % 3 == 1:
            rot = rot @ np.diag([1.0, -1.0])
        layers.append(rng.uniform(0.5, 5) * (base + rng.normal(scale=0.05, size=base.shape)) @ rot.T + rng.normal(size=2))
    aligned = embedding.align(layers, labels)
    for points in aligned:
        assert embedding.orientation_holds(points, labels, tol=1e-4)
    # consistent from layer to layer: neighbours nearly coincide (no jumps, no mirror flips)
    for a, b in zip(aligned, aligned[1:]):
        assert np.sqrt(((a - b) ** 2).sum(axis=1).mean()) < 0.1


def test_orient_puts_good_left_on_a_horizontal_line():
    labels = np.array([0, 0, 1, 1])
    points = np.array([[5.0, 5.0], [5.2, 5.0], [1.0, 1.0], [1.2, 1.0]])  # good up-right of bad
    out = embedding.orient(points, labels)
    assert embedding.orientation_holds(out, labels)


# -- sweep ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers", [8, 30])
def test_sweep_trial_equals_a_manual_trial_with_all_weights_one(n_layers):
    from heretic_dist.engine.ablation import layer_direction

    directions = torch.nn.functional.normalize(torch.randn(n_layers + 1, 12, generator=torch.Generator().manual_seed(0)), dim=1)
    for i in range(n_layers):
        swept = sweep_params(i, n_layers, list(COMPONENTS))
        manual = TrialParams("global", float(i), {c: ComponentParams(1.0, 123.0, 1.0, 1e9) for c in COMPONENTS})
        assert swept.direction_scope == manual.direction_scope == "global"
        assert swept.direction_index == manual.direction_index == i
        for layer in range(n_layers):  # what the engine's apply() reads: the weight and the direction
            for c in COMPONENTS:
                assert layer_weight(layer, swept.components[c]) == layer_weight(layer, manual.components[c]) == 1.0
            assert torch.equal(layer_direction(directions, swept, layer), layer_direction(directions, manual, layer))
            assert torch.allclose(layer_direction(directions, swept, layer), directions[i + 1])


def test_sweep_params_lie_inside_the_search_space():
    n_layers, last = 30, 29
    raw = raw_params(20, n_layers, list(COMPONENTS))
    for c in COMPONENTS:
        assert 0.8 <= raw[f"{c}.max_weight"] <= 1.5
        assert 0.6 * last <= raw[f"{c}.max_weight_position"] <= last
        assert 0 <= raw[f"{c}.min_weight"] <= 1
        assert 1 <= raw[f"{c}.min_weight_distance"] <= 0.6 * last


def test_sweep_trial_on_the_fake_engine_equals_the_manual_one():
    from heretic_dist.engine.types import Shard
    from heretic_dist.testing.fake import FakeEngine

    engine = FakeEngine({"fake_n_layers": 6})
    engine.set_directions(torch.randn(8, 16))
    params = sweep_params(3, 6, list(COMPONENTS))
    again = TrialParams.from_dict(json.loads(json.dumps(params.to_dict())))  # as it travels to a worker
    assert engine.run_trial(params, Shard()).refusals == engine.run_trial(again, Shard()).refusals


# -- the research extra ---------------------------------------------------------------------------


def test_without_the_research_extra_one_line_and_exit_2(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(FAKE_CONFIG)
    code = ("import sys; sys.modules['pacmap'] = None; sys.modules['sklearn'] = None\n"
            "from heretic_dist.cli import main\n"
            f"sys.exit(main(['research', {str(config)!r}, '--run-dir', {str(tmp_path / 'r')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'heretic-dist[research]'" in lines[0], done.stderr
    assert not (tmp_path / "r").exists()  # nothing expensive, nothing written


def test_research_imports_follow_the_dependency_rule():
    for path in RESEARCH.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [("." * node.level) + (node.module or "")] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("heretic_dist.cli", "heretic_dist.report", "..cli", "..report",
                                            "..display", "..batch")), (path, name)
                if "engine" in name:
                    assert name.endswith(("engine.protocol", "engine.types")), (path, name)
                if path.name == "geometry.py":
                    assert name.split(".")[0] not in ("ray", "torch", "optuna"), name


# -- end to end on the fake engine ----------------------------------------------------------------

FAKE_CONFIG = """
model = "fake"
engine = "fake"
seed = 3
max_response_length = 8
response_prefix = ""
residual_plot_style = "default"
[engine_options]
fake_n_layers = 4
fake_hidden_size = 8
[good_prompts]
dataset = "builtin:demo_harmless"
split = "[:16]"
[bad_prompts]
dataset = "builtin:demo_harmful"
split = "[:16]"
[good_evaluation_prompts]
dataset = "builtin:demo_harmless"
split = "[16:24]"
[bad_evaluation_prompts]
dataset = "builtin:demo_harmful"
split = "[16:24]"
[cluster]
workers = 2
cpus_per_worker = 0.5
object_store_memory_mb = 100
"""


@pytest.mark.timeout(240)
def test_research_end_to_end_on_the_fake_engine(tmp_path):
    pytest.importorskip("pacmap")
    from heretic_dist import rundir as st

    config = tmp_path / "c.toml"
    config.write_text(FAKE_CONFIG)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "heretic_dist", "research", str(config), "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=220, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    run = st.RunDir(str(run_dir))
    geo = run.read_parquet("research/geometry.parquet")
    assert [r["layer"] for r in geo] == [0, 1, 2, 3]
    assert set(geometry.COLUMNS) <= set(geo[0])
    sweep = run.read_parquet("research/sweep.parquet")
    assert [r["layer"] for r in sweep] == [0, 1, 2, 3]
    for i in range(4):
        assert (run_dir / f"research/layer_{i:03d}.png").stat().st_size > 1000
    assert (run_dir / "research/animation.gif").read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    assert "Research: residual geometry" in (run_dir / "research/report.html").read_text()
    # the stored residuals: float32, the prompt-set hashes in their metadata
    from heretic_dist.research import residuals

    good, bad, meta = residuals.load(run, {})
    assert good.dtype == torch.float32 and tuple(good.shape) == (16, 6, 8) and tuple(bad.shape) == (16, 6, 8)
    assert len(meta["good_prompts"]) == 64 and meta["response_prefix"] == ""
    # a rerun reuses everything (no pool, no PaCMAP, no sweep)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=220, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "residuals loaded" in again.stdout and "embeddings loaded" in again.stdout
    assert "sweep loaded" in again.stdout and "workers ready" not in again.stdout
    # --geometry alone needs neither pacmap nor scikit-learn
    code = ("import sys; sys.modules['pacmap'] = None; sys.modules['sklearn'] = None\n"
            "from heretic_dist.cli import main\n"
            f"sys.exit(main(['research', {str(config)!r}, '--run-dir', {str(run_dir)!r}, '--geometry']))")
    geo_only = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=220, cwd=tmp_path)
    assert geo_only.returncode == 0, geo_only.stderr
    assert "Residual geometry per layer" in geo_only.stdout


def test_report_html_gets_a_research_section(tmp_path):
    from heretic_dist import rundir as st
    from heretic_dist.report import write_report
    from heretic_dist.research import plots

    sys.path.insert(0, str(REPO / "tests"))
    from test_report import make_run_dir

    uri = str(tmp_path / "run")
    make_run_dir(uri, n_trials=6, n_fail=1)
    assert "Research:" not in write_report(uri).read_text()  # no research/: no section
    run = st.RunDir(uri)
    good, bad = clusters(3.0)
    rows = [dict(layer=i, **geometry.layer_geometry(good, bad)) for i in range(3)]
    run.write_parquet("research/geometry.parquet", rows)
    run.write_bytes("research/geometry.png", plots.geometry_png(rows))
    run.write_parquet("research/sweep.parquet", [{"layer": i, "refusals": 3, "bad_scored": 10, "kl": 0.1}
                                                 for i in range(3)])
    page = write_report(uri).read_text()
    assert "Research: residual geometry" in page and "Research: direction sweep" in page
    assert 'src="research/geometry.png"' in page and "S(g*,b*)" in page


def test_seed_search_enqueues_the_best_sweep_trials_in_range(tmp_path):
    import optuna

    from heretic_dist.research.sweep import best_layers, seed_study
    from heretic_dist.search.space import SearchSpace
    from heretic_dist.search.study import open_study

    n_layers = 10
    rows = [{"layer": i, "direction_index": float(i), "refusals": 10 - i, "kl": 0.1 * i,
             "params": raw_params(i, n_layers, list(COMPONENTS))} for i in range(n_layers)]
    best = best_layers(rows, 2, n_layers)
    assert [r["layer"] for r in best] == [8, 7]  # 9 has the fewest refusals but lies outside [0.4 L, 0.9 L]
    journal = str(tmp_path / "study.journal")
    assert seed_study(journal, "run1", best) == 2
    study = open_study(journal, "run1")
    for expected in best:
        trial = study.ask()
        assert SearchSpace(n_layers)(trial) == expected["params"]
        assert trial.user_attrs["enqueued_by"] == "research sweep"
        study.tell(trial, [1.0, 1.0])
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials())
