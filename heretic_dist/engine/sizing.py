"""GPU memory of one model replica, estimated without reading weights; where accelerate may put a model.

What `estimate_memory` counts, per rank of a replica:
- weights: every parameter at the load dtype (bf16/fp16 2 bytes, fp32 4; "auto": the config's dtype,
  float32 when it names none). With quantization = "bnb_4bit" the weights of Linear layers take
  FOUR_BIT_BYTES (NF4 with double-quantized constants, ~0.52 byte per parameter); embeddings, the
  output head, norms and fused expert tensors (not Linear modules, which bitsandbytes leaves alone)
  stay at the load dtype. Parameters are counted on the meta device (accelerate.init_empty_weights):
  exact for any architecture transformers can build, no weights read.
- KV cache: 2 (K and V) x layers x KV heads x head dim x bytes per token, for batch x (prompt + reply)
  tokens.
- overhead: the rank-1 LoRA adapters of the edit (fp32, small) and the CUDA context of the process.
With tensor_parallel = T each rank holds 1/T of the Linear weights (the rest is replicated) and 1/T of
the KV heads (at least one). Activations are what `cluster.memory_headroom` keeps free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .types import MemoryNeed

if TYPE_CHECKING:
    from ..config import Settings

GIB = 1024**3
FOUR_BIT_BYTES = 0.52
CUDA_CONTEXT_BYTES = GIB // 2
LORA_RANK = 1
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
CANONICAL_DTYPES = {"half": "float16", "float": "float32", "double": "float64"}
SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class ParameterCount:
    total: int  # every parameter once (tied embeddings counted once)
    linear: int  # in Linear modules other than the output head: what bitsandbytes 4-bit quantizes


_COUNTS: dict[str, ParameterCount] = {}


def text_config(config: Any) -> Any:
    """The language model's config (a vision-language config keeps it in text_config)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def count_parameters(config: Any, trust_remote_code: bool = False) -> ParameterCount:
    """Parameters of the model `config` describes, built on the meta device (cached per config)."""
    key = config.to_json_string(use_diff=False)
    if key in _COUNTS:
        return _COUNTS[key]
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model_class = AutoModelForImageTextToText if getattr(config, "vision_config", None) else AutoModelForCausalLM
    try:
        with init_empty_weights():
            model = model_class.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - an architecture transformers cannot build here
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot count the parameters of a {getattr(config, 'model_type', '?')} model "
                        f"({first}): set cluster.gpus_per_worker to a number") from None
    model.tie_weights()  # init_empty_weights leaves tied embeddings as two tensors until tied
    head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    _COUNTS[key] = ParameterCount(total, linear)
    return _COUNTS[key]


def load_dtype(config: Any, dtypes: list[str]) -> str:
    """The dtype the first entry of `settings.dtypes` loads in: "auto" reads the config."""
    name = CANONICAL_DTYPES.get(dtypes[0], dtypes[0]) if dtypes else "auto"
    if name != "auto":
        return name
    for cfg in (config, text_config(config)):
        found = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if found is not None:
            name = str(found).removeprefix("torch.")
            return CANONICAL_DTYPES.get(name, name)
    return "float32"  # what from_pretrained(dtype="auto") loads when the config names no dtype


def kv_bytes_per_token(config: Any, dtype_bytes: int, tensor_parallel: int = 1) -> int:
    """K and V of one token over all layers, on one rank (KV heads split over ranks, at least one)."""
    cfg = text_config(config)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # multi-head latent attention (DeepSeek) caches keys of nope + rope width and values of v_head_dim
    k_dim = (getattr(cfg, "qk_nope_head_dim", 0) or 0) + (getattr(cfg, "qk_rope_head_dim", 0) or 0) or head_dim
    v_dim = getattr(cfg, "v_head_dim", None) or head_dim
    heads_per_rank = max(1, math.ceil(heads / tensor_parallel))
    return cfg.num_hidden_layers * heads_per_rank * (k_dim + v_dim) * dtype_bytes


def model_label(model: str, dtype: str, quantization: str) -> str:
    """A short name for plan lines: "Qwen2.5-72B-Instruct bf16", "Llama-3.1-70B 4-bit"."""
    name = Path(model.removeprefix("package:").rstrip("/")).name or model
    name = name.removesuffix(".gguf")
    how = "4-bit" if quantization == "bnb_4bit" else SHORT_DTYPES.get(dtype, dtype)
    return f"{name} {how}"


def estimate_memory(config: Any, *, dtype: str, quantization: str, batch: int, tokens: int,
                    tensor_parallel: int = 1, label: str = "model", trust_remote_code: bool = False) -> MemoryNeed:
    """Bytes one rank needs for the model `config` describes (see the module docstring)."""
    if dtype not in DTYPE_BYTES:
        raise UserError(f"cannot size a model loaded as {dtype!r}: give cluster.gpus_per_worker as a number")
    size = DTYPE_BYTES[dtype]
    count = count_parameters(config, trust_remote_code)
    t = max(1, tensor_parallel)
    linear_bytes = FOUR_BIT_BYTES if quantization == "bnb_4bit" else size
    weights = count.linear * linear_bytes / t + (count.total - count.linear) * size
    kv = kv_bytes_per_token(config, size, t) * batch * tokens
    cfg = text_config(config)
    intermediate = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    lora = cfg.num_hidden_layers * LORA_RANK * (3 * cfg.hidden_size + intermediate) * 4  # o_proj + down_proj, fp32
    return MemoryNeed(label, int(weights), int(kv), int(lora + CUDA_CONTEXT_BYTES))


def model_config(settings: Settings) -> Any:
    """The transformers config of `settings.model` (a .gguf file: read from its metadata)."""
    from transformers import AutoConfig

    from .loading import expand_model, resolve_source

    model = expand_model(settings.model)
    try:
        if model.endswith(".gguf") and Path(model).expanduser().is_file():
            path = Path(model).expanduser()
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(resolve_source(model), revision=settings.model_commit,
                                          trust_remote_code=settings.trust_remote_code)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read the config of {settings.model} to size its replicas: {first}; "
                        "set cluster.gpus_per_worker to a number") from None


def memory_need_for(settings: Settings, prompt_tokens: int, response_tokens: int) -> MemoryNeed:
    """What one rank of `settings.model` needs for batches of the largest size the engine tries."""
    config = model_config(settings)
    dtype = load_dtype(config, settings.dtypes)
    batch = settings.batch_size or settings.max_batch_size
    return estimate_memory(config, dtype=dtype, quantization=settings.quantization, batch=batch,
                           tokens=prompt_tokens + response_tokens,
                           tensor_parallel=settings.cluster.tensor_parallel,
                           label=model_label(settings.model, dtype, settings.quantization),
                           trust_remote_code=settings.trust_remote_code)


# -- placement over the GPUs a worker sees ---------------------------------------------------------------


def device_placement(device_map: Any, max_memory: dict[str, str] | None, gpu_bytes: list[int],
                     headroom: float) -> tuple[Any, dict[Any, Any] | None]:
    """(device_map, max_memory) for from_pretrained in a worker that sees GPUs of `gpu_bytes` each.

    The user's max_memory wins (its GPU keys as ints, as accelerate wants them). Else, with an automatic
    device map over two or more GPUs (gpus_per_worker > 1), each GPU gets its memory x (1 - headroom),
    so accelerate balances the layers over all of them and leaves room for the KV cache and
    activations; no "cpu" entry, so a model that does not fit fails its load instead of running
    from host memory. One GPU or none, or an explicit map: upstream Heretic's meaning, unchanged.
    """
    if max_memory:
        return device_map, {int(k) if str(k).isdigit() else k: v for k, v in max_memory.items()}
    if not isinstance(device_map, str) or device_map not in AUTO_DEVICE_MAPS or len(gpu_bytes) < 2:
        return device_map, None
    return device_map, {i: int(b * (1 - headroom)) for i, b in enumerate(gpu_bytes)}


def placement_for(settings: Settings) -> tuple[Any, dict[Any, Any] | None]:
    """device_placement for the CUDA devices this process sees (Ray sets CUDA_VISIBLE_DEVICES)."""
    import torch

    gpus = ([torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return device_placement(settings.device_map, settings.max_memory, gpus, settings.cluster.memory_headroom)

