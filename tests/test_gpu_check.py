"""scripts/gpu_check.sh: its CPU dry run passes, the real mode without CUDA is one clear line, and the
wheel folder's size check holds the 64 MiB budget (no GPU anywhere here)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check_wheels as wheels  # noqa: E402


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_checks_every_step_on_cpu():
    done = run_script("--dry-run", timeout=180)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "gpu_check --dry-run: all checks passed" in out
    assert "FAIL" not in out
    for check in ("arguments", "step plan", "wheels", "engine path on CPU", "two workers", "T = 2"):
        assert f"ok   {check}:" in out, check
    # the shapes of the benchmark model and the 8B-class model, counted on the meta device
    assert "qwen2.5-0.5b shape on the meta device: 0.494B parameters (expected 0.494B)" in out
    assert "llama-3.1-8b shape on the meta device: 8.030B parameters (expected 8.030B)" in out
    # the trial step ran in bf16 and NF4 with every reply at full length
    assert out.count("every reply full length: yes") == 2
    assert "memory-bandwidth limit of its generation" in out
    # the engine path imported nothing outside the GPU image + the wheel list, without Ray or Optuna
    assert "outside image + wheels: none; unknown: none" in out
    assert "pydantic" in out.split("wheel list used", 1)[1].split(";", 1)[0]
    assert "ray" in out.split("among them", 1)[1] and "optuna" in out.split("among them", 1)[1]
    assert "--num_gpus 2 --no_local_rank" in out


@pytest.mark.skipif(bool(shutil.which("nvidia-smi")) or Path("/dev/nvidia0").exists(),
                    reason="an NVIDIA GPU may be visible: the real mode would run the whole check")
def test_real_mode_without_cuda_is_one_clear_line():
    done = run_script(timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu_check: no CUDA GPU visible") and "--dry-run" in lines[0]


def fake_wheels(folder: Path) -> None:
    folder.mkdir()
    for w in wheels.WHEELS:
        (folder / f"{w.dist.replace('-', '_')}-{w.version}-py3-none-any.whl").write_bytes(b"x" * 1000)


def test_wheel_folder_within_budget_and_over_it(tmp_path):
    folder = tmp_path / "whl"
    fake_wheels(folder)
    ok, lines = wheels.check_folder(folder)
    assert ok, lines
    assert lines[-1].startswith("total ") and "fits" in lines[-1]
    with open(folder / "huge.bin", "wb") as f:  # sparse: 70 MiB by size, nothing on disk
        f.truncate(70 * 2**20)
    ok, lines = wheels.check_folder(folder)
    assert not ok and "OVER BUDGET" in lines[-1]


def test_missing_wheel_is_reported(tmp_path):
    folder = tmp_path / "whl"
    fake_wheels(folder)
    (folder / "pydantic-2.14.4-py3-none-any.whl").unlink()
    ok, lines = wheels.check_folder(folder)
    assert not ok and any(line.startswith("MISSING pydantic==") for line in lines)
    assert wheels.requirements(1) == ["pydantic==2.14.4", "bitsandbytes==0.50.2"]
    assert "deepspeed==0.19.8" in wheels.requirements(2)


def _fake_dist(site: Path, name: str, files: dict[str, str]) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in files))


def _forget(top: str) -> None:
    for name in [n for n in sys.modules if n.partition(".")[0] == top]:
        del sys.modules[name]


def test_namespace_package_modules_count_for_the_distribution_that_installed_them(tmp_path, monkeypatch):
    """`google` is protobuf's and (with ray[default]) google-auth's too: an imported google.protobuf is
    protobuf alone, and google-auth's subpackages are hidden when only protobuf is allowed."""
    import gpu_check_dry as dry

    site = tmp_path / "site"
    _fake_dist(site, "hdns-image", {"hdns/kept/__init__.py": "X = 1\n"})
    _fake_dist(site, "hdns-extra", {"hdns/extra/__init__.py": "", "hdns/extra/more.py": ""})
    monkeypatch.syspath_prepend(str(site))
    shared = dry.shared_top_levels(importlib.metadata.packages_distributions())
    assert shared["hdns"] == {"hdns-image", "hdns-extra"}
    files, subpackages = dry.namespace_files(shared)
    assert subpackages["hdns.kept"] == {"hdns-image"} and subpackages["hdns.extra"] == {"hdns-extra"}
    try:
        import hdns.kept  # noqa: F401
        used = dry.imported_distributions()
    finally:
        _forget("hdns")
    assert used["hdns-image"] == ["hdns.kept"] and "hdns-extra" not in used
    assert dry._shared_owners(dry, files, {"a", "b"}) == {"a", "b"}  # a file that no file list names
    saved = sys.meta_path[:]
    try:
        hidden = dry.install_hider({"hdns-image"})
        found = {name: importlib.util.find_spec(name) is not None for name in ("hdns.kept", "hdns.extra")}
    finally:
        sys.meta_path[:] = saved
        _forget("hdns")  # find_spec of a submodule imports its parent
    assert "hdns.extra" in hidden and "hdns" not in hidden and "hdns.kept" not in hidden
    assert found == {"hdns.kept": True, "hdns.extra": False}
