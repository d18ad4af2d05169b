"""Which modules of each decoder layer the edit targets, per architecture family."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .experts import FusedExperts, fused_layout

log = logging.getLogger(__name__)

# (component, attribute path inside a layer). A path segment "*" iterates an expert list.
_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("attn.o_proj", "self_attn.o_proj"),  # Llama, Qwen2, Mistral, Gemma, Phi-3, ...
    ("attn.o_proj", "linear_attn.out_proj"),  # hybrid linear-attention layers
    ("attn.o_proj", "self_attn.out_proj"),  # LFM transformer blocks
    ("attn.o_proj", "conv.out_proj"),  # LFM operator blocks
    ("mlp.down_proj", "mlp.down_proj"),  # dense MLP
    ("mlp.down_proj", "mlp.shared_expert.down_proj"),  # Qwen2-MoE shared expert
    ("mlp.down_proj", "mlp.shared_experts.down_proj"),  # DeepSeek-V3 shared experts
    ("mlp.down_proj", "mlp.experts.*.down_proj"),  # Qwen2/3-MoE with expert modules
    ("mlp.down_proj", "block_sparse_moe.experts.*.w2"),  # Mixtral / Phi-3.5-MoE (module form)
    ("mlp.down_proj", "feed_forward.w2"),  # LFM
    ("mlp.down_proj", "feed_forward.experts.*.w2"),
    ("mlp.down_proj", "shared_mlp.output_linear"),  # Granite MoE hybrid
    ("mlp.down_proj", "moe.experts.*.output_linear"),
)

# Expert containers that hold stacked weights as parameters rather than Linear modules.
_FUSED_EXPERT_PATHS = ("mlp.experts", "block_sparse_moe.experts", "feed_forward.experts", "moe.experts")

# What a candidate path edits, for the per-layer report: attention, dense MLP, shared or routed experts.
KINDS = ("attention", "dense_mlp", "shared_experts", "routed_experts")


def _kind(component: str, path: str) -> str:
    if component == "attn.o_proj":
        return "attention"
    if "*" in path:
        return "routed_experts"
    return "shared_experts" if "shared" in path else "dense_mlp"


@dataclass
class LayerComponents:
    """Per layer: component -> list of (qualified module name, module)."""

    layers: list[dict[str, list[tuple[str, nn.Module]]]]
    unsupported: list[str] = field(default_factory=list)
    # per layer: the fused routed experts that take the mlp.down_proj edit on the forward path
    fused: list[list[FusedExperts]] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)  # Linear module name -> one of KINDS
    mlp_skipped: bool = False  # attention_only: every MLP left unedited by choice

    @property
    def names(self) -> list[str]:
        present = {c for layer in self.layers for c in layer}
        if any(self.fused):
            present.add("mlp.down_proj")
        return sorted(present)

    def all_fused(self) -> list[FusedExperts]:
        return [entry for layer in self.fused for entry in layer]

    def edited(self) -> list[dict[str, int]]:
        """Per layer, how many modules of each kind take the edit (routed experts: experts, fused or not)."""
        rows = []
        for i, layer in enumerate(self.layers):
            row = dict.fromkeys(KINDS, 0)
            for mods in layer.values():
                for name, _ in mods:
                    row[self.kinds.get(name, "dense_mlp")] += 1
            row["routed_experts"] += sum(e.num_experts for e in (self.fused[i] if self.fused else []))
            rows.append(row)
        return rows

    def module_names(self) -> list[str]:
        return sorted(n for layer in self.layers for mods in layer.values() for n, _ in mods)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list, for plain causal LMs and for image-text models' language part."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    candidates = ("model.language_model.layers", "model.layers", "language_model.model.layers",
                  "transformer.h", "layers")
    for path in candidates:
        obj = _resolve(inner, path)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return path, obj
    raise UserError(
        f"cannot find the decoder layers of {type(inner).__name__}; "
        "heretic-dist supports Llama/Qwen/Mistral/Gemma-style models (model.layers)"
    )


def _resolve(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _expand(layer: nn.Module, path: str) -> list[tuple[str, object]]:
    """Resolve a path with at most one '*' (iterating an expert list) to (relative name, object)."""
    if "*" not in path:
        obj = _resolve(layer, path)
        return [] if obj is None else [(path, obj)]
    head, tail = path.split(".*.")
    container = _resolve(layer, head)
    if container is None or not isinstance(container, (nn.ModuleList, list, tuple)):
        return []
    out = []
    for i, expert in enumerate(container):
        obj = _resolve(expert, tail)
        if obj is not None:
            out.append((f"{head}.{i}.{tail}", obj))
    return out


def find_components(model: nn.Module, mlp: bool = True) -> LayerComponents:
    """Find every abliterable Linear and fused routed-experts module per layer; list (never silently
    skip) what cannot be edited. mlp=False (attention_only) leaves every MLP out by choice."""
    layers_path, layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    result: list[dict[str, list[tuple[str, nn.Module]]]] = []
    fused: list[list[FusedExperts]] = []
    kinds: dict[str, str] = {}
    unsupported: list[str] = []
    for i, layer in enumerate(layers):
        found: dict[str, list[tuple[str, nn.Module]]] = {}
        for component, path in _CANDIDATES:
            if component != "attn.o_proj" and not mlp:
                continue
            for rel, obj in _expand(layer, path):
                if _is_linear(obj):
                    qualified = names.get(id(obj), f"{layers_path}.{i}.{rel}")
                    found.setdefault(component, []).append((qualified, obj))
                    kinds[qualified] = _kind(component, path)
        layer_fused: list[FusedExperts] = []
        for path in _FUSED_EXPERT_PATHS if mlp else ():
            container = _resolve(layer, path)
            if isinstance(container, nn.Module) and not isinstance(container, nn.ModuleList):
                qualified = names.get(id(container), f"{layers_path}.{i}.{path}")
                transposed = fused_layout(container)
                if transposed is not None:
                    layer_fused.append(FusedExperts(qualified, container, transposed))
                    continue
                tensors = [n for n, p in container.named_parameters(recurse=False) if p.dim() == 3]
                if tensors:
                    unsupported.append(f"{qualified} ({', '.join(tensors)})")
        result.append(found)
        fused.append(layer_fused)
    if unsupported:
        log.warning(
            "these expert weights are fused 3-D tensors of a class heretic-dist cannot route (no "
            "transformers experts interface) and are NOT edited: %s", "; ".join(unsupported)
        )
    components = LayerComponents(result, unsupported, fused, kinds, mlp_skipped=not mlp)
    if not components.module_names():
        raise UserError(
            f"{type(model).__name__} has no abliterable module (no attention output projection or "
            "MLP down projection found as a Linear layer); this architecture is not supported"
        )
    return components


def _is_linear(obj: object) -> bool:
    if isinstance(obj, nn.Linear):
        return True
    # bitsandbytes Linear4bit subclasses nn.Linear; other quantized linears expose a 2-D weight.
    weight = getattr(obj, "weight", None)
    return isinstance(obj, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2
