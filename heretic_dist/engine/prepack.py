"""CPU forwards with linear weights kept in oneDNN's blocked ("prepacked") layout.

On CPU, PyTorch's default linear re-packs the weight matrix for its GEMM kernel on every call; for
the small row counts of a decode step that packing costs more than the multiplication. Keeping a
second, prepacked copy of each frozen weight makes forwards 2-3x faster on the benchmark CPU (see
docs/benchmarks.md). The results differ from the plain path only by float rounding.

The dense weight stays where it was (the edit reads it, export merges into it, tied embeddings share
it), so this costs one more copy of the packed weights in memory. Trials never change base weights
(edits live in LoRA factors). A weight that is replaced, or changed in place through autograd-visible
ops, is repacked; changes through `.data` are invisible, so call unpack_linears() before merging.
"""

from __future__ import annotations

import logging
import types
from typing import Callable

import torch

log = logging.getLogger(__name__)

_DTYPES = (torch.float32,)


def prepack_supported() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)  # 16: typical decode rows


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return torch.nn.functional.linear(x, weight, self.bias)  # no autograd through the packed op
    screen = getattr(self, "_head_screen", None)  # an LM head inside argmax_only (engine/head_screen.py)
    if screen is not None and screen.applies(self, x):
        return screen(self, x)
    stamp = (weight.data_ptr(), weight._version)
    if stamp != self._prepacked_stamp:
        self._prepacked_weight, self._prepacked_stamp = _pack(weight), stamp
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._prepacked_weight, self.bias, "none", [], "")


def packable(module: torch.nn.Module) -> bool:
    return (type(module) is torch.nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype in _DTYPES)


def prepack_linears(model: torch.nn.Module, skip: Callable[[str], bool] = lambda name: False) -> int:
    """Give every plain float32 CPU nn.Linear of `model` (except names where skip(name)) a prepacked
    weight and a forward that uses it (once). Returns the bytes the packed copies take."""
    total = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not packable(module) or skip(name):
                continue
            weight = module.weight
            if not hasattr(module, "_prepacked_weight"):
                module._prepacked_stamp = (weight.data_ptr(), weight._version)
                module._prepacked_weight = _pack(weight)
                module.forward = types.MethodType(_packed_forward, module)
            total += weight.numel() * weight.element_size()
    return total


def unpack_linears(model: torch.nn.Module) -> None:
    """Back to the plain forward everywhere (before a merge or save)."""
    for module in model.modules():
        if hasattr(module, "_prepacked_weight"):
            del module._prepacked_weight, module._prepacked_stamp
            if hasattr(module, "_head_screen"):
                del module._head_screen
            del module.forward  # the class's forward again


def prepack_model(model: torch.nn.Module, screen_head: bool) -> int:
    """prepack_linears for a model's frozen weights (LoRA factors change every trial: not packed) when
    1.5x their bytes are free, and the LM head's bfloat16 screen (engine/head_screen.py) when asked and
    there is room for it too. Returns the bytes the copies take (0: nothing packed)."""
    import psutil

    from . import head_screen

    if not prepack_supported():
        return 0
    need = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
               if packable(m) and ".lora_" not in n)
    available = psutil.virtual_memory().available
    if need and available < 1.5 * need:
        log.warning("not prepacking CPU weights: they need %.1f GiB, %.1f GiB is available",
                    need / 2**30, available / 2**30)
        return 0
    packed = prepack_linears(model, skip=lambda name: ".lora_" in name)
    head = model.get_output_embeddings()
    # the screen's bfloat16 copy is half a float32 head (and twice that while it is built)
    if screen_head and packed and head is not None and available >= 1.5 * need + head.weight.numel() * 4:
        packed += head_screen.install(head)
    return packed
