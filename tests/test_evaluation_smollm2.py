"""evaluate-front on a real model: a finished SmolLM2 run, 3 candidates over 2 workers, every measure on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_gguf import smollm2_gguf

from heretic_dist import rundir as st

pytestmark = pytest.mark.slow

RUN = """
model = "{model}"
dtypes = ["float32"]
device_map = "cpu"
batch_size = 8
max_response_length = 4
n_trials = 3
n_startup_trials = 3
seed = 7
good_prompts = {{ dataset = "builtin:demo_harmless", split = "[:6]" }}
bad_prompts = {{ dataset = "builtin:demo_harmful", split = "[:6]" }}
good_evaluation_prompts = {{ dataset = "builtin:demo_harmless", split = "[6:10]" }}
bad_evaluation_prompts = {{ dataset = "builtin:demo_harmful", split = "[6:10]" }}
[cluster]
workers = 2
object_store_memory_mb = 100
"""

EVALUATION = """
max_response_length = 12
kl_tokens = 3
harmful_prompts = { dataset = "builtin:demo_harmful", split = "[20:25]" }
over_refusal_prompts = { dataset = "builtin:over_refusal_mild", split = "[:3]" }
damage_prompts = { dataset = "builtin:demo_harmless", split = "[20:23]" }
text_prompts = { dataset = "builtin:demo_harmless", split = "[23:25]" }
"""


def cli(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "heretic_dist", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def test_evaluate_front_on_a_finished_smollm2_run(tmp_path: Path):
    (tmp_path / "run.toml").write_text(RUN.format(model=smollm2_gguf()))
    (tmp_path / "eval.toml").write_text(EVALUATION)
    cli("run", "run.toml", "--run-dir", "run", cwd=tmp_path)
    out = cli("evaluate-front", "run", "--config", "eval.toml", "--trials", "0,1,2", cwd=tmp_path)
    run = st.RunDir(str(tmp_path / "run"))
    rows = sorted(run.read_parquet(st.EVALUATION), key=lambda r: r["trial"])
    assert [r["trial"] for r in rows] == [0, 1, 2]
    (base,) = run.read_parquet(st.EVALUATION_BASE)
    for row in [base, *rows]:
        for column in ("refusals", "over_refusals", "degenerate", "kl", "perplexity"):
            assert row[column] is not None, (row["trial"], column)
        assert row["n_harmful"] == 5 and row["n_over_refusal"] == 3 and row["kl_tokens"] == 3
        assert row["perplexity"] > 1
    assert base["kl"] < 1e-7
    assert all(r["kl"] > 0 for r in rows)  # every trial edits the model: its replies' distribution moved
    assert len({r["worker_id"] for r in rows + [base]}) == 2  # both workers measured candidates
    assert "4 to measure" in out and "Evaluation of the candidates" in out
    cli("report", "run", cwd=tmp_path)
    html = (tmp_path / "run" / "report.html").read_text()
    assert all(f"<td>trial {n}</td>" in html for n in (0, 1, 2)) and "<td>base</td>" in html
