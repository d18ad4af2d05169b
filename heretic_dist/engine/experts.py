"""The edit on routed experts stored as fused 3-D tensors (transformers 5 `mlp.experts.down_proj`).

A PEFT LoRA cannot sit on a slice of a 3-D parameter, and editing the tensor in place would need a full
copy of the experts to undo. Instead the edit rides on the forward path: transformers routes every
decorated experts class (`@use_experts_implementation`) through its public ExpertsInterface, so we
register one more implementation there. A module with no edit calls the implementation it had before
(bit-exact reset: the base weights are never written); a module with an edit computes, per routed
expert e, down_e(h) + B_e (A_e h), with the same factors (A_e, B_e) a module-list expert's LoRA gets.
Memory: E x r x (d_in + d_out) floats per layer, against E x d_in x d_out for the weights.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .ablation import lora_factors

log = logging.getLogger(__name__)

IMPLEMENTATION = "heretic_dist_lowrank"
_CHUNK_BYTES = 32 << 20  # float32 expert weights per batched factor call: bounds the transient copy


@dataclass
class FusedExperts:
    """One layer's fused routed experts; `transposed` comes from the class's code (its decorator's
    is_transposed: the forward computes h @ W, W is (E, in, out)), never from the shapes."""

    name: str
    module: nn.Module
    transposed: bool

    @property
    def num_experts(self) -> int:
        return int(self.module.down_proj.shape[0])

    def weights(self) -> torch.Tensor:
        """The down projections as a float32 stack (E, d_out, d_in), a view where the dtype allows."""
        w = self.module.down_proj.detach()
        return (w.mT if self.transposed else w).to(torch.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of all this module's 3-D expert tensors (gate/up and down)."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters(recurse=False) if p.dim() == 3)


def fused_layout(container: nn.Module) -> bool | None:
    """is_transposed for a decorated fused experts module with a 3-D down_proj; None if not one."""
    down = getattr(container, "down_proj", None)
    if not isinstance(down, torch.Tensor) or down.dim() != 3:
        return None
    transposed = getattr(container, "is_transposed", None)  # set by transformers' decorator
    if not isinstance(transposed, bool) or not hasattr(container, "config"):
        return None
    return transposed


# --- pure math -------------------------------------------------------------------------------


def expert_factors(
    weights: torch.Tensor, v: torch.Tensor, w: float, mode: str, rank: int, seed: int,
    chunk_bytes: int = _CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert LoRA factors A (E, r, d_in), B (E, d_out, r) for a stack (E, d_out, d_in): each
    expert gets exactly the factors `lora_factors` gives that matrix alone (full: same reseeded draws).
    Chunked so that no more than chunk_bytes of float32 temporaries exist at once."""
    e, d_out, d_in = weights.shape
    per_chunk = max(1, chunk_bytes // (4 * d_out * d_in))
    parts = [lora_factors(weights[i : i + per_chunk].to(torch.float32), v.to(weights.device), w, mode, rank, seed)
             for i in range(0, e, per_chunk)]
    a = torch.cat([p[0] for p in parts]).contiguous()
    b = torch.cat([p[1] for p in parts]).contiguous()
    return a, b


def merged_down_proj(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, transposed: bool) -> torch.Tensor:
    """W + B A per expert, in the parameter's own layout and dtype (for export)."""
    delta = b @ a  # (E, d_out, d_in)
    base = weight.to(torch.float32)
    merged = base + (delta.mT if transposed else delta)
    return merged.to(weight.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def expert_down(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, transposed: bool) -> torch.Tensor:
    """One expert's edited down projection: W h (+ bias) + B (A h), the low-rank term in the factors'
    dtype like PEFT's LoRA. The bias is left as it is, as LoRA leaves a Linear's bias."""
    out = _linear(h, weight, bias, transposed)
    low = (h.to(a.dtype) @ a.mT) @ b.mT
    return out + low.to(out.dtype)


# --- the forward path ------------------------------------------------------------------------


@dataclass
class _State:
    previous: Callable  # the implementation the module had before ours
    previous_name: str
    edit: tuple[torch.Tensor, torch.Tensor] | None = None


_STATES: "weakref.WeakKeyDictionary[nn.Module, _State]" = weakref.WeakKeyDictionary()


def lowrank_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """ExpertsInterface implementation: the previous one when unedited, else the eager loop over hit
    experts with the low-rank term added to each expert's down projection."""
    state = _STATES.get(self)
    if state is None or state.edit is None:
        previous = state.previous if state is not None else inspect.unwrap(type(self).forward)
        return previous(self, hidden_states, top_k_index, top_k_weights)
    a, b = state.edit
    transposed, has_bias = self.is_transposed, self.has_bias
    final = torch.zeros_like(hidden_states)
    for expert in torch.unique(top_k_index).tolist():
        if expert >= self.num_experts:
            continue  # expert-parallel sentinel
        token_idx, pos = torch.where(top_k_index == expert)
        x = hidden_states[token_idx]
        if self.has_gate:
            up = _linear(x, self.gate_up_proj[expert], self.gate_up_proj_bias[expert] if has_bias else None,
                         transposed)
            h = self._apply_gate(up)
        else:
            up = _linear(x, self.up_proj[expert], self.up_proj_bias[expert] if has_bias else None, transposed)
            h = self.act_fn(up)
        y = expert_down(h, self.down_proj[expert], self.down_proj_bias[expert] if has_bias else None,
                        a[expert], b[expert], transposed)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        final.index_add_(0, token_idx, (y * top_k_weights[token_idx, pos, None]).to(final.dtype))
    return final


def install(model: nn.Module, fused: list[FusedExperts]) -> list[str]:
    """Route the fused experts through our implementation (public ExpertsInterface.register and
    PreTrainedModel.set_experts_implementation). Returns one reason per module it could not route."""
    if not fused:
        return []
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, lowrank_experts_forward)
    for entry in fused:
        current = entry.module.config._experts_implementation
        eager = inspect.unwrap(type(entry.module).forward)
        _STATES[entry.module] = _State(ALL_EXPERTS_FUNCTIONS.get_interface(current, eager), current)
    model.set_experts_implementation(IMPLEMENTATION)
    failed = []
    for entry in fused:
        if entry.module.config._experts_implementation != IMPLEMENTATION:
            failed.append(f"{entry.name} (transformers would not switch its experts implementation)")
            _STATES.pop(entry.module, None)
    return failed


def restore(model: nn.Module) -> None:
    """Back to the previous implementation (export: a saved config must not name ours)."""
    states = [_STATES.pop(m) for m in model.modules() if m in _STATES]
    if states:
        model.set_experts_implementation(states[0].previous_name)


def set_edit(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    _STATES[module].edit = (a, b)


def clear_edits(fused: list[FusedExperts]) -> None:
    for entry in fused:
        state = _STATES.get(entry.module)
        if state is not None:
            state.edit = None


def edit_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    state = _STATES.get(module)
    return None if state is None else state.edit


def edit_bytes(fused: list[FusedExperts]) -> int:
    """Bytes the current expert factors hold."""
    total = 0
    for entry in fused:
        edit = edit_of(entry.module)
        if edit is not None:
            total += sum(t.numel() * t.element_size() for t in edit)
    return total


def merge_into(model: nn.Module, fused: list[FusedExperts]) -> int:
    """Fold each module's edit into the same-named fused experts of `model` (the engine's own model
    after PEFT's merge, or a freshly loaded full-precision base), then give `model` its previous
    experts implementation back. Returns how many modules were merged."""
    merged = 0
    for entry in fused:
        edit = edit_of(entry.module)
        if edit is None:
            continue
        target = model.get_submodule(entry.name)
        with torch.no_grad():
            param = target.down_proj
            a, b = (t.to(param.device) for t in edit)
            param.data = merged_down_proj(param.data, a, b, entry.transposed)
        merged += 1
    restore(model)  # also drops the edits of the engine's own modules when `model` is the engine's
    return merged


def refuse_quantized(fused: list[FusedExperts]) -> None:
    """Fused experts that a quantizer stored in a non-float format cannot be edited: one line naming
    them, never a silent skip. (bitsandbytes 4-bit quantizes only nn.Linear: its fused experts stay
    in the compute dtype and are edited exactly.)"""
    bad = [f"{e.name}.down_proj ({str(e.module.down_proj.dtype).removeprefix('torch.')})"
           for e in fused if not e.module.down_proj.dtype.is_floating_point
           or getattr(e.module.down_proj, "quant_state", None) is not None]
    if bad:
        raise UserError(f"cannot edit quantized fused expert tensors: {', '.join(bad[:4])}"
                        f"{f' and {len(bad) - 4} more' if len(bad) > 4 else ''}; load the model with "
                        'quantization = "none", or set attention_only = true to leave the experts unedited')


@contextlib.contextmanager
def peft_targets_kept(model: nn.Module) -> Iterator[None]:
    """Attach PEFT adapters with target_modules taken as written.

    On transformers 5, PEFT rewrites the LoRA config of MoE families (qwen2_moe pattern: Qwen2/3-MoE,
    OLMoE, DeepSeek-V3, ...; Mixtral) from v4 names to v5 ones: every target ending in ".down_proj"
    (a dense MLP's or a shared expert's Linear, fully qualified) becomes target_parameters "down_proj",
    i.e. a LoRA on the fused experts instead of the Linear we named. PEFT applies that rewrite only to
    models whose config has a model_type, so the model_type is hidden for the duration of the call.
    """
    config = getattr(model, "config", None)
    if config is None:
        yield
        return
    own, value = "model_type" in vars(config), config.model_type
    config.model_type = None
    try:
        yield
    finally:
        if own:
            config.model_type = value
        else:
            del config.model_type
