"""Where a run directory lives: URI parsing, the S3/GCS filesystems, the local cache folder.

Local folders go through os directly (not pyarrow's LocalFileSystem) because atomic replace, fsync
and flock need a real path; remote ones through a pyarrow FileSystem built here, so that the S3
endpoint override (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3) applies everywhere, Ray Tune included.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from heretic_dist.errors import UserError, redact

from .storage_errors import first_line, s3_endpoint_env, storage_error

_S3_USED = False


@dataclass(frozen=True)
class Location:
    """A parsed run-directory URI: a local folder (local_path) or a prefix in an object store (fs)."""

    uri: str  # normalized: an absolute local path, or scheme://bucket[/prefix]
    base: str  # the run dir inside `fs` (bucket/prefix), or the local path
    local_path: Path | None = None
    fs: pafs.FileSystem | None = None
    bucket: str = ""


def s3_used() -> bool:
    """Whether this process created an S3 filesystem (the CLI then exits without teardown)."""
    return _S3_USED


def cache_root() -> Path:
    """Local folder for journal caches and batch state of remote directories (HERETIC_DIST_CACHE)."""
    env = os.environ.get("HERETIC_DIST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "heretic-dist"


def cache_key(uri: str) -> str:
    """Short stable folder name for a URI inside `cache_root()`."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def locate(uri: str) -> Location:
    """Parse a local path, file://, s3:// or gs:// URI; builds the filesystem but does no listing."""
    if not uri or not str(uri).strip():
        raise UserError("the run directory is empty: give a local path or an s3:// / gs:// URI")
    uri = str(uri).strip()
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme in ("", "file"):
        local = Path(urlsplit(uri).path if scheme == "file" else uri).expanduser().resolve()
        return Location(uri=str(local), base=str(local), local_path=local)
    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not bucket:
        raise UserError(f"run directory {redact(uri)} names no bucket: use {scheme}://BUCKET/PREFIX")
    clean = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
    if scheme == "s3":
        return Location(clean, f"{bucket}/{prefix}" if prefix else bucket, fs=make_s3(bucket), bucket=bucket)
    try:
        fs, path = pafs.FileSystem.from_uri(clean)
    except pa.ArrowInvalid as exc:
        if "unrecognized filesystem" in str(exc).lower():
            raise UserError(
                f"unsupported run directory scheme '{scheme}://' in {redact(uri)}: "
                "use a local path, file://, s3:// or gs://"
            ) from None
        raise storage_error(exc, "open", clean, remote=True) from None
    except (OSError, pa.ArrowException) as exc:
        raise UserError(
            f"cannot open run directory {redact(uri)} ({scheme}:// is not usable here): {first_line(exc)}"
        ) from None
    base = path.rstrip("/")
    return Location(clean, base, fs=fs, bucket=base.split("/", 1)[0])


def make_s3(bucket: str) -> pafs.S3FileSystem:
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
    endpoint = s3_endpoint_env()
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
