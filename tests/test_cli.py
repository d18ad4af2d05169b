"""The command line as a user meets it: one clear line per bad input, non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_model_folder

PROMPTS = """
[good_prompts]
dataset = "builtin:demo_harmless"
split = "[:4]"
[bad_prompts]
dataset = "{bad}"
split = "[:4]"
[good_evaluation_prompts]
dataset = "builtin:demo_harmless"
split = "[4:8]"
[bad_evaluation_prompts]
dataset = "builtin:demo_harmful"
split = "[4:8]"
"""


def heretic(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heretic_dist", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("m"), "llama", layers=2)


def config(tmp_path: Path, model: Path | str, extra: str = "", bad: str = "builtin:demo_harmful") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'model = "{model}"\ndtypes = ["float32"]\ndevice_map = "cpu"\n{extra}\n' + PROMPTS.format(bad=bad))
    return path


@pytest.mark.parametrize("case", ["typo", "missing_file", "empty_file", "missing_model"])
def test_check_bad_input_is_one_clear_line(tmp_path, model, case):
    (tmp_path / "empty.txt").write_text("")
    cfg = {
        "typo": lambda: config(tmp_path, model, "n_trails = 3"),
        "missing_file": lambda: config(tmp_path, model, bad="nowhere.txt"),
        "empty_file": lambda: config(tmp_path, model, bad="empty.txt"),
        "missing_model": lambda: config(tmp_path, tmp_path / "no-such-model"),
    }[case]()
    done = heretic("check", str(cfg), cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("heretic-dist: error:"), done.stderr
    expected = {"typo": "did you mean 'n_trials'", "missing_file": "nowhere.txt", "empty_file": "empty.txt",
                "missing_model": "no-such-model"}[case]
    assert expected in errors[0]


def test_check_and_evaluate_a_good_config(tmp_path, model):
    cfg = config(tmp_path, model, "max_response_length = 4")
    done = heretic("check", str(cfg), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 layers" in done.stdout and "check: ok" in done.stdout
    done = heretic("evaluate", str(cfg), "--model", str(model), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(str(model))]
    assert len(rows) == 2 and rows[1].endswith("0.0000")  # the same model against itself: KL 0


def test_help_lists_every_command(tmp_path):
    done = heretic("--help", cwd=tmp_path)
    for command in ("check", "evaluate", "run", "status", "export", "report", "batch"):
        assert command in done.stdout


def test_what_rays_error_thread_prints_becomes_one_line_each():
    """Ray prints a lost node's raylet log tail from its own thread into the user's terminal; the
    CLI's stream filter turns each such message into one "(ray) ..." line and passes the rest."""
    import io
    import threading

    from heretic_dist.display import RAY_ERROR_THREAD, RayErrorFilter

    sink = io.StringIO()
    stream = RayErrorFilter(sink)
    tail = ("\x1b[33m(raylet)\x1b[0m Raylet is terminated. Termination is unexpected. Last 20 lines of the Raylet logs:\n"
            "    [2026-12-01 22:56:51,228 W 1 2] (raylet) store.cc:366: Disconnecting client\n" * 3)
    dead = ("The node with node id: 726606e6f372a77637a4 and address: 192.0.2.2 and node name: 192.0.2.2 has been "
            "marked dead because the detector has missed too many heartbeats from it. This can happen when a\n\t(1)")
    ray_thread = threading.Thread(target=lambda: [stream.write(tail), stream.write(tail), stream.write(dead)],
                                  name=RAY_ERROR_THREAD)
    ray_thread.start()
    ray_thread.join()
    stream.write("[3/16] trial 2: refusals 5/10\n")
    lines = sink.getvalue().splitlines()
    assert lines == ["(ray) a node's raylet ended unexpectedly: that node is lost (its workers are replaced)",
                     "(ray) node 726606e6f372 (192.0.2.2) was marked dead: the detector has missed too many heartbeats from it",
                     "[3/16] trial 2: refusals 5/10"]
    # what Ray's log deduplicator held back and prints at ray.shutdown(), from the caller's thread
    late = io.StringIO()
    stream = RayErrorFilter(late)
    print(tail.rstrip("\n"), file=stream)
    print(file=stream)
    assert late.getvalue().splitlines() == [lines[0], ""]
    # ... unless the listener said it when it happened: then that flush is not said again
    again = io.StringIO()
    stream = RayErrorFilter(again)
    listener = threading.Thread(target=lambda: stream.write(tail), name=RAY_ERROR_THREAD)
    listener.start()
    listener.join()
    stream.write("[4/16] trial 3: refusals 5/10\n")
    print(tail.rstrip("\n"), file=stream)
    assert again.getvalue().splitlines() == [lines[0], "[4/16] trial 3: refusals 5/10"]


def test_main_called_in_process_returns_even_after_s3_was_used(tmp_path, monkeypatch):
    """The no-teardown exit after S3 use belongs to the process entry point: main() called by a test or
    a library (here after an S3 filesystem was made in this process) returns its code. It used to end
    the whole calling process with os._exit (a CI run stopped half-way, exit 0)."""
    from heretic_dist import rundir
    from heretic_dist.cli import main
    from heretic_dist.rundir import filesystem

    monkeypatch.setattr(filesystem, "_S3_USED", True)
    assert rundir.s3_used()
    assert main(["check", str(tmp_path / "missing.toml"), "--no-model"]) == 2
