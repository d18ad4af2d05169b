"""The one exception type that reaches the user as a single line (no traceback), and redaction."""

from __future__ import annotations

import os
import re

# Env vars whose values must never appear in a message (they are redacted if a library echoes them).
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
)


class UserError(Exception):
    """Bad input or an unusable environment. The message names the problem and how to fix it."""


def redact(text: str) -> str:
    """Remove secret env values and user:password@ parts of URLs from a message."""
    for var in SECRET_ENV:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
