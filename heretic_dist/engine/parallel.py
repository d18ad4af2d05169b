"""Tensor-parallel replicas: one rank of a model sharded with DeepSpeed AutoTP, and the edit on its
row-parallel shards.

A replica of T ranks is T processes in one torch.distributed group (gloo on CPU, NCCL on GPUs). Every
rank loads the model, DeepSpeed's automatic tensor parallelism splits it (the edited output projections
`o_proj` and `down_proj` become row-parallel `LinearAllreduce` shards: each rank holds d_out x d_in/T),
and every rank runs the same calls in the same order: the logits are identical after each all-reduce,
so greedy generation and its early stop stay in lockstep.

The edit of a row-parallel shard is the single-process edit restricted to the shard's columns: B is
the same on every rank and A is split like the weight, so sum_k B A_k x_k = B A x. Row norms and the
products of the randomized SVD span the shards; `ShardLayout` gives ablation.py the all-reduce and
all-gather they need (ablation.py stays pure: it only calls what it is given).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError

log = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def tensor_parallel_env(settings) -> tuple[int, int] | None:
    """(rank, world size) when this process is one rank of a tensor-parallel replica, else None.

    A process is a rank when `cluster.tensor_parallel` > 1 and torch.distributed's environment says so
    (heretic-dist's replica workers set it; so does `deepspeed --num_gpus T`). Anywhere else (export,
    `evaluate` in one process) the same settings load the model whole, which gives the same results.
    """
    size = int(getattr(getattr(settings, "cluster", None), "tensor_parallel", 1) or 1)
    if size <= 1 or "WORLD_SIZE" not in os.environ:
        return None
    missing = [k for k in ENV_KEYS if not os.environ.get(k)]
    if missing:
        raise UserError(f"tensor_parallel = {size} needs {', '.join(missing)} in the environment of every rank")
    world = int(os.environ["WORLD_SIZE"])
    if world != size:
        raise UserError(f"tensor_parallel = {size} but WORLD_SIZE = {world}: start {size} ranks per replica")
    return int(os.environ["RANK"]), world


def join_group(rank: int, world: int, timeout_s: float = 1800.0) -> None:
    """Join the replica's process group through DeepSpeed (so its inference all-reduce is set up).

    LOCAL_SIZE = world tells DeepSpeed's CPU accelerator that every rank is on this node (a replica is
    placed on one node). On CPU, DeepSpeed would build its shared-memory all-reduce, a C++ extension
    compiled on first use (about 50 s per fresh install on a 2-core machine, and it crashed without
    LOCAL_SIZE); gloo's all_reduce gives the same sums, so that op is switched off through the op table
    DeepSpeed keeps for this (`deepspeed.ops.__compatible_ops__`, "edits to it persist"). CPU replicas
    are for tests and small checks; on GPUs NCCL does the all-reduce either way.
    """
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ.setdefault("LOCAL_SIZE", str(world))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world)


def shard_model(model: nn.Module, world: int) -> nn.Module:
    """Split `model` over the group with DeepSpeed AutoTP (no kernel injection: it has no CPU kernels)."""
    import deepspeed

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model.config, "quantization_config", None):
        raise UserError("tensor_parallel > 1 works on unquantized weights: set quantization = \"none\"")
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=model.dtype,
                                      replace_with_kernel_inject=False)
    return engine.module


def row_parallel(module: nn.Module) -> bool:
    """A module whose weight holds a slice of the input columns and whose output is all-reduced."""
    return type(module).__name__ == "LinearAllreduce"


class ShardLayout:
    """Where this rank's columns sit in a row-parallel module, and the collectives over the group."""

    def __init__(self, widths: list[int], rank: int):
        self.widths = widths
        self.rank = rank
        self.offset = sum(widths[:rank])
        self.width = widths[rank]
        self.total = sum(widths)

    @classmethod
    def of(cls, module: nn.Module) -> ShardLayout:
        import torch.distributed as dist

        width = torch.tensor([module.weight.shape[1]], dtype=torch.int64, device=module.weight.device)
        widths = [torch.zeros_like(width) for _ in range(dist.get_world_size())]
        dist.all_gather(widths, width)
        return cls([int(w.item()) for w in widths], dist.get_rank())

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's `partial` (a d_out-space quantity each rank computed from its columns)."""
        import torch.distributed as dist

        total = partial.contiguous().clone()
        dist.all_reduce(total)
        return total

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's column block (dimension -2) of a d_in-space tensor, concatenated in rank order."""
        import torch.distributed as dist

        widest = max(self.widths)
        padded = torch.zeros(*local.shape[:-2], widest, local.shape[-1], dtype=local.dtype, device=local.device)
        padded[..., : local.shape[-2], :] = local
        blocks = [torch.empty_like(padded) for _ in self.widths]
        dist.all_gather(blocks, padded.contiguous())
        return torch.cat([b[..., :w, :] for b, w in zip(blocks, self.widths)], dim=-2)

    def local(self, full: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """This rank's columns of a full d_in-space tensor."""
        return full.narrow(dim, self.offset, self.width)


@dataclass
class ShardedEdit:
    """The low-rank edit of one row-parallel module: output + B (sum over ranks of A_k x_k).

    A forward hook, so DeepSpeed's module stays as it is (PEFT cannot wrap it). The extra all-reduce
    moves r numbers per token. Every rank holds the same edit state, so every rank takes the same
    collectives (or none: an unedited module adds nothing and reduces nothing).
    """

    module: nn.Module
    layout: ShardLayout
    a: torch.Tensor | None = None  # (r, d_in/T), this rank's columns
    b: torch.Tensor | None = None  # (d_out, r), the same on every rank

    def __post_init__(self) -> None:
        self.handle = self.module.register_forward_hook(self._hook)

    @property
    def base_layer(self) -> nn.Module:  # what Engine._base_weight reads
        return self.module

    def set(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a = a.to(device=self.module.weight.device, dtype=torch.float32).contiguous()
        self.b = b.to(device=self.module.weight.device, dtype=torch.float32).contiguous()

    def clear(self) -> None:
        self.a = self.b = None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if self.a is None or self.b is None:
            return output
        low = self.layout.reduce(args[0].to(torch.float32) @ self.a.T)
        return (output.to(torch.float32) + low @ self.b.T).to(output.dtype)


def attach_sharded_edits(modules: dict[str, nn.Module]) -> dict[str, ShardedEdit]:
    """A ShardedEdit per edited module (in name order: every rank gathers the layouts in one order)."""
    edits = {}
    for name in sorted(modules):
        module = modules[name]
        if not row_parallel(module):
            raise UserError(
                f"tensor_parallel: {name} is a {type(module).__name__}, not a row-parallel shard; "
                "DeepSpeed AutoTP does not split this architecture's edited modules (use tensor_parallel = 1)"
            )
        edits[name] = ShardedEdit(module, ShardLayout.of(module))
    return edits
