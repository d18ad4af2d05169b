"""class RunDir: whole-file, atomic reads and writes in a run directory, and the journal cache.

Every write is atomic: a reader (or a driver restarted after SIGKILL) sees the old file or the new
one, never half of one. Local: temp file in the same folder, fsync, os.replace. Object stores: one
PUT of the whole object, which the store makes visible all at once.

Optuna's JournalStorage needs a local file; for remote run dirs a local cache file mirrors the
remote journal (pull on start, push after each finished trial). The remote copy is the truth.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ContextManager

import pyarrow.fs as pafs

from heretic_dist.errors import UserError

from . import parquet
from .filesystem import cache_key, cache_root, locate
from .layout import JOURNAL
from .storage_errors import translated

READ_TRIES = 5  # reads of an object that was overwritten while it was read, before the last one stands


class RunDir:
    """One run directory, local or remote, with atomic whole-file reads and writes.

    Constructing it does no I/O on local paths and at most a region lookup on s3:// without an
    endpoint override; call `check_access()` early to fail before any expensive work.
    """

    def __init__(self, uri: str, *, cache_dir: str | os.PathLike[str] | None = None) -> None:
        location = locate(uri)
        self.uri = location.uri
        self.local_path: Path | None = location.local_path
        self._fs: pafs.FileSystem | None = location.fs
        self._base = location.base
        self._bucket = location.bucket
        self._cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._pushed: tuple[int, int, str] | None = None  # (size, mtime_ns, sha256) of last push/pull

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

    def _op(self, action: str, name: str = "") -> ContextManager[None]:
        return translated(action, self._where(name), remote=not self.is_local)

    # ---- access checks --------------------------------------------------------------------------

    def check_access(self, write: bool = False) -> None:
        """Fail early with one clear line if the run dir cannot be read (or, with write, created).

        For object stores this also checks that the bucket exists, because a listing of a prefix in a
        missing bucket just looks empty.
        """
        if self.local_path is not None:
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
        if self.local_path is not None:
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
        path = self.fs_path(name)
        with self._op("read", name):
            for _ in range(READ_TRIES):
                # pyarrow reads an object as a HEAD (its size) then a ranged GET: an overwrite in between
                # (the lock's heartbeat, a journal upload) gives the new object cut to the old size. A read
                # is whole when the object's size and time were the same before and after it.
                before = self._fs.get_file_info(path)
                with self._fs.open_input_stream(path) as f:
                    data = f.read()
                after = self._fs.get_file_info(path)
                if before.size == len(data) == after.size and before.mtime == after.mtime:
                    return data
            return data

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic replace: readers and restarted drivers see the old content or the new, never half."""
        data = bytes(data)
        if self.is_local:
            with self._op("write", name):
                atomic_write_local(self._local(name), data)
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
        """Rows → Parquet (see `parquet.rows_to_parquet` for how columns are stored)."""
        self.write_bytes(name, parquet.rows_to_parquet(rows, self._where(name)))

    def read_parquet(self, name: str) -> list[dict[str, Any]]:
        return parquet.parquet_to_rows(self.read_bytes(name))

    # ---- the Optuna journal ---------------------------------------------------------------------

    def journal_path(self) -> Path:
        """Local file for Optuna's JournalFileBackend: the real file for local run dirs, a cache
        file (keyed by the URI) for remote ones, synced with pull_journal/push_journal."""
        if self.is_local:
            return self._local(JOURNAL)
        root = self._cache_dir if self._cache_dir is not None else cache_root()
        return root / "journals" / cache_key(self.uri) / JOURNAL

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
        atomic_write_local(path, data)
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


def _check_name(name: str) -> str:
    """Names are relative paths inside the run dir; no escaping it."""
    parts = Path(name).parts
    if not name or name.startswith("/") or ".." in parts or "\\" in name:
        raise ValueError(f"invalid run-dir file name {name!r}")
    return name.strip("/")


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: some filesystems refuse to fsync folders)."""
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


def atomic_write_local(path: Path, data: bytes) -> None:
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
