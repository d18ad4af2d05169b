"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

# The package is used from the checkout without installing it (no `pip install -e .` needed).
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

# ==================================================================================================
# storage: a real S3-compatible server (moto_server on 127.0.0.1) for tests of s3:// run dirs.
#   s3_server  -> endpoint URL; sets dummy AWS credentials, AWS_ENDPOINT_URL, AWS_REGION and a
#                 per-test HERETIC_DIST_CACHE for the test's duration.
#   s3_bucket  -> name of a fresh, empty bucket on that server (needs s3_server).
# ==================================================================================================
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest

S3_TEST_SECRET = "dummy-secret-Zq8vK3nT"  # tests assert it never shows up in a message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_executable() -> str:
    # The one installed next to this interpreter first: a moto_server on PATH may be another
    # Python's (older) moto whose multipart upload answers pyarrow cannot parse.
    exe = str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).exists():
        exe = shutil.which("moto_server") or exe
    if not Path(exe).exists():
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    return exe


def start_moto_server(log: Path) -> tuple[str, subprocess.Popen]:
    """A real S3 API (moto_server) on a free 127.0.0.1 port, answering; (url, process)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([moto_executable(), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 30
    while True:
        try:
            opener.open(url + "/moto-api/", timeout=1).read()
            return url, proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def _moto_endpoint(tmp_path_factory: pytest.TempPathFactory):
    url, proc = start_moto_server(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_server(_moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HERETIC_DIST_CACHE", str(tmp_path / "heretic-dist-cache"))
    return _moto_endpoint


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    import pyarrow.fs as pafs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = pafs.S3FileSystem(
        endpoint_override=s3_server.split("://", 1)[1], scheme="http", region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir(name)
    return name


# ==================================================================================================
# end of storage fixtures
# ==================================================================================================
