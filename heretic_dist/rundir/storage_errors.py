"""Storage failures as one-line UserErrors that say what to check and never contain secrets."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

import pyarrow as pa

from heretic_dist.errors import UserError, redact

_UNREACHABLE = ("network_connection", "could not connect", "couldn't connect", "could not resolve",
                "couldn't resolve", "curlcode", "timed out", "timeout", "connection refused")
_NO_CREDENTIALS = ("no credentials", "missing credentials", "unable to locate credentials",
                   "credentials not found", "could not find default credentials", "no authentication")
_DENIED = ("access_denied", "accessdenied", "access denied", "forbidden", "permission denied",
           "invalidaccesskeyid", "invalid_access_key_id", "signaturedoesnotmatch",
           "signature_does_not_match", "expiredtoken", "http response code: 403", "status 403")


def s3_endpoint_env() -> str | None:
    """The S3 endpoint override from the env (used for the filesystem and named in messages)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, redacted and capped (libraries add pages)."""
    text = str(exc).strip().splitlines()
    return redact(text[0] if text else type(exc).__name__)[:300]


def storage_error(exc: BaseException, action: str, where: str, *, remote: bool) -> UserError:
    """Turn a filesystem/SDK exception into one clear line saying what to check."""
    low = str(exc).lower()
    if remote and any(s in low for s in _UNREACHABLE):
        endpoint = s3_endpoint_env()
        at = f" at {redact(endpoint)}" if endpoint else ""
        return UserError(
            f"cannot reach the object store{at} to {action} {where}: "
            "check the endpoint (AWS_ENDPOINT_URL) and the network"
        )
    if remote and ("no_such_bucket" in low or "nosuchbucket" in low or re.search(r"bucket .* not found", low)):
        return UserError(f"the bucket of {where} does not exist: create it first or fix the URI")
    if remote and any(s in low for s in _NO_CREDENTIALS):
        return UserError(
            f"no credentials found to {action} {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(or GOOGLE_APPLICATION_CREDENTIALS for gs://), or use an instance role"
        )
    if isinstance(exc, PermissionError) or any(s in low for s in _DENIED):
        return UserError(
            f"permission denied to {action} {where}: check the credentials and their rights on it"
        )
    return UserError(f"cannot {action} {where}: {first_line(exc)}")


@contextlib.contextmanager
def translated(action: str, where: str, *, remote: bool) -> Iterator[None]:
    """Re-raise storage failures as UserError; FileNotFoundError passes through (callers decide)."""
    try:
        yield
    except (UserError, FileNotFoundError):
        raise
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(exc, action, where, remote=remote) from None
