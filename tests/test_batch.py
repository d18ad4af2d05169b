"""`heretic-dist batch` / `batch-status` as a user runs them: subprocesses, one real local Ray cluster per
batch, the model-free fake engine; a model that cannot load, SIGKILL of the whole batch then resume, and
bad input that stops before anything is written. Manifest parsing is also tested in-process (fast)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from heretic_dist import rundir as st
from heretic_dist.batch import STATE, SUMMARY, check_fit, derive_name, load_manifest, read_summary
from heretic_dist.search.study import open_storage
from heretic_dist.errors import UserError

slow = pytest.mark.slow

DEFAULTS = """
[defaults]
engine = "fake"
n_trials = 3
n_startup_trials = 2
seed = 7
max_response_length = 8
[defaults.good_prompts]
dataset = "builtin:demo_harmless"
split = "[:10]"
[defaults.bad_prompts]
dataset = "builtin:demo_harmful"
split = "[:10]"
[defaults.good_evaluation_prompts]
dataset = "builtin:demo_harmless"
split = "[10:30]"
[defaults.bad_evaluation_prompts]
dataset = "builtin:demo_harmful"
split = "[10:30]"
[defaults.cluster]
workers = 1
cpus_per_worker = 1
object_store_memory_mb = 100
"""


def write_manifest(tmp_path: Path, models: str, defaults: str = DEFAULTS, fake: dict | None = None) -> Path:
    """The manifest; `fake` holds the fake engine's knobs, as [defaults.engine_options]."""
    path = tmp_path / "batch.toml"
    knobs = "".join(f"\n{key} = {json.dumps(value)}" for key, value in (fake or {}).items())
    options = f"\n[defaults.engine_options]{knobs}\n" if fake else ""
    path.write_text(defaults + options + "\n" + models)
    return path


def batch_cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "heretic_dist.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # no strays (Ray's processes share the session)
    return proc.returncode, out


def state_of(batch_dir: Path) -> dict:
    return json.loads((batch_dir / STATE).read_text())


def statuses(batch_dir: Path) -> dict[str, str]:
    return {m["name"]: m["status"] for m in state_of(batch_dir)["models"]}


def study_trials(run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    manifest = json.loads((run_dir / st.MANIFEST).read_text())
    return optuna.load_study(study_name=manifest["run_id"],
                             storage=open_storage(str(run_dir / st.JOURNAL))).get_trials(deepcopy=False)


# --------------------------------------------------------------------------------------------------
# manifest parsing (in-process, fast)


def test_manifest_defaults_overrides_and_names(tmp_path):
    path = write_manifest(tmp_path, """
[[models]]
model = "org/Some-Model-7B"
[[models]]
model = "package:pkg/Small.Q4_1.gguf"
"cluster.workers" = 2
[[models]]
name = "third"
model = "org/Other"
n_trials = 5
[models.cluster]
cpus_per_worker = 0.5
[models.bad_prompts]
split = "[:5]"
""")
    m = load_manifest(path)
    assert [s.name for s in m.models] == ["Some-Model-7B", "Small.Q4_1", "third"]
    a, b, c = (s.settings for s in m.models)
    assert (a.n_trials, a.cluster.workers, a.cluster.cpus_per_worker) == (3, 1, 1.0)
    assert b.cluster.workers == 2 and b.cluster.object_store_memory_mb == 100  # table merged key by key
    assert (c.n_trials, c.cluster.cpus_per_worker, c.cluster.workers) == (5, 0.5, 1)
    assert (c.bad_prompts.dataset, c.bad_prompts.split) == ("builtin:demo_harmful", "[:5]")
    assert derive_name("/models/My Model/") == "My_Model"


@pytest.mark.parametrize("models, expected", [
    ('[[models]]\nmodel = "a"\n[[models]]\nmodel = "a"\n', "duplicate model entry"),
    ('[[models]]\nname = "x"\nmodel = "a"\n[[models]]\nname = "x"\nmodel = "b"\n', "duplicate model name 'x'"),
    ('[[models]]\nmodel = "a"\nn_trails = 4\n', "unknown key 'n_trails' in .*models entry 'a'; did you mean 'n_trials'"),
    ('[[models]]\nmodel = "a"\ncluster.wokers = 4\n', "unknown key 'cluster.wokers'.*did you mean 'cluster.workers'"),
    ('[[models]]\nmodel = "a"\nn_trials = 0\n', "'n_trials' = 0 in .*models entry 'a': must be an integer >= 1"),
    ('[[models]]\nname = "../x"\nmodel = "a"\n', "must be a folder name"),
    ('[[models]]\nname = "x"\n', "missing required key 'model' in .*models entry 'x'"),
    ('', "no models"),
    ('[[models]]\nmodel = "a"\n[models.bad_prompts]\nsplit = "[:5"\n', "models entry 'a'.*split"),
])
def test_manifest_errors_are_one_line(tmp_path, models, expected):
    path = write_manifest(tmp_path, models)
    with pytest.raises(UserError, match=expected) as info:
        load_manifest(path)
    assert "\n" not in str(info.value)


def test_settings_at_the_top_of_a_manifest_are_refused(tmp_path):
    path = write_manifest(tmp_path, "", defaults='n_trials = 3\n[[models]]\nmodel = "a"\n')
    with pytest.raises(UserError, match="'n_trials' at the top of .*settings go in \\[defaults\\]"):
        load_manifest(path)


def test_fit_check_suggests_a_smaller_parallel_count(tmp_path):
    path = write_manifest(tmp_path, '[[models]]\nmodel = "a"\n[[models]]\nmodel = "b"\n[[models]]\nmodel = "c"\n')
    models = load_manifest(path).models
    check_fit(models, 2, cpus=2, gpus=0)
    with pytest.raises(UserError, match="--parallel-models 3: 3 models at once need 3 CPUs.*use --parallel-models 2"):
        check_fit(models, 3, cpus=2, gpus=0)
    with pytest.raises(UserError, match="model 'a' needs 1 CPUs"):
        check_fit(models, 1, cpus=0.5, gpus=0)


def _batch_dir_with_results(tmp_path: Path) -> Path:
    """A batch dir as a finished batch leaves it: the state, and a summary with Pareto points."""
    from heretic_dist.batch import write_summary

    batch_dir = tmp_path / "done-batch"
    batch_dir.mkdir()
    models = [{"name": "fake-a", "model": "org/a", "status": "done", "reason": None, "run_dir": "runs/fake-a",
               "wall_seconds": 130.0},
              {"name": "fake-b", "model": "org/b", "status": "failed", "reason": "org/fake-b cannot be loaded",
               "run_dir": "runs/fake-b", "wall_seconds": 3.2}]
    (batch_dir / STATE).write_text(json.dumps({"version": 1, "updated": "2024-01-01T00:00:00+00:00",
                                               "models": models}))
    pareto = [{"trial": 0, "refusals": 5, "kl": 0.2}, {"trial": 2, "refusals": 8, "kl": 0.04},
              {"trial": 1, "refusals": 9, "kl": 0.01}]
    write_summary(st.RunDir(str(batch_dir)), [
        {"name": "fake-a", "model": "org/a", "status": "done", "base_refusals": 20, "n_bad": 20,
         "complete_trials": 3, "failed_trials": 1, "pareto": pareto, "wall_seconds": 130.0},
        {"name": "fake-b", "model": "org/b", "status": "failed", "pareto": [], "wall_seconds": 3.2}])
    return batch_dir


def test_status_table_plain_text(tmp_path):
    from heretic_dist.batch import status_table

    lines = status_table(str(_batch_dir_with_results(tmp_path))).splitlines()
    assert lines[0].split() == ["model", "status", "base", "best", "(KL<=0.05", "or", "lowest", "KL)", "trials",
                                "wall", "reason"]
    assert lines[1].split() == ["fake-a", "done", "20/20", "8/20", "at", "KL", "0.0400", "(#2)", "3", "(+1",
                                "failed)", "2.2", "min"]
    assert lines[2].split()[:3] == ["fake-b", "failed", "-"] and lines[2].endswith("org/fake-b cannot be loaded")
    assert lines[3] == ""
    assert lines[4] == "fake-a front: #0 5/20 at KL 0.2000, #2 8/20 at KL 0.0400, #1 9/20 at KL 0.0100"
    assert lines[5].endswith(": 1 done, 1 failed; updated 2024-01-01T00:00:00+00:00") and len(lines) == 6
    assert all(line == line.rstrip() for line in lines)


def test_print_status_is_the_plain_table_off_a_terminal_and_rich_on_one(tmp_path):
    import io

    from heretic_dist.batch import print_status, status_table

    batch_dir = str(_batch_dir_with_results(tmp_path))
    plain = io.StringIO()
    print_status(batch_dir, stream=plain)
    assert plain.getvalue() == status_table(batch_dir) + "\n"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    rich = Terminal()
    print_status(batch_dir, stream=rich)
    text = rich.getvalue()
    assert "fake-a" in text and "0.0400" in text and "1 done, 1 failed" in text  # rich may wrap cells
    assert "┃" in text and text != plain.getvalue()


def test_best_point_is_the_one_from_search_front():
    from heretic_dist.batch import status
    from heretic_dist.search import front

    assert status.KL_THRESHOLD is front.KL_THRESHOLD
    points = [{"trial": 0, "refusals": 5, "kl": 0.2}, {"trial": 2, "refusals": 8, "kl": 0.04},
              {"trial": 1, "refusals": 9, "kl": 0.01}]
    assert status.best_summary_point(points) == points[1]
    assert status.best_summary_point([points[0]]) == points[0]  # none within KL_THRESHOLD: the lowest KL
    assert status.best_summary_point([]) is None and status.best_summary_point(None) is None
    sources = "".join(p.read_text() for p in (Path(status.__file__).parent).glob("*.py"))
    assert "def best_point" not in sources and "KL_THRESHOLD =" not in sources


def test_batch_uses_only_the_public_config_api():
    import ast

    from heretic_dist import batch

    for path in Path(batch.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("config"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from config"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n == "cli" or n.endswith(".cli") for n in names), f"{path.name} imports the CLI"


# --------------------------------------------------------------------------------------------------
# whole batches in subprocesses


@slow
def test_batch_with_a_model_that_cannot_load(tmp_path):
    manifest = write_manifest(tmp_path, """
[[models]]
model = "org/fake-a"
[[models]]
model = "org/fake-b"
[[models]]
name = "c"
model = "org/fake-c"
n_trials = 2
""", fake={"fake_fail_models": ["org/fake-b"]})
    batch_dir = tmp_path / "batch"
    code, out = finish(batch_cli("batch", str(manifest), "--batch-dir", str(batch_dir)))
    assert code == 1, out[-3000:]  # 1: not every model is done
    assert "Traceback" not in out
    assert statuses(batch_dir) == {"fake-a": "done", "fake-b": "failed", "c": "done"}
    b = next(m for m in state_of(batch_dir)["models"] if m["name"] == "fake-b")
    assert "org/fake-b cannot be loaded" in b["reason"]
    assert f"model fake-b: failed after" in out and "org/fake-b cannot be loaded" in out
    rows = {r["name"]: r for r in read_summary(st.RunDir(str(batch_dir)))}
    assert len(rows) == 3
    assert rows["fake-a"]["complete_trials"] == 3 and rows["c"]["complete_trials"] == 2
    assert rows["fake-a"]["base_refusals"] == 20 and rows["fake-a"]["n_bad"] == 20
    assert rows["fake-a"]["pareto"] and set(rows["fake-a"]["pareto"][0]) == {"trial", "refusals", "kl"}
    assert rows["fake-b"]["status"] == "failed" and rows["fake-b"]["complete_trials"] is None
    assert rows["fake-a"]["gpu_hours"] == 0.0 and rows["fake-a"]["wall_seconds"] > 0
    # the record of what ran, and each child's log
    assert (batch_dir / "configs" / "c.toml").read_text().count("n_trials = 2") == 1
    assert "heretic-dist: error:" in (batch_dir / "logs" / "fake-b.log").read_text()

    code, table = finish(batch_cli("batch-status", str(batch_dir)))
    assert code == 0, table
    assert "fake-a" in table and "failed" in table and "cannot be loaded" in table and "20/20" in table
    # the batch report reads the same batch_state.json
    code, report = finish(batch_cli("report", "--batch", str(batch_dir)))
    assert code == 0 and (batch_dir / "report.html").exists(), report

    # the same command again: nothing to do, the failed model is not retried without --retry-failed
    code, out = finish(batch_cli("batch", str(manifest), "--batch-dir", str(batch_dir)))
    assert code == 1 and "model fake-a: skipped (done)" in out and "pass --retry-failed" in out
    assert "running" not in out


@slow
def test_sigkill_of_the_batch_then_the_same_command_resumes(tmp_path):
    manifest = write_manifest(tmp_path, """
[[models]]
name = "first"
model = "org/fake-1"
[[models]]
name = "second"
model = "org/fake-2"
n_trials = 2
[[models]]
name = "third"
model = "org/fake-3"
n_trials = 8
""", fake={"fake_trial_seconds": 0.5})
    batch_dir = tmp_path / "batch"
    args = ("batch", str(manifest), "--batch-dir", str(batch_dir))
    proc = batch_cli(*args)
    third = batch_dir / "runs" / "third"
    deadline = time.time() + 180
    while time.time() < deadline:  # kill once the third model has trials in its study
        with contextlib.suppress(Exception):
            if sum(t.state.name == "COMPLETE" for t in study_trials(third)) >= 2:
                break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"no progress: {proc.communicate()[0][-3000:]}")
    os.killpg(proc.pid, signal.SIGKILL)  # the batch, its child and the Ray cluster: a lost machine
    proc.communicate()
    assert statuses(batch_dir) == {"first": "done", "second": "done", "third": "running"}
    first = [(t.number, t.state.name, t.datetime_start, t.datetime_complete)
             for t in study_trials(batch_dir / "runs" / "first")]
    assert len(first) == 3

    code, out = finish(proc := batch_cli(*args))
    assert code == 0, out[-3000:]
    assert statuses(batch_dir) == {"first": "done", "second": "done", "third": "done"}
    assert "model first: skipped (done)" in out and "model third: running (resumed" in out
    assert "model first: running" not in out and "model second: running" not in out
    log = (batch_dir / "batch.log").read_text()
    assert "model first: skipped (done)" in log
    # the first model was not redone: the same trials, started and finished at the same times
    assert [(t.number, t.state.name, t.datetime_start, t.datetime_complete)
            for t in study_trials(batch_dir / "runs" / "first")] == first
    trials = study_trials(third)
    assert sum(t.state.name == "COMPLETE" for t in trials) == 8 and "RUNNING" not in {t.state.name for t in trials}
    entry = next(m for m in state_of(batch_dir)["models"] if m["name"] == "third")
    assert entry["attempts"] == 2
    assert "attempt 2 of third" in (batch_dir / "logs" / "third.log").read_text()
    rows = {r["name"]: r for r in read_summary(st.RunDir(str(batch_dir)))}
    assert rows["third"]["complete_trials"] == 8 and rows["first"]["complete_trials"] == 3


def _one_line_exit_2(proc: subprocess.Popen) -> str:
    code, out = finish(proc, timeout=120)
    assert code == 2, out
    assert "Traceback" not in out and out.strip().count("\n") == 0, out
    return out


@slow
def test_bad_input_stops_with_one_line_and_writes_nothing(tmp_path, s3_server, s3_bucket):
    batch_dir = tmp_path / "batch"
    dup = write_manifest(tmp_path, '[[models]]\nmodel = "org/a"\n[[models]]\nname = "again"\nmodel = "org/a"\n')
    out = _one_line_exit_2(batch_cli("batch", str(dup), "--batch-dir", str(batch_dir)))
    assert "duplicate model entry" in out and "'again'" in out

    typo = write_manifest(tmp_path, '[[models]]\nmodel = "org/a"\n[models.cluster]\nworkrs = 2\n')
    out = _one_line_exit_2(batch_cli("batch", str(typo), "--batch-dir", str(batch_dir)))
    assert "unknown key 'cluster.workrs'" in out and "did you mean 'cluster.workers'" in out and "'a'" in out

    good = write_manifest(tmp_path, '[[models]]\nmodel = "org/a"\n[[models]]\nmodel = "org/b"\n'
                                    '[[models]]\nmodel = "org/c"\n')
    out = _one_line_exit_2(batch_cli("batch", str(good), "--batch-dir", f"s3://missing-{s3_bucket}/b"))
    assert "bucket" in out and "does not exist" in out
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://", 1)[1], scheme="http", region="us-east-1")
    assert fs.get_file_info(f"missing-{s3_bucket}").type == pafs.FileType.NotFound
    assert fs.get_file_info(pafs.FileSelector(s3_bucket, recursive=True)) == []  # the real bucket untouched

    # too many models at once for the cluster (2 CPUs here, 1 per model): checked before any write
    cpus = os.cpu_count() or 1
    out = _one_line_exit_2(batch_cli("batch", str(good), "--batch-dir", str(batch_dir),
                                     "--parallel-models", str(cpus + 1)))
    assert f"--parallel-models {cpus + 1}" in out and "use --parallel-models" in out
    assert not batch_dir.exists()

    # a second batch driver on the same batch dir: refused at once (the first holds the lock)
    with st.RunLock(st.RunDir(str(batch_dir))):
        out = _one_line_exit_2(batch_cli("batch", str(good), "--batch-dir", str(batch_dir)))
    assert "another heretic-dist driver is running" in out
    assert sorted(p.name for p in batch_dir.iterdir()) == [".lock"]


@slow
def test_batch_on_s3(tmp_path, s3_server, s3_bucket):
    manifest = write_manifest(tmp_path, '[[models]]\nname = "only"\nmodel = "org/fake-s3"\nn_trials = 2\n')
    uri = f"s3://{s3_bucket}/batches/one"
    code, out = finish(batch_cli("batch", str(manifest), "--batch-dir", uri))
    assert code == 0, out[-3000:]
    batch = st.RunDir(uri)
    state = batch.read_json(STATE)
    assert [(m["name"], m["status"]) for m in state["models"]] == [("only", "done")]
    for name in (SUMMARY, "batch.log", "configs/only.toml", "logs/only.log", "runs/only/trials.parquet",
                 "runs/only/study.journal"):
        assert batch.exists(name), name
    assert "=== heretic-dist batch: attempt 1 of only" in batch.read_bytes("logs/only.log").decode()
    assert read_summary(batch)[0]["complete_trials"] == 2
    code, table = finish(batch_cli("batch-status", uri))
    assert code == 0 and "only" in table and "done" in table, table
