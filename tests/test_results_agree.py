"""One results vocabulary: `run`, `status`, `report` and `batch-status` show the same Pareto front for the
same run directory (a real batch of one model on a local Ray cluster, the fake engine)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from heretic_dist import rundir as st
from heretic_dist.search.front import best_point, pareto_front

pytestmark = pytest.mark.slow

MANIFEST = """
[defaults]
engine = "fake"
n_trials = 14
n_startup_trials = 6
seed = 11
max_response_length = 8
good_prompts = { dataset = "builtin:demo_harmless", split = "[:10]" }
bad_prompts = { dataset = "builtin:demo_harmful", split = "[:10]" }
good_evaluation_prompts = { dataset = "builtin:demo_harmless", split = "[10:30]" }
bad_evaluation_prompts = { dataset = "builtin:demo_harmful", split = "[10:30]" }

[defaults.cluster]
workers = 2
cpus_per_worker = 1
object_store_memory_mb = 100

[[models]]
name = "fake-a"
model = "fake-a"
"""


def cli(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "heretic_dist", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def front_from_table(text: str) -> list[int]:
    """Trial numbers of the front table that `run` and `status` print (plain text without a TTY)."""
    lines = text[text.index("Pareto front (base model"):].splitlines()[2:]  # title, header
    numbers = []
    for line in lines:
        if not re.match(r"^\s*\d+\s", line):
            break
        numbers.append(int(line.split()[0]))
    return numbers


def test_run_status_report_and_batch_status_show_the_same_front(tmp_path: Path):
    (tmp_path / "batch.toml").write_text(MANIFEST)
    cli("batch", "batch.toml", "--batch-dir", "out", cwd=tmp_path)
    batch_dir = tmp_path / "out"
    run_dir = next(p.parent for p in batch_dir.rglob(st.MANIFEST))

    # what `run` printed: the batch keeps each model's run output in its log
    (log,) = [p for p in batch_dir.rglob("*.log") if "fake-a" in p.name]
    from_run = front_from_table(log.read_text())

    status_text = cli("status", str(run_dir), cwd=tmp_path)
    from_status = front_from_table(status_text)
    # n_trials comes from run_info.json (the manifest never holds it)
    assert "trials: 14 complete of 14," in status_text

    cli("report", str(run_dir), cwd=tmp_path)
    html = (run_dir / "report.html").read_text()
    section = html[html.index("<h2>Pareto-optimal trials</h2>"):]
    section = section[: section.index("</table>")]
    from_report = [int(n) for n in re.findall(r'<td class="n">#(\d+)</td>', section)]

    batch_text = cli("batch-status", str(batch_dir), cwd=tmp_path)
    front_line = next(line for line in batch_text.splitlines() if line.startswith("fake-a front:"))
    from_batch = [int(n) for n in re.findall(r"#(\d+)", front_line)]

    # and the one rule itself, on the trials the run wrote
    rows = st.RunDir(str(run_dir)).read_parquet(st.TRIALS)
    expected = [r["number"] for r in pareto_front(rows)]
    assert len(rows) == 14 and len(expected) >= 2
    assert from_run == from_status == from_report == from_batch == expected
    best = best_point(pareto_front(rows))
    assert f"(#{best['number']})" in batch_text  # the best point shown is the rule's best point
