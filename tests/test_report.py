"""heretic_dist.report on fabricated run directories (no model, no Ray)."""

from __future__ import annotations

import datetime as dt
import random
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from heretic_dist.search.space import decode_trial_params
from heretic_dist.engine.types import COMPONENTS
from heretic_dist.errors import UserError
from heretic_dist.report import load_run, pareto_front, write_batch_report, write_report
from heretic_dist.rundir import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run_dir(
    uri: str,
    *,
    n_trials: int = 30,
    n_fail: int = 3,
    n_layers: int = 24,
    n_bad: int = 100,
    base_refusals: int = 92,
    seed: int = 0,
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
    run_info: bool = True,
) -> list[dict]:
    """A run directory as the driver leaves it: manifest, run_info, trials and pareto parquet.

    Trials come from a synthetic trade-off: a stronger edit (higher weights, wider tent) removes more
    refusals and costs more KL, with noise. Returns the trial rows.
    """
    rng = random.Random(seed)
    run = RunDir(uri)
    run.ensure()
    # As the driver writes it: n_trials is a runtime setting, only in run_info.json.
    settings = {"model": model, "n_startup_trials": 10, "seed": seed,
                "row_normalization": "none", "max_response_length": 100, "kl_divergence_target": 0.01}
    run.write_json("manifest.json", {
        "run_id": f"{seed:016x}", "model": {"name": model, "revision": "main", "dtype": "bfloat16"},
        "settings": settings,
        "prompts": {"good_evaluation": {"n": 100, "sha256": "ab" * 32}, "bad_evaluation": {"n": n_bad, "sha256": "cd" * 32}},
        "n_layers": n_layers, "components": list(COMPONENTS), "base_refusals": base_refusals,
        "n_bad_prompts": n_bad, "n_good_prompts": 100, "response_prefix": "",
    })
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    fail_at = set(rng.sample(range(n_trials), n_fail))
    rows = []
    for number in range(n_trials):
        L = n_layers
        raw = {"direction_scope": rng.choice(["global", "per layer"]), "direction_index": rng.uniform(0.4 * L, 0.9 * L)}
        for c in COMPONENTS:
            raw[f"{c}.max_weight"] = rng.uniform(0.8, 1.5)
            raw[f"{c}.max_weight_position"] = rng.uniform(0.6 * L, 1.0 * L)
            raw[f"{c}.min_weight"] = rng.uniform(0, 1)
            raw[f"{c}.min_weight_distance"] = rng.uniform(1, 0.6 * L)
        decoded = decode_trial_params(raw, n_layers)
        strength = sum(
            raw[f"{c}.max_weight"] * raw[f"{c}.min_weight_distance"] / (0.6 * L) for c in COMPONENTS
        ) / 3.0  # ~0..1
        started = t0 + dt.timedelta(seconds=20 * number)
        duration = rng.uniform(15, 40)
        failed = number in fail_at
        refusals = None if failed else max(0, min(n_bad, round(base_refusals * (1 - strength) ** 2 + rng.gauss(0, 3))))
        kl = None if failed else 0.002 * 10 ** (2.5 * strength + rng.gauss(0, 0.2))
        rows.append({
            "number": number, "state": "FAIL" if failed else "COMPLETE", "refusals": refusals,
            "n_bad_prompts": n_bad, "kl": kl,
            "refusals_score": None if failed else refusals / base_refusals,
            "kl_score": None if failed else max(kl, 0.01),
            "params": raw, "decoded": decoded.to_dict(), "worker_ids": [f"w{number % 4}"],
            "hosts": ["node-a" if number % 2 else "node-b"], "timings": {"edit_s": 0.1, "kl_s": 1.0, "generation_s": 12.0},
            "attempts": 2 if failed else 1, "started": started.isoformat(),
            "completed": None if failed else (started + dt.timedelta(seconds=duration)).isoformat(),
            "duration_s": None if failed else duration,
            "fail_reason": "worker died twice (OOM)" if failed else None,
        })
    run.write_parquet("trials.parquet", rows)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    front = [r for r in complete if not any(
        q["refusals"] <= r["refusals"] and q["kl"] <= r["kl"] and (q["refusals"], q["kl"]) != (r["refusals"], r["kl"])
        for q in complete)]
    run.write_parquet("pareto.parquet", front)
    if run_info:
        run.write_json("run_info.json", {
            "started": t0.isoformat(), "updated": (t0 + dt.timedelta(seconds=20 * n_trials)).isoformat(),
            "wall_seconds": 20.0 * n_trials + 30, "workers": 4, "shards_per_trial": 1, "cpus_per_worker": 4.0,
            "gpus_per_worker": 1.0, "worker_seconds": 4 * (20.0 * n_trials + 30), "n_trials": n_trials,
            "hosts": ["node-a", "node-b"],
        })
    return rows


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]


def _refs(path: Path) -> list[str]:
    parser = _Refs()
    parser.feed(path.read_text())
    assert "script" not in parser.tags and "link" not in parser.tags
    return parser.refs


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path


def _assert_local_refs(html_path: Path) -> list[str]:
    refs = _refs(html_path)
    for ref in refs:
        assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//", ref, re.I), ref
        assert (html_path.parent / ref).is_file(), ref
    assert "@import" not in html_path.read_text() and "url(" not in html_path.read_text()
    return refs


def test_run_report(tmp_path: Path) -> None:
    rows = make_run_dir(str(tmp_path / "run"))
    path = write_report(str(tmp_path / "run"))
    assert path == tmp_path / "run" / "report.html"
    text = path.read_text()
    refs = _assert_local_refs(path)
    pngs = sorted(r for r in refs if r.endswith(".png"))
    assert pngs == ["report-history.png", "report-kernel.png", "report-pareto.png"]
    for name in pngs:
        _assert_png(tmp_path / "run" / name)
    expected = RunDir(str(tmp_path / "run")).read_parquet("pareto.parquet")
    assert 1 <= len(expected) < len(rows)
    for row in expected:
        assert f"#{row['number']}<" in text
    assert "SmolLM2-135M-Instruct" in text and "0000000000000000" in text  # model, run id
    assert "27 complete, 3 failed" in text and "worker died twice" in text
    assert "GPU-hours" in text and "attn.o_proj" in text


def test_pareto_matches_driver_definition(tmp_path: Path) -> None:
    make_run_dir(str(tmp_path), n_trials=40, n_fail=2, seed=3)
    run = load_run(str(tmp_path))
    expected = {r["number"] for r in RunDir(str(tmp_path)).read_parquet("pareto.parquet")}
    assert {t.number for t in run.pareto} == expected
    assert [t.refusals for t in run.pareto] == sorted(t.refusals for t in run.pareto)
    assert pareto_front([]) == []


def test_out_html_path_chosen_trial_and_no_run_info(tmp_path: Path) -> None:
    make_run_dir(str(tmp_path / "run"), n_trials=12, n_fail=0, run_info=False, seed=5)
    out = tmp_path / "elsewhere" / "smol.html"
    path = write_report(str(tmp_path / "run"), str(out), trial=4)
    assert path == out
    refs = _assert_local_refs(out)
    assert "smol-kernel.png" in refs
    assert "Layer weights of trial #4" in out.read_text()
    assert "sum of trial durations" in out.read_text()
    assert not (tmp_path / "run" / "report.html").exists()
    with pytest.raises(UserError, match="trial 99 is not a complete trial"):
        write_report(str(tmp_path / "run"), str(out), trial=99)


def test_missing_trials_is_one_line_user_error(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    run.write_json("manifest.json", {"run_id": "x", "settings": {}})
    with pytest.raises(UserError) as info:
        write_report(str(tmp_path))
    msg = str(info.value)
    assert "trials.parquet" in msg and str(tmp_path) in msg and "\n" not in msg
    with pytest.raises(UserError, match="does not exist"):
        write_report(str(tmp_path / "nope"))
    assert not (tmp_path / "report.html").exists()


def test_batch_report(tmp_path: Path) -> None:
    batch = RunDir(str(tmp_path))
    make_run_dir(str(tmp_path / "runs" / "smol"), n_trials=15, n_fail=1, seed=1)
    make_run_dir(str(tmp_path / "abs-run"), n_trials=10, n_fail=0, seed=2, model="Qwen/Qwen3-0.6B")
    batch.write_json("batch_state.json", {"models": [
        {"name": "smol", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "status": "done", "reason": None,
         "run_dir": "runs/smol"},
        {"name": "qwen", "model": "Qwen/Qwen3-0.6B", "status": "running", "reason": None,
         "run_dir": str(tmp_path / "abs-run")},
        {"name": "big", "model": "meta-llama/Llama-3.1-70B-Instruct", "status": "failed",
         "reason": "CUDA out of memory on every worker", "run_dir": "runs/big"},
        {"name": "later", "model": "google/gemma-3-1b-it", "status": "queued", "reason": None, "run_dir": "runs/later"},
    ]})
    path = write_batch_report(str(tmp_path))
    assert path == tmp_path / "report.html"
    text = path.read_text()
    refs = _assert_local_refs(path)
    for name, status in (("smol", "done"), ("qwen", "running"), ("big", "failed"), ("later", "queued")):
        assert name in text and status in text
    assert "CUDA out of memory on every worker" in text
    assert "runs/smol/report.html" in refs and "abs-run/report.html" in refs
    for ref in refs:
        if ref.endswith(".png"):
            _assert_png(tmp_path / ref)
    assert sum(r.endswith(".png") for r in refs) == 2
    with pytest.raises(UserError, match="batch_state.json"):
        write_batch_report(str(tmp_path / "runs"))


def test_s3_run_dir(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/runs/smol"
    make_run_dir(uri, n_trials=8, n_fail=1)
    path = write_report(uri, str(tmp_path / "local"))
    assert path == tmp_path / "local" / "report.html"
    _assert_local_refs(path)
    remote = write_report(uri)
    assert remote == f"{uri}/report.html"
    run = RunDir(uri)
    assert run.read_bytes("report-pareto.png")[:8] == PNG_MAGIC


def test_degenerate_runs(tmp_path: Path) -> None:
    """No complete trial, one trial, and a trial with KL exactly 0 still give a report."""
    rows = make_run_dir(str(tmp_path / "a"), n_trials=3, n_fail=3)
    text = write_report(str(tmp_path / "a")).read_text()
    assert "No complete trial yet" in text and "0 complete, 3 failed" in text
    RunDir(str(tmp_path / "a")).write_parquet("trials.parquet", [])
    assert write_report(str(tmp_path / "a")).exists()
    rows = make_run_dir(str(tmp_path / "b"), n_trials=4, n_fail=0)
    rows[1]["kl"], rows[1]["refusals"] = 0.0, 90
    rows[2]["kl"] = 500.0
    RunDir(str(tmp_path / "b")).write_parquet("trials.parquet", rows)
    text = write_report(str(tmp_path / "b")).read_text()
    assert "#1<" in text


def test_n_trials_comes_from_run_info(tmp_path: Path) -> None:
    """The manifest never holds n_trials (a runtime setting); run_info.json does."""
    make_run_dir(str(tmp_path / "run"), n_trials=30, n_fail=3)
    run = RunDir(str(tmp_path / "run"))
    assert "n_trials" not in run.read_json("manifest.json")["settings"]
    assert load_run(str(tmp_path / "run")).n_trials == 30
    text = write_report(str(tmp_path / "run")).read_text()
    assert "27 of 30 trials" in text
    # A stale n_trials in the manifest settings (an old run dir) is not believed; no run_info: no "of N".
    manifest = run.read_json("manifest.json")
    manifest["settings"]["n_trials"] = 999
    run.write_json("manifest.json", manifest)
    run.delete("run_info.json")
    assert load_run(str(tmp_path / "run")).n_trials is None
    text = write_report(str(tmp_path / "run")).read_text()
    assert "27 complete, 3 failed" in text and " of 999" not in text and "27 of " not in text


def test_html_is_escaped(tmp_path: Path) -> None:
    make_run_dir(str(tmp_path / "run"), n_trials=6, n_fail=1, model="evil/<script>alert(1)</script>")
    text = write_report(str(tmp_path / "run")).read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    _refs(tmp_path / "run" / "report.html")  # no script tag parsed either


def test_report_imports_neither_torch_nor_ray(tmp_path: Path) -> None:
    make_run_dir(str(tmp_path / "run"), n_trials=6, n_fail=1)
    code = (
        "import sys\n"
        "from heretic_dist.report import write_report\n"
        f"write_report({str(tmp_path / 'run')!r})\n"
        "heavy = [m for m in ('torch', 'ray', 'optuna', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
