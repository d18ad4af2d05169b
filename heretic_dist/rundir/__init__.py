"""The run directory: a local folder or an object-store prefix (s3://, gs://) through pyarrow.fs.

Everything the driver keeps across restarts lives here (see DESIGN.md, "The run, end to end"):
manifest.json, directions.safetensors + directions.sha256, study.journal, trials.parquet,
pareto.parquet, a lock and tune/. The rules this module enforces:

- Every write is atomic: a reader (or a driver restarted after SIGKILL) sees the old file or the new
  one, never half of one. Local: temp file in the same folder, fsync, os.replace. Object stores: one
  PUT of the whole object, which the store makes visible all at once.
- Storage problems (unreachable endpoint, missing bucket, no credentials, permission denied, an
  unsupported scheme) become one-line UserErrors that never contain secret values.
- Optuna's JournalStorage needs a local file; for remote run dirs a local cache file mirrors the
  remote journal (pull on start, push after each finished trial). The remote copy is the truth.
- Local folders go through os directly (not pyarrow's LocalFileSystem) because atomic replace, fsync
  and flock need a real path; remote ones through a pyarrow FileSystem built here, so that the S3
  endpoint override (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3) applies everywhere, Ray Tune included
  (see `RunDir.filesystem`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from heretic_dist.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DIRECTIONS = "directions.safetensors"
DIRECTIONS_SHA = "directions.sha256"
JOURNAL = "study.journal"
TRIALS = "trials.parquet"
PARETO = "pareto.parquet"
LOCK = ".lock"
TUNE = "tune"

# Env vars whose values must never appear in a message (they are redacted if a library echoes them).
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
)
_PARQUET_JSON_KEY = b"heretic_dist.json_columns"
_DIRECTIONS_KEY = "directions"


# --------------------------------------------------------------------------------------------------
# Errors


def _redact(text: str) -> str:
    """Remove secret env values and user:password@ parts of URLs from a message."""
    for var in _SECRET_ENV:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return _redact(text[0] if text else type(exc).__name__)[:300]


def _endpoint_hint() -> str:
    endpoint = _s3_endpoint_env()
    return f" at {_redact(endpoint)}" if endpoint else ""


def _storage_error(exc: BaseException, action: str, where: str, *, remote: bool) -> UserError:
    """Turn a filesystem/SDK exception into one clear line saying what to check."""
    msg = str(exc)
    low = msg.lower()
    if remote and any(
        s in low
        for s in (
            "network_connection",
            "could not connect",
            "couldn't connect",
            "could not resolve",
            "couldn't resolve",
            "curlcode",
            "timed out",
            "timeout",
            "connection refused",
        )
    ):
        return UserError(
            f"cannot reach the object store{_endpoint_hint()} to {action} {where}: "
            "check the endpoint (AWS_ENDPOINT_URL) and the network"
        )
    if remote and ("no_such_bucket" in low or "nosuchbucket" in low or re.search(r"bucket .* not found", low)):
        return UserError(f"the bucket of {where} does not exist: create it first or fix the URI")
    if remote and any(
        s in low
        for s in ("no credentials", "missing credentials", "unable to locate credentials", "credentials not found",
                  "could not find default credentials", "no authentication")
    ):
        return UserError(
            f"no credentials found to {action} {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(or GOOGLE_APPLICATION_CREDENTIALS for gs://), or use an instance role"
        )
    if isinstance(exc, PermissionError) or any(
        s in low
        for s in ("access_denied", "accessdenied", "access denied", "forbidden", "permission denied",
                  "invalidaccesskeyid", "invalid_access_key_id", "signaturedoesnotmatch",
                  "signature_does_not_match", "expiredtoken", "http response code: 403", "status 403")
    ):
        return UserError(
            f"permission denied to {action} {where}: check the credentials and their rights on it"
        )
    return UserError(f"cannot {action} {where}: {_first_line(exc)}")


@contextlib.contextmanager
def _translated(action: str, where: str, *, remote: bool) -> Iterator[None]:
    """Re-raise storage failures as UserError; FileNotFoundError passes through (callers decide)."""
    try:
        yield
    except (UserError, FileNotFoundError):
        raise
    except (OSError, pa.ArrowException) as exc:
        raise _storage_error(exc, action, where, remote=remote) from None


# --------------------------------------------------------------------------------------------------
# Filesystems


def _s3_endpoint_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


_S3_USED = False


def s3_used() -> bool:
    """Whether this process created an S3 filesystem (the CLI then exits without teardown)."""
    return _S3_USED


def _make_s3(bucket: str) -> pafs.S3FileSystem:
    """S3 filesystem with the endpoint override from the env and bounded retries.

    Credentials come only from the AWS SDK's default chain (env vars, profiles, instance roles):
    nothing is read from our config and nothing is printed.
    """
    global _S3_USED
    _S3_USED = True
    kwargs: dict[str, Any] = {
        "connect_timeout": 10,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    endpoint = _s3_endpoint_env()
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["scheme"] = parts.scheme or "https"
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        region = region or "us-east-1"
    elif not region:
        # Real AWS: find the bucket's region (one cheap HEAD); fall back to the SDK default.
        try:
            region = pafs.resolve_s3_region(bucket)
        except (OSError, pa.ArrowException) as exc:
            if "not found" in str(exc).lower():
                raise UserError(f"the bucket s3://{bucket} does not exist: create it first or fix the URI") from None
            region = None
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _sha16(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_root() -> Path:
    env = os.environ.get("HERETIC_DIST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "heretic-dist"


def _check_name(name: str) -> str:
    """Names are relative paths inside the run dir; no escaping it."""
    parts = Path(name).parts
    if not name or name.startswith("/") or ".." in parts or "\\" in name:
        raise ValueError(f"invalid run-dir file name {name!r}")
    return name.strip("/")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_local(path: Path, data: bytes) -> None:
    """Temp file in the same folder (same filesystem), fsync, os.replace: old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class RunDir:
    """One run directory, local or remote, with atomic whole-file reads and writes.

    Constructing it does no I/O on local paths and at most a region lookup on s3:// without an
    endpoint override; call `check_access()` early to fail before any expensive work.
    """

    def __init__(self, uri: str, *, cache_dir: str | os.PathLike[str] | None = None) -> None:
        if not uri or not str(uri).strip():
            raise UserError("the run directory is empty: give a local path or an s3:// / gs:// URI")
        uri = str(uri).strip()
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._pushed: tuple[int, int, str] | None = None  # (size, mtime_ns, sha256) of last push/pull
        scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
        self.local_path: Path | None
        if scheme in ("", "file"):
            path = urlsplit(uri).path if scheme == "file" else uri
            self.local_path = Path(path).expanduser().resolve()
            self.uri = str(self.local_path)
            self._fs: pafs.FileSystem | None = None
            self._base = str(self.local_path)
            return
        self.local_path = None
        parts = urlsplit(uri)
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not bucket:
            raise UserError(f"run directory {_redact(uri)} names no bucket: use {scheme}://BUCKET/PREFIX")
        self.uri = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
        self._bucket = bucket
        self._base = f"{bucket}/{prefix}" if prefix else bucket
        if scheme == "s3":
            self._fs = _make_s3(bucket)
            return
        try:
            fs, path = pafs.FileSystem.from_uri(self.uri)
        except pa.ArrowInvalid as exc:
            if "unrecognized filesystem" in str(exc).lower():
                raise UserError(
                    f"unsupported run directory scheme '{scheme}://' in {_redact(uri)}: "
                    "use a local path, file://, s3:// or gs://"
                ) from None
            raise _storage_error(exc, "open", self.uri, remote=True) from None
        except (OSError, pa.ArrowException) as exc:
            raise UserError(
                f"cannot open run directory {_redact(uri)} ({scheme}:// is not usable here): {_first_line(exc)}"
            ) from None
        self._fs, self._base = fs, path.rstrip("/")
        self._bucket = self._base.split("/", 1)[0]

    # ---- basics ---------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem (e.g. for Ray Tune's storage_filesystem, with the same endpoint)."""
        return self._fs if self._fs is not None else pafs.LocalFileSystem()

    def fs_path(self, name: str = "") -> str:
        """Path of `name` inside `filesystem` (bucket/prefix/name for object stores)."""
        return f"{self._base}/{_check_name(name)}" if name else self._base

    def _local(self, name: str) -> Path:
        assert self.local_path is not None
        return self.local_path / _check_name(name)

    def _where(self, name: str) -> str:
        return f"{name} in {self.uri}" if name else self.uri

    def _op(self, action: str, name: str = ""):
        return _translated(action, self._where(name), remote=not self.is_local)

    # ---- access checks --------------------------------------------------------------------------

    def check_access(self, write: bool = False) -> None:
        """Fail early with one clear line if the run dir cannot be read (or, with write, created).

        For object stores this also checks that the bucket exists, because a listing of a prefix in a
        missing bucket just looks empty.
        """
        if self.is_local:
            assert self.local_path is not None
            if write:
                with self._op("create"):
                    self.local_path.mkdir(parents=True, exist_ok=True)
                if not os.access(self.local_path, os.W_OK | os.X_OK):
                    raise UserError(f"permission denied to write to {self.uri}")
            elif self.local_path.exists() and not self.local_path.is_dir():
                raise UserError(f"run directory {self.uri} is a file, not a folder")
            return
        assert self._fs is not None
        with self._op("read"):
            if self._fs.get_file_info(self._bucket).type == pafs.FileType.NotFound:
                raise UserError(f"the bucket of {self.uri} does not exist: create it first or fix the URI")
            self._fs.get_file_info(self._base)
        if write:
            self.ensure()

    def ensure(self) -> None:
        """Create the folder / prefix (idempotent)."""
        if self.is_local:
            assert self.local_path is not None
            with self._op("create"):
                self.local_path.mkdir(parents=True, exist_ok=True)
            return
        assert self._fs is not None
        if self._base == self._bucket:
            return  # the bucket itself; we never create buckets
        with self._op("create"):
            self._fs.create_dir(self._base, recursive=True)

    # ---- whole-file operations ------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        if self.is_local:
            return self._local(name).exists()
        assert self._fs is not None
        with self._op("read", name):
            return self._fs.get_file_info(self.fs_path(name)).type != pafs.FileType.NotFound

    def read_bytes(self, name: str) -> bytes:
        """Whole file. Raises FileNotFoundError if it is missing (callers check `exists` first)."""
        if self.is_local:
            with self._op("read", name):
                return self._local(name).read_bytes()
        assert self._fs is not None
        with self._op("read", name), self._fs.open_input_stream(self.fs_path(name)) as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic replace: readers and restarted drivers see the old content or the new, never half."""
        data = bytes(data)
        if self.is_local:
            with self._op("write", name):
                _atomic_write_local(self._local(name), data)
            return
        assert self._fs is not None
        # One write of the whole buffer, then close = one PUT (or a multipart upload that becomes
        # visible only when completed); an error before close leaves the old object.
        with self._op("write", name), self._fs.open_output_stream(self.fs_path(name)) as f:
            f.write(data)

    def delete(self, name: str) -> None:
        """Remove a file; missing is fine."""
        if self.is_local:
            with self._op("delete", name):
                with contextlib.suppress(FileNotFoundError):
                    self._local(name).unlink()
            return
        assert self._fs is not None
        with self._op("delete", name), contextlib.suppress(FileNotFoundError):
            self._fs.delete_file(self.fs_path(name))

    def read_json(self, name: str) -> Any:
        raw = self.read_bytes(name)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise UserError(f"{self._where(name)} is not valid JSON ({exc.msg}, line {exc.lineno})") from None

    def write_json(self, name: str, obj: Any) -> None:
        """Sorted keys and indent 2, so files diff cleanly and hash stably."""
        text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
        self.write_bytes(name, text.encode())

    def write_parquet(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Rows → Parquet. Columns are the union of keys (first-seen order); a missing key is null.

        Columns holding a dict or list in any row are stored as JSON strings (listed in the schema
        metadata so `read_parquet` decodes them): trial params differ in shape between trials and
        between runs, which struct columns cannot hold, and JSON stays readable by any tool.
        """
        columns: dict[str, list[Any]] = {}
        for row in rows:
            for key in row:
                columns.setdefault(str(key), [])
        json_cols = sorted(
            k for k in columns if any(isinstance(r.get(k), (dict, list, tuple)) for r in rows)
        )
        for key in columns:
            if key in json_cols:
                columns[key] = [
                    None if r.get(key) is None else json.dumps(r.get(key), sort_keys=True) for r in rows
                ]
            else:
                columns[key] = [r.get(key) for r in rows]
        try:
            table = pa.table(columns) if columns else pa.table({"__empty__": pa.array([], pa.null())})
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ValueError(f"cannot store rows as Parquet in {self._where(name)}: {exc}") from None
        if not columns:
            json_cols = ["__empty__"]  # marker: zero columns, zero rows
        table = table.replace_schema_metadata({_PARQUET_JSON_KEY: json.dumps(json_cols).encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(name, sink.getvalue().to_pybytes())

    def read_parquet(self, name: str) -> list[dict[str, Any]]:
        table = pq.read_table(pa.BufferReader(self.read_bytes(name)))
        meta = table.schema.metadata or {}
        json_cols = set(json.loads(meta.get(_PARQUET_JSON_KEY, b"[]")))
        if "__empty__" in json_cols:
            return []
        rows = table.to_pylist()
        for row in rows:
            for key in json_cols & row.keys():
                if row[key] is not None:
                    row[key] = json.loads(row[key])
        return rows

    # ---- the Optuna journal ---------------------------------------------------------------------

    def journal_path(self) -> Path:
        """Local file for Optuna's JournalFileBackend: the real file for local run dirs, a cache
        file (keyed by the URI) for remote ones, synced with pull_journal/push_journal."""
        if self.is_local:
            return self._local(JOURNAL)
        root = self._cache_dir if self._cache_dir is not None else _cache_root()
        return root / "journals" / _sha16(self.uri) / JOURNAL

    def pull_journal(self) -> bool:
        """Make the cache equal to the remote journal (the source of truth); True if one existed.

        A cache without a remote journal is stale (another run or an unpushed crash) and is removed,
        so the study restarts from exactly what the run directory holds.
        """
        if self.is_local:
            return self.exists(JOURNAL)
        path = self.journal_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.exists(JOURNAL):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._pushed = None
            return False
        data = self.read_bytes(JOURNAL)
        _atomic_write_local(path, data)
        st = path.stat()
        self._pushed = (st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest())
        return True

    def push_journal(self) -> bool:
        """Upload the cache if it changed since the last push/pull; True if it uploaded.

        Cheap to call after every trial: unchanged size+mtime skips without reading the file; a
        touched but identical file is read and hashed but not uploaded.
        """
        if self.is_local:
            return False
        path = self.journal_path()
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if self._pushed and self._pushed[:2] == (st.st_size, st.st_mtime_ns):
            return False
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if self._pushed and self._pushed[2] == digest:
            self._pushed = (len(data), st.st_mtime_ns, digest)
            return False
        self.write_bytes(JOURNAL, data)
        # Record the stat of what we read: if Optuna appended meanwhile, the next call sees a change.
        self._pushed = (len(data), st.st_mtime_ns if st.st_size == len(data) else -1, digest)
        return True


# --------------------------------------------------------------------------------------------------
# Directions


def save_directions(run: RunDir, directions: torch.Tensor, metadata: dict[str, str]) -> str:
    """Write directions.safetensors and its sha256; return the hex hash (recorded so a resume can
    prove it reuses the very same directions)."""
    from safetensors.torch import save

    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"safetensors metadata must be str → str; not: {bad}")
    data = save({_DIRECTIONS_KEY: directions.detach().cpu().contiguous()}, metadata=dict(metadata))
    digest = hashlib.sha256(data).hexdigest()
    run.write_bytes(DIRECTIONS, data)
    run.write_bytes(DIRECTIONS_SHA, f"{digest}  {DIRECTIONS}\n".encode())  # sha256sum -c format
    return digest


def load_directions(run: RunDir) -> tuple[torch.Tensor, dict[str, str], str]:
    """Read the directions back, verifying the stored hash; (tensor, metadata, sha256 hex)."""
    from safetensors.torch import load

    fix = "delete both files to recompute them"
    for name in (DIRECTIONS, DIRECTIONS_SHA):
        if not run.exists(name):
            raise UserError(f"{name} is missing in {run.uri}: {fix}")
    data = run.read_bytes(DIRECTIONS)
    expected = run.read_bytes(DIRECTIONS_SHA).decode(errors="replace").split()
    digest = hashlib.sha256(data).hexdigest()
    if not expected or expected[0].lower() != digest:
        raise UserError(f"{DIRECTIONS} in {run.uri} does not match its sha256: {fix}")
    try:
        tensors = load(data)
        meta = _safetensors_metadata(data)
    except Exception as exc:  # a valid hash of an invalid file: written by something else
        raise UserError(f"{DIRECTIONS} in {run.uri} cannot be read ({_first_line(exc)}): {fix}") from None
    if _DIRECTIONS_KEY not in tensors:
        raise UserError(f"{DIRECTIONS} in {run.uri} holds no '{_DIRECTIONS_KEY}' tensor: {fix}")
    return tensors[_DIRECTIONS_KEY], meta, digest


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ block of a safetensors buffer (header: u64 length + JSON)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


# --------------------------------------------------------------------------------------------------
# Manifest


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def manifest_hash(manifest: dict[str, Any]) -> str:
    """First 16 hex chars of sha256(canonical JSON): the run id and Optuna study name, so the
    same settings always resume the same study and different ones never mix."""
    return hashlib.sha256(_canonical(manifest).encode()).hexdigest()[:16]


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(obj, dict) and obj:
        out: dict[str, str] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: _canonical(obj)}


def manifest_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ (added and removed keys too), sorted. Leaves are compared by
    canonical JSON, the same form the hash uses, so an empty diff means an equal hash."""
    a, b = _flatten(old), _flatten(new)
    a.pop("", None)
    b.pop("", None)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


# --------------------------------------------------------------------------------------------------
# Lock


class RunLock:
    """One driver per run directory.

    Local run dirs: fcntl.flock on `<run>/.lock`, held while the process lives and released by the
    kernel when it dies (SIGKILL included), so the same command can resume at once. The descriptor
    is close-on-exec (Python's default); a child made by a bare fork() would share the lock.

    Object stores have no such primitive, so the lock there is best-effort: an owner file
    (`.lock`: host, pid, time, token) refreshed every `heartbeat_s` by a daemon thread. A second
    driver that finds a recent owner file logs a warning (kept in `.warning`) and goes on; a stale
    one (older than `stale_s`) is taken over silently. Two drivers on the same machine are still
    excluded by a flock on the local journal cache folder.
    """

    def __init__(self, run: RunDir, *, heartbeat_s: float = 60.0, stale_s: float = 300.0) -> None:
        self.run = run
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.warning: str | None = None
        self._fd: int | None = None
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _owner(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "token": self._token,
        }

    def _flock(self, path: Path, where: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                holder = f" (pid {info['pid']} on {info['host']} since {info['since']})"
            os.close(fd)
            raise UserError(
                f"another heretic-dist driver is running on {where}{holder}: wait for it or stop it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._owner()).encode(), 0)
        self._fd = fd

    def acquire(self) -> "RunLock":
        if self.run.is_local:
            self.run.ensure()
            with _translated("lock", self.run.uri, remote=False):
                self._flock(self.run._local(LOCK), self.run.uri)
            return self
        # Same machine: a real lock on the journal cache folder.
        self._flock(self.run.journal_path().parent / LOCK, self.run.uri)
        try:
            if self.run.exists(LOCK):
                with contextlib.suppress(ValueError, UnicodeDecodeError, FileNotFoundError):
                    info = json.loads(self.run.read_bytes(LOCK))
                    age = time.time() - float(info.get("time", 0))
                    if age < self.stale_s:
                        self.warning = (
                            f"{self.run.uri} may be in use by another driver (pid {info.get('pid')} on "
                            f"{info.get('host')}, seen {age:.0f} s ago); locks on object stores are "
                            "best-effort, make sure only one driver runs"
                        )
                        log.warning(self.warning)
            self.run.write_bytes(LOCK, json.dumps(self._owner()).encode())
        except BaseException:
            self._release_local()
            raise
        self._thread = threading.Thread(target=self._heartbeat, name="heretic-dist-lock", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(Exception):
                self.run.write_bytes(LOCK, json.dumps(self._owner()).encode())

    def _release_local(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        """Unlock; the lock file stays (deleting a flock file races with the next locker)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            with contextlib.suppress(Exception):
                info = json.loads(self.run.read_bytes(LOCK))
                if info.get("token") == self._token:
                    self.run.delete(LOCK)
        self._release_local()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
