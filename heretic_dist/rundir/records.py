"""Typed readers and writers of the run directory's records: manifest, run_info, directions."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from heretic_dist.errors import UserError

from .layout import DIRECTIONS, DIRECTIONS_SHA, MANIFEST, RUN_INFO
from .storage_errors import first_line

if TYPE_CHECKING:
    import torch

    from .rundir import RunDir

_DIRECTIONS_KEY = "directions"  # the one tensor in directions.safetensors


# ---- manifest.json ------------------------------------------------------------------------------


def read_manifest(run: RunDir) -> dict[str, Any] | None:
    """The manifest of the run in `run`, or None where there is none yet."""
    return run.read_json(MANIFEST) if run.exists(MANIFEST) else None


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


# ---- run_info.json ------------------------------------------------------------------------------


def read_run_info(run: RunDir) -> dict[str, Any]:
    """What the driver recorded about its sessions (wall time, workers, loads, hosts); {} if none."""
    info = run.read_json(RUN_INFO) if run.exists(RUN_INFO) else {}
    if not isinstance(info, dict):
        raise UserError(f"{RUN_INFO} in {run.uri} is not a JSON object: delete it, the next run rewrites it")
    return info


def write_run_info(run: RunDir, info: dict[str, Any]) -> None:
    run.write_json(RUN_INFO, info)


# ---- directions.safetensors + directions.sha256 -------------------------------------------------


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
        raise UserError(f"{DIRECTIONS} in {run.uri} cannot be read ({first_line(exc)}): {fix}") from None
    if _DIRECTIONS_KEY not in tensors:
        raise UserError(f"{DIRECTIONS} in {run.uri} holds no '{_DIRECTIONS_KEY}' tensor: {fix}")
    return tensors[_DIRECTIONS_KEY], meta, digest


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ block of a safetensors buffer (header: u64 length + JSON)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})
