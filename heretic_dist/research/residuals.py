"""First-token residuals of the direction prompts, captured on the workers and stored once.

research/residuals.safetensors holds `good` (n_g, L+2, d) and `bad` (n_b, L+2, d), float32, with the
prompt-set hashes and the response prefix in its metadata, so plots and geometry can be redrawn
without the model, and a rerun with the same prompts reuses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..distributed.pool import WorkerPool
    from ..engine.types import Prompt
    from ..rundir import RunDir

RESIDUALS = "research/residuals.safetensors"


def capture(pool: WorkerPool, prompts: list[Prompt]) -> torch.Tensor:
    """(n, L+2, d) float32, in prompt order: each worker captures its slice (the existing map)."""
    import torch

    return torch.cat([torch.as_tensor(part) for part in pool.map("residuals", prompts)]).float()


def save(run: RunDir, good: torch.Tensor, bad: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save as dump

    run.write_bytes(RESIDUALS, dump({"good": good.contiguous().float(), "bad": bad.contiguous().float()},
                                    metadata={k: str(v) for k, v in metadata.items()}))


def load(run: RunDir, expected: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
    """The stored residuals when their metadata matches `expected` (prompt hashes, prefix...); else None."""
    if not run.exists(RESIDUALS):
        return None
    import json
    import struct

    from safetensors.torch import load as parse

    data = run.read_bytes(RESIDUALS)
    (size,) = struct.unpack("<Q", data[:8])  # the safetensors header: its length, then JSON
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    tensors = parse(data)
    if any(metadata.get(k) != str(v) for k, v in expected.items()):
        return None
    return tensors["good"], tensors["bad"], metadata
