"""The study file is a plain Optuna journal: optuna-dashboard (a real client) reads it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from heretic_dist.search.study import open_study


def test_optuna_dashboard_reads_the_study(tmp_path):
    exe = Path(sys.executable).with_name("optuna-dashboard")
    if not exe.exists():
        exe = Path(shutil.which("optuna-dashboard") or exe)
    if not exe.exists():
        pytest.fail("optuna-dashboard is not installed (it is in the dev extra)")
    journal = tmp_path / "study.journal"
    study = open_study(str(journal), "abc123")
    for refusals, kl in ((0.5, 0.2), (0.2, 0.6)):
        trial = study.ask()
        trial.suggest_float("direction_index", 0.0, 10.0)
        study.tell(trial, [refusals, kl])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(exe), "--host", "127.0.0.1", "--port", str(port), str(journal)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.time() + 60
        while True:
            try:
                body = opener.open(f"http://127.0.0.1:{port}/api/studies", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("optuna-dashboard did not answer")
                time.sleep(0.5)
        studies = json.loads(body)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["abc123"]
        assert studies[0]["directions"] == ["minimize", "minimize"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
