"""Engine: one loaded model with LoRA adapters, and everything a worker does with it."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import torch

from . import experts, head_screen, multi, parallel, passes
from heretic_dist.config import cluster_count
from heretic_dist.search.space import layer_weight

from .ablation import layer_direction, lora_factors
from .components import LayerComponents, find_components
from .drafts import Drafts
from .loading import load_model
from .scoring import MarkerRefusalScorer, kl_per_prompt
from .types import EvaluationRequest, EvaluationResult, PartialResult, Prompt, Shard, TrialParams

log = logging.getLogger(__name__)


CPU_CALL_TOKENS = 32.0  # see Engine.call_tokens


def _batching_switch(attribute: str) -> property:
    """A speed-up switch that changes how log-probs are batched: flipping it drops the cached baselines
    (the other batching changes their last bits)."""
    def get(self) -> bool:
        return getattr(self, attribute)

    def set_(self, value: bool) -> None:
        if value != getattr(self, attribute):
            self._baselines.clear()
        setattr(self, attribute, value)

    return property(get, set_)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class Engine:
    """Holds the model once; trials only rewrite LoRA factors (reset = every B to zero)."""

    def __init__(self, settings, loaded=None):
        self.settings = settings
        # (rank, world size) when this process is one rank of a tensor-parallel replica (engine/parallel.py)
        self.tensor_parallel = parallel.tensor_parallel_env(settings) if loaded is None else None
        self.loaded = loaded or (self._load_rank(settings) if self.tensor_parallel else load_model(settings))
        self.tokenizer = self.loaded.tokenizer
        self.components: LayerComponents = find_components(
            self.loaded.model, mlp=not getattr(settings, "attention_only", False))
        self.rank = settings.full_normalization_lora_rank if settings.row_normalization == "full" else 1
        self.fused = self.components.all_fused()
        experts.refuse_quantized(self.fused)
        if self.tensor_parallel and self.fused:
            from heretic_dist.errors import UserError

            raise UserError("tensor_parallel > 1 does not split fused MoE experts yet: use tensor_parallel = 1 "
                            "with gpus_per_worker > 1 (device_map) for this model")
        self._route_fused_experts()
        k = cluster_count(settings, "trials_per_worker")
        multi.refuse_unsupported(self, k)  # K > 1: one LoRA adapter per trial, chosen per row
        self.adapters = multi.adapter_names(k)
        self.model = self._attach_lora(self.loaded.model)
        if k > 1:
            multi.check_mixed_batch(self)
        self.seed = settings.seed if settings.seed is not None else 0
        self.scorer = MarkerRefusalScorer(settings.refusal_markers)
        self.response_prefix = settings.response_prefix or ""
        self.directions: torch.Tensor | None = None
        self.good_eval: list[Prompt] = []
        self.bad_eval: list[Prompt] = []
        self._baselines: dict[tuple[int, int], torch.Tensor] = {}
        self._row_norms: dict[str, torch.Tensor] = {}
        self._batch = {"forward": settings.batch_size or settings.max_batch_size,
                       "generate": settings.batch_size or settings.max_batch_size}
        # speed-ups that leave results unchanged (tests switch them off to prove it)
        self.early_stop = True
        self.fast_generation = True
        self._sort_by_length = True
        from . import prefix
        from .generation import plain_greedy_supported

        self._plain_greedy = plain_greedy_supported(self.model)
        self._prefix_fits = prefix.supported(self.model)
        self._share_prefix = self._prefix_fits  # the prompts' shared head prefilled once a pass
        # draft tokens from earlier replies (engine/drafts.py); the memory lives as long as the engine
        self.draft_replies = settings.draft_tokens > 0
        self._cost_batches = True  # the KL pass's batches cut by call cost (passes.length_groups)
        # a call's fixed cost in tokens: on the benchmark CPU a query position costs ~1/32 of a decode call
        # (bench_limit's fit: ~100 ms + ~3 ms per position); on GPUs a step is memory-bound (not measured)
        self._call_tokens = CPU_CALL_TOKENS if self.model.device.type == "cpu" else float("inf")
        self._drafts = Drafts(max(settings.draft_tokens, 1))
        self._drafts.policy.position_cost = 1 / self._call_tokens  # 0 where calls cost the same at any width
        self.prepacked_bytes = 0
        self._screen_head = True  # with prepacked weights on a CPU with bfloat16 matmuls
        if settings.prepack_weights:
            self.prepack()

    sort_by_length = _batching_switch("_sort_by_length")
    cost_batches = _batching_switch("_cost_batches")  # the KL pass's batches cut by call cost

    @property
    def screen_head(self) -> bool:
        """Greedy tokens from a bfloat16 screen of the prepacked LM head (engine/head_screen.py)."""
        return head_screen.screen_of(self.model) is not None

    @screen_head.setter
    def screen_head(self, value: bool) -> None:
        self._screen_head, head = value, self.model.get_output_embeddings()
        if not value:
            self.prepacked_bytes -= head_screen.uninstall(head)
        elif self.prepacked_bytes and not self.screen_head:
            self.prepacked_bytes += head_screen.install(head)

    @property
    def share_prefix(self) -> bool:
        return self._share_prefix

    @share_prefix.setter
    def share_prefix(self, value: bool) -> None:
        value = value and self._prefix_fits
        if value != self._share_prefix:
            self._baselines.clear()  # the other path changes the last bits of the log-probs
        self._share_prefix = value

    def prepack(self) -> int:
        """Prepack the frozen CPU linear weights (not the LoRA factors) when memory allows them, with
        the LM head's bfloat16 screen where it applies. Returns the bytes packed (0: not packed)."""
        from .prepack import prepack_model

        if not self.prepacked_bytes:
            self.prepacked_bytes = prepack_model(self.model, self._screen_head)
            if self.prepacked_bytes:
                self._baselines.clear()  # log-probs of the other path differ in the last bits
        return self.prepacked_bytes

    def unpack(self) -> None:
        """Plain forwards again (export merges into the dense weights, which packed copies would miss)."""
        from .prepack import unpack_linears

        if self.prepacked_bytes:
            unpack_linears(self.model)
            self.prepacked_bytes = 0
            self._baselines.clear()

    # --- setup -------------------------------------------------------------------------------

    def _route_fused_experts(self) -> None:
        """Put the fused routed experts on the low-rank forward path; any that cannot go there are
        listed as not edited (never dropped silently)."""
        failed = experts.install(self.loaded.model, self.fused)
        if failed:
            log.warning("these fused expert tensors are NOT edited: %s", "; ".join(failed))
            self.components.unsupported.extend(failed)
            names = {f.split(" ")[0] for f in failed}
            self.fused = [e for e in self.fused if e.name not in names]
            self.components.fused = [[e for e in layer if e.name not in names] for layer in self.components.fused]

    def _load_rank(self, settings):
        """Join the replica's group, load the whole model on the host, keep this rank's shards."""
        rank, world = self.tensor_parallel
        parallel.join_group(rank, world)
        loaded = load_model(settings.model_copy(update={"device_map": "cpu"}))  # AutoTP moves the shards
        loaded.model = parallel.shard_model(loaded.model, world)
        return loaded

    def _attach_lora(self, model):
        if self.tensor_parallel:  # DeepSpeed's shards cannot take PEFT adapters: forward hooks instead
            self._lora = parallel.attach_sharded_edits(dict(m for mods in self.components.layers
                                                            for group in mods.values() for m in group))
            self.reset()
            return model
        from peft import LoraConfig, get_peft_model

        def config() -> LoraConfig:  # one per adapter: PEFT keeps and may rewrite the object it is given
            return LoraConfig(
                r=self.rank,
                lora_alpha=self.rank,  # scale 1: B A is the edit itself
                lora_dropout=0.0,
                target_modules=self.components.module_names(),
                bias="none",
                task_type="CAUSAL_LM",
            )

        with experts.peft_targets_kept(model):
            peft_model = get_peft_model(model, config())
            multi.add_adapters(peft_model, config, len(self.adapters))
        peft_model.eval()
        self._lora = {}
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                self._lora[name.removeprefix("base_model.model.")] = module
        missing = set(self.components.module_names()) - set(self._lora)
        if missing:
            raise RuntimeError(f"LoRA adapters missing for {sorted(missing)[:3]}")
        self.reset()
        return peft_model

    def info(self) -> dict[str, Any]:
        return {
            "n_layers": len(self.components.layers),
            "components": self.components.names,
            "modules": len(self.components.module_names()),
            "unsupported": self.components.unsupported,
            "edited": self.edited_info(),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "device": str(self.model.device),
            "tensor_parallel": self.tensor_parallel[1] if self.tensor_parallel else 1,
            "host": socket.gethostname(),
            "load_seconds": self.loaded.load_seconds,
            "response_prefix": self.response_prefix,
        }

    def edited_info(self) -> dict[str, Any]:
        """What takes the edit, per layer and in total (check, run start lines and the report)."""
        per_layer = self.components.edited()
        totals = {k: sum(row[k] for row in per_layer) for k in per_layer[0]} if per_layer else {}
        expert_bytes = sum(e.nbytes for e in self.fused)
        return {
            "per_layer": per_layer,
            "totals": totals,
            "fused_expert_modules": len(self.fused),
            "fused_layout": sorted({"(E, in, out) x @ W" if e.transposed else "(E, out, in)" for e in self.fused}),
            "fused_expert_bytes": expert_bytes,
            "mlp_skipped": self.components.mlp_skipped,
            "not_edited": list(self.components.unsupported),
        }

    def set_response_prefix(self, prefix: str) -> None:
        if prefix != self.response_prefix:
            self._baselines.clear()
        self.response_prefix = prefix

    def set_directions(self, directions: torch.Tensor) -> None:
        expected = (len(self.components.layers) + 1, self.model.config.get_text_config().hidden_size)
        if tuple(directions.shape) != expected:
            raise ValueError(f"directions have shape {tuple(directions.shape)}, this model needs {expected}")
        self.directions = directions.to(torch.float32)

    def set_eval_prompts(self, good: list[Prompt], bad: list[Prompt]) -> None:
        self.good_eval, self.bad_eval = list(good), list(bad)
        self._baselines.clear()

    # --- passes ------------------------------------------------------------------------------

    def _with_batch(self, kind: str, fn):
        """Run fn(batch_size); on out-of-memory halve the batch size for this kind of call and retry."""
        while True:
            try:
                return fn(self._batch[kind])
            except Exception as error:
                if not _is_oom(error) or self._batch[kind] == 1:
                    raise
                self._batch[kind] = max(1, self._batch[kind] // 2)
                log.warning("out of memory; %s batch size now %d", kind, self._batch[kind])
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def responses(self, prompts: list[Prompt], skip_special_tokens: bool = False) -> list[str]:
        return self._with_batch("generate", lambda b: passes.generate_replies(
            self.model, self.tokenizer, prompts, self.response_prefix,
            self.settings.max_response_length, b, skip_special_tokens))

    def prefix_replies(self, prompts: list[Prompt], response_prefix: str | None = None) -> list[str]:
        """Replies (special tokens kept) generated just far enough that their common prefix is the
        one of the full replies: most stop after a few tokens, once two replies differ."""
        prefix = self.response_prefix if response_prefix is None else response_prefix
        return self._with_batch("generate", lambda b: passes.generate_replies(
            self.model, self.tokenizer, prompts, prefix, self.settings.max_response_length, b,
            False, settle=passes.CommonPrefixBound()))

    def detect_response_prefix(self, prompts: list[Prompt]) -> str:
        def generate(prefix: str) -> list[str]:
            return self.prefix_replies(prompts, prefix)

        return passes.detect_response_prefix(generate, self.settings.chain_of_thought_skips)

    def residual_sums(self, prompts: list[Prompt]) -> tuple[torch.Tensor, int]:
        self.reset()
        return self._with_batch("forward", lambda b: passes.residual_sums(
            self.model, self.tokenizer, prompts, self.response_prefix, b,
            self.settings.winsorization_quantile))

    def residuals(self, prompts: list[Prompt]) -> torch.Tensor:
        """First-token residuals of the unedited model per prompt: (n, L+2 rows, d), float32."""
        self.reset()
        return self._with_batch("forward", lambda b: passes.residuals(
            self.model, self.tokenizer, prompts, self.response_prefix, b,
            self.settings.winsorization_quantile))

    def logprobs(self, prompts: list[Prompt], adapters: list[str] | None = None) -> torch.Tensor:
        """First-token log-probs; `adapters`: each prompt's LoRA adapter (None: the active one)."""
        return self._with_batch("forward", lambda b: passes.logprobs(
            self.model, self.tokenizer, prompts, self.response_prefix, b, self.sort_by_length, adapters,
            self.share_prefix, self.call_tokens()))

    def call_tokens(self) -> float:
        """A forward call's fixed cost (re-reading every weight) in tokens of its per-token cost, for
        cutting the KL pass's batches. A constant, so the unedited model's baseline and every trial are
        batched alike: on the benchmark CPU a call costs ~90-100 ms plus ~2-3 ms per token
        (docs/benchmarks.md, bench_limit). Not measured on GPUs: plain batches there."""
        return self._call_tokens if self._cost_batches else float("inf")

    def refusal_replies(self, prompts: list[Prompt], adapters: list[str] | None = None) -> list[str]:
        """Replies to score (a reply may stop early once it contains a marker: its verdict is fixed).
        `adapters`: each prompt's LoRA adapter (None: the active one)."""
        stop = self.scorer.contains_marker if self.early_stop else None
        if self.fast_generation and self._plain_greedy:
            from .generation import greedy_replies

            texts = passes.render(self.tokenizer, prompts, self.response_prefix)
            return self._with_batch("generate", lambda b: greedy_replies(
                self.model, self.tokenizer, texts, self.settings.max_response_length, b, stop, adapters,
                self.share_prefix, self._drafts if self.draft_replies else None))
        return self._with_batch("generate", lambda b: passes.generate_replies(
            self.model, self.tokenizer, prompts, self.response_prefix,
            self.settings.max_response_length, b, True, stop, adapters=adapters))

    def full_replies(self, prompts: list[Prompt], adapters: list[str] | None = None) -> list[str]:
        """Refusal replies without the marker early stop (a judge reads all of each reply)."""
        early, self.early_stop = self.early_stop, False
        try:
            return self.refusal_replies(prompts, adapters)
        finally:
            self.early_stop = early

    def count_refusals(self, prompts: list[Prompt]) -> int:
        return sum(self.scorer.is_refusal(r) for r in self.refusal_replies(prompts))

    @classmethod
    def model_identity(cls, settings) -> dict[str, str]:
        from .loading import model_identity

        return model_identity(settings.model, settings.model_commit)

    def warm_baselines(self, shards: list[Shard]) -> None:
        for shard in shards:
            self.baseline(shard)

    def baseline(self, shard: Shard) -> torch.Tensor:
        """Log-probs of the unedited model on this shard's harmless prompts, computed once."""
        key = (shard.index, shard.count)
        if key not in self._baselines:
            self.reset()
            self._baselines[key] = self.logprobs(shard.take(self.good_eval))
        return self._baselines[key]

    # --- the edit ----------------------------------------------------------------------------

    def reset(self, adapter: str | None = None) -> None:
        """Every B of `adapter` to zero (None: of every adapter). Fused expert edits exist only with the
        one adapter "default" (multi.refuse_unsupported), so they go with it."""
        names = self.adapters if adapter is None else [adapter]
        for module in self._lora.values():
            if isinstance(module, parallel.ShardedEdit):
                module.clear()
            else:
                for name in names:
                    torch.nn.init.zeros_(module.lora_B[name].weight)
        if "default" in names:
            experts.clear_edits(self.fused)  # the base expert weights were never written: bit-exact

    def _base_weight(self, name: str, module) -> torch.Tensor:
        base = module.base_layer.weight
        quant_state = getattr(base, "quant_state", None)
        if quant_state is None:
            return base.detach().to(torch.float32)
        from .quant import dequantize_4bit

        return dequantize_4bit(base, quant_state).to(torch.float32)

    def apply(self, params: TrialParams, adapter: str = "default") -> None:
        """Reset `adapter`, then write the LoRA factors of `params` into it, in every module it edits."""
        if self.directions is None:
            raise RuntimeError("set_directions() must be called before a trial")
        self.reset(adapter)
        mode = self.settings.row_normalization
        for layer_index, layer in enumerate(self.components.layers):
            fused = self.components.fused[layer_index] if self.components.fused else []
            present = dict(layer) if not fused else {"mlp.down_proj": [], **layer}
            for component, modules in present.items():
                kernel = params.components.get(component)
                if kernel is None:
                    continue
                w = layer_weight(layer_index, kernel)
                if w == 0.0:
                    continue  # zero weight: no edit, skip the work
                v = layer_direction(self.directions, params, layer_index)
                if component == "mlp.down_proj":
                    self._apply_fused(layer_index, v, w)
                for group in self._same_shape_groups(modules):
                    # one batched call for modules that share a shape (a layer's experts)
                    weights = [self._base_weight(name, self._lora[name]) for name in group]
                    weights = [x.view(x.shape[0], -1) for x in weights]
                    stacked = weights[0][None] if len(weights) == 1 else torch.stack(weights)
                    layout = getattr(self._lora[group[0]], "layout", None)  # a row-parallel shard's
                    a, b = lora_factors(stacked, v.to(stacked.device), w, mode, self.rank, self.seed, layout)
                    for i, name in enumerate(group):
                        self._write(name, a[i], b[i], adapter)

    def _write(self, name: str, a: torch.Tensor, b: torch.Tensor, adapter: str = "default") -> None:
        module = self._lora[name]
        if isinstance(module, parallel.ShardedEdit):
            module.set(a, b)
            return
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        lora_a.data = a.to(device=lora_a.device, dtype=lora_a.dtype).contiguous()
        lora_b.data = b.to(device=lora_b.device, dtype=lora_b.dtype).contiguous()

    def _apply_fused(self, layer_index: int, v: torch.Tensor, w: float) -> None:
        """The same per-expert factors a module-list expert's LoRA gets, kept beside the fused tensor."""
        mode = self.settings.row_normalization
        for entry in self.components.fused[layer_index]:
            a, b = experts.expert_factors(entry.weights(), v, w, mode, self.rank, self.seed)
            experts.set_edit(entry.module, a, b)

    def _same_shape_groups(self, modules: list[tuple[str, Any]], max_bytes: int = 256 << 20) -> list[list[str]]:
        """Module names grouped by shape and device, each group's float32 stack at most max_bytes."""
        if self.tensor_parallel:
            return [[name] for name, _ in modules]  # each shard's factors need the group's collectives
        groups: dict[tuple, list[str]] = {}
        for name, _ in modules:
            base = self._lora[name].base_layer
            groups.setdefault((base.out_features, base.in_features, str(base.weight.device)), []).append(name)
        chunks = []
        for (d_out, d_in, _), names in groups.items():
            per_chunk = max(1, max_bytes // (4 * d_out * d_in))
            chunks += [names[i : i + per_chunk] for i in range(0, len(names), per_chunk)]
        return chunks

    def edited_model(self, params: TrialParams | None):
        """The PEFT model with `params` applied (for export: plain forwards, so a merge is seen)."""
        self.unpack()
        if params is None:
            self.reset()
        else:
            self.apply(params)
        return self.model

    # --- a trial -----------------------------------------------------------------------------

    def run_trial(self, params: TrialParams | None, shard: Shard) -> PartialResult:
        """Score `params` (None = the unedited model) on this shard of the evaluation prompts."""
        good, bad = shard.take(self.good_eval), shard.take(self.bad_eval)
        base = self.baseline(shard) if good else None
        t0 = time.perf_counter()
        if params is None:
            self.reset()
        else:
            self.apply(params)
        t1 = time.perf_counter()
        kl_sum = float(kl_per_prompt(base, self.logprobs(good)).sum()) if good else 0.0
        t2 = time.perf_counter()
        to_judge = None
        if self.over_kl_gate(kl_sum, len(good)):
            refusals = len(bad)  # opt-in shortcut: too far from the original, score as refusing all
        elif self.settings.refusal_judge is not None and bad:
            refusals, to_judge = 0, list(zip((p.user for p in bad), self.full_replies(bad)))  # the worker judges
        else:
            refusals = self.count_refusals(bad) if bad else 0
        t3 = time.perf_counter()
        return PartialResult(
            refusals=refusals,
            bad_scored=len(bad),
            kl_sum=kl_sum,
            good_scored=len(good),
            timings={"edit_s": t1 - t0, "kl_s": t2 - t1, "generation_s": t3 - t2},
            host=socket.gethostname(),
            replies_to_judge=to_judge,
        )

    def over_kl_gate(self, kl_sum: float, n_good: int) -> bool:
        """kl_gate (opt-in): a trial this far from the original skips generation, scored as refusing all."""
        gate = self.settings.kl_gate
        return gate is not None and n_good > 0 and kl_sum / n_good > gate

    def run_trials(self, items: list[tuple[TrialParams | None, Shard]]) -> list[PartialResult]:
        """Up to trials_per_worker trials in one batched KL pass and one batched generation, each on
        its own adapter (engine/multi.py); each result is what run_trial gives it alone. One item takes
        the run_trial path itself; more items than adapters raise ValueError."""
        return multi.run_trials(self, items)

    def evaluate(self, params: TrialParams | None, request: EvaluationRequest) -> EvaluationResult:
        """evaluate-front: long replies, multi-token KL and perplexity of `params` (None = the unedited
        model), engine/evaluation.py. The base model's references are computed once per request.key with
        the model reset and kept on the engine; the edit is then applied again."""
        from .evaluation import evaluate

        return evaluate(self, params, request, self.__dict__.setdefault("_evaluation_refs", {}))
