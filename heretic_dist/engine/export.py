"""Turn a chosen trial into a merged model or a PEFT adapter, then prove the files reload correctly."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import experts
from .engine import Engine
from .passes import render, tokenize
from .types import Prompt, TrialParams
from ..errors import UserError

log = logging.getLogger(__name__)

CHECK_PROMPTS = [
    Prompt("You are a helpful assistant.", "Write a short poem about the sea."),
    Prompt("You are a helpful assistant.", "How do plants make food from sunlight?"),
    Prompt("You are a helpful assistant.", "Give me three tips for better sleep."),
]


@dataclass
class ExportResult:
    path: Path
    kind: str  # "merged" or "adapter"
    max_abs_logit_diff: float


def _logits(model, engine: Engine, prompts: list[Prompt]) -> torch.Tensor:
    inputs = tokenize(engine.tokenizer, render(engine.tokenizer, prompts, engine.response_prefix), model.device)
    with torch.inference_mode():
        return model(**inputs).logits.float().cpu()


def _model_card(settings, trial: dict[str, Any], kind: str) -> str:
    lines = [
        "---",
        "tags: [heretic-dist, abliteration]",
        "---",
        f"# {Path(settings.model).name} (directional ablation, trial {trial.get('number', '?')})",
        "",
        f"This {'adapter' if kind == 'adapter' else 'model'} was made with heretic-dist from `{settings.model}` "
        "by directional ablation: the refusal direction was projected out of attention output and MLP down "
        "projections with the parameters below. It refuses less than the original model; it also has "
        "fewer safeguards. Evaluate it for your use before deploying it.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("refusals", "n_bad_prompts", "base_refusals", "kl"):
        if key in trial:
            lines.append(f"| {key} | {trial[key]} |")
    lines += ["", "## Parameters", "", "```json", json.dumps(trial.get("params", {}), indent=2), "```", ""]
    return "\n".join(lines)


def _full_precision_merge(engine: Engine):
    """4-bit runs: load the full-precision base on CPU, copy the LoRA factors in, merge there."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(engine.loaded.source, dtype=torch.float32, device_map="cpu",
                                                trust_remote_code=engine.settings.trust_remote_code)
    with experts.peft_targets_kept(base):
        peft_model = get_peft_model(base, engine.model.peft_config["default"])
    adapter = {n: p.detach().cpu().float() for n, p in engine.model.named_parameters() if "lora_" in n}
    for name, param in peft_model.named_parameters():
        if name in adapter:
            param.data = adapter[name].to(param.dtype)
    merged = peft_model.merge_and_unload()
    experts.merge_into(merged, engine.fused)  # fused experts stay full precision under bnb 4-bit
    return merged


def _refuse_adapter_with_fused_edits(engine: Engine) -> None:
    """A PEFT LoRA adapter holds factors for Linear modules only; heretic-dist's routed-expert edits
    live beside fused 3-D tensors, which such an adapter cannot carry (PEFT's target_parameters would
    rebuild the full per-expert delta on every forward and is not what this export writes)."""
    edited = [e.name for e in engine.fused if experts.edit_of(e.module) is not None]
    if edited:
        raise UserError(
            f"a PEFT adapter cannot hold this trial's edit of the fused routed experts ({len(edited)} layers, "
            f"e.g. {edited[0]}.down_proj): it holds only the attention, dense-MLP and shared-expert LoRA; "
            "export the merged model instead (drop --adapter), or run with attention_only = true"
        )


def export_trial(engine: Engine, params: TrialParams, trial: dict[str, Any], out: Path,
                 adapter: bool = False, overwrite: bool = False) -> ExportResult:
    """Rebuild `params` on `engine`, save it to `out`, reload the saved files and compare logits."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    edited = engine.edited_model(params)
    if adapter:
        _refuse_adapter_with_fused_edits(engine)
    expected = _logits(edited, engine, CHECK_PROMPTS)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # staged beside the target, so the final rename is atomic (same filesystem)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    except OSError as error:
        raise UserError(f"cannot write the export to {out}: {error.strerror or error}") from None
    try:
        if adapter:
            edited.save_pretrained(staging)
            engine.tokenizer.save_pretrained(staging)
            reloaded = _reload_adapter(engine, staging)
            kind = "adapter"
        else:
            quantized = engine.settings.quantization != "none"
            if quantized:
                merged = _full_precision_merge(engine)
            else:
                merged = edited.merge_and_unload()
                experts.merge_into(merged, engine.fused)  # the routed-expert edits into the weights
            if quantized:
                expected = _logits(merged, engine, CHECK_PROMPTS)  # the 4-bit edit itself differs by quantization
            merged.save_pretrained(staging, safe_serialization=True)
            engine.tokenizer.save_pretrained(staging)
            from transformers import AutoModelForCausalLM

            reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=merged.dtype, device_map="cpu")
            kind = "merged"
        (staging / "README.md").write_text(_model_card(engine.settings, trial, kind))
        (staging / "heretic_dist_trial.json").write_text(json.dumps(trial, indent=2, default=str))
        diff = float((_logits(reloaded, engine, CHECK_PROMPTS) - expected).abs().max())
        tolerance = 1e-3 if reloaded.dtype == torch.float32 else 5e-2
        if adapter and engine.settings.quantization != "none":
            # the adapter reloads on a full-precision base: it cannot match the 4-bit edit exactly
            log.info("4-bit adapter: max logit difference against a full-precision base %.3f", diff)
        elif diff > tolerance:
            raise UserError(f"the exported {kind} does not reproduce the edit (max logit difference {diff:.2e}); "
                            "nothing was written")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out, kind, diff)


def _reload_adapter(engine: Engine, folder: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(engine.loaded.source, dtype=engine.loaded.dtype, device_map="cpu")
    return PeftModel.from_pretrained(base, folder)
