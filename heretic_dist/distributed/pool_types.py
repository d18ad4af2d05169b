"""What the worker pool's parts share: its errors, the errors that mean a worker is gone, and a
leased worker's reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError

# Errors that mean "the worker (or its node, or the owner of an argument) is gone", not "the engine
# raised". ActorDiedError, ActorUnavailableError (RayActorError) and OwnerDiedError (ObjectLostError)
# are subclasses of these.
LOST_WORKER_ERRORS: tuple[type[BaseException], ...] = (
    RayActorError,
    ObjectLostError,
    WorkerCrashedError,
    NodeDiedError,
)


class PoolError(RuntimeError):
    """The pool cannot serve a request (no workers left, a lease timed out, too many losses)."""


class StartError(PoolError):
    """A worker did not start. `retry`: its actor died (worth another try), not the engine's own error."""

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class WorkerRef:
    """A leased worker: its stable id (w0, w1, ...; replacements get new ids) and its actor handle."""

    worker_id: str
    actor: Any = field(compare=False, repr=False)


def id_order(worker_id: str) -> tuple[int, str]:
    digits = worker_id.lstrip("w")
    return (int(digits), worker_id) if digits.isdigit() else (1 << 30, worker_id)


def short_error(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
