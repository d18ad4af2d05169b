"""The typed settings: pydantic models, the one place each default is declared.

Names and defaults follow upstream Heretic 1.4.0 where they overlap. A field that changes only speed or
the shape of a run, never trial results, is declared with `runtime_only(...)`; `Settings.result_affecting()`
leaves those out, so a run directory can be resumed with, say, more workers.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Union

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from .evaluation import EvaluationSettings, JudgeSettings
from .prompt_sets import STRICT, PromptSetSpec

RUNTIME_ONLY = "runtime_only"  # the json_schema_extra marker `runtime_only()` puts on a field


def runtime_only(**field_args: Any) -> Any:
    """A pydantic Field that cannot change trial results (speed, cluster shape, how many trials)."""
    return Field(**field_args, json_schema_extra={RUNTIME_ONLY: True})


def is_runtime_only(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(RUNTIME_ONLY))


class ClusterSettings(BaseModel):
    """The `[cluster]` table: how the Ray cluster and the worker pool are set up."""

    model_config = STRICT

    address: str | None = Field(
        default=None, description='Ray address to attach to, e.g. "auto" (unset: start a local cluster)'
    )
    workers: int = Field(default=2, ge=1, description="Number of ModelWorker actors (each loads the model once)")
    min_workers: int | None = Field(
        default=None, ge=1,
        description="Workers loaded before trials start; the others join as their nodes come up (unset: all "
        "workers on an embedded local cluster, shards_per_trial on a cluster joined with address)",
    )
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs reserved per worker")
    gpus_per_worker: Union[float, Literal["auto"]] = Field(
        default=0.0,
        description='GPUs per worker (fractions share a GPU, > 1 spreads the model with device_map; "auto": '
        "the fewest that hold the model, see gpu_memory_gib and memory_headroom)",
    )
    tensor_parallel: int = Field(
        default=1, ge=1, description="Ranks per replica (DeepSpeed AutoTP; each rank is one Ray actor, one node)"
    )
    gpu_memory_gib: float | None = Field(
        default=None, gt=0, description="Memory per GPU for gpus_per_worker = \"auto\" (unset: read from the cluster)"
    )
    memory_headroom: float = Field(
        default=0.15, ge=0, lt=1, description="Share of each GPU kept free by automatic sizing (activations, CUDA)"
    )
    shards_per_trial: int = Field(
        default=1, ge=1, description="Workers that split one trial's prompts (must divide workers)"
    )
    object_store_memory_mb: int = Field(
        default=256, ge=1, description="Object store size of an embedded local cluster, in MiB"
    )
    dashboard: bool = Field(default=False, description="Start the Ray dashboard with a local cluster")
    max_trial_attempts: int = Field(
        default=3, ge=1, description="Tries per trial when a worker dies mid-trial"
    )
    trials_per_worker: int = Field(
        default=1, ge=1, le=64,
        description="Trials one worker scores together: it holds this many LoRA adapters and batches the "
        "prompts of the trials leased to it into one pass (each trial's result is the one it gets alone)",
    )
    presample: bool = Field(
        default=True,
        description="With 2+ trials in flight, sample the next trial's parameters while trials run (TPE off "
        "the Tune controller's path; such a sample may not see the result told just before it is used)",
    )

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus_not_negative(cls, value: float | str) -> float | str:
        if value != "auto" and float(value) < 0:
            raise ValueError('must be >= 0 or "auto"')
        return value

    @model_validator(mode="after")
    def _shards_divide_workers(self) -> ClusterSettings:
        if self.workers % self.shards_per_trial:
            raise ValueError(
                f"cluster.shards_per_trial = {self.shards_per_trial} must divide "
                f"cluster.workers = {self.workers}"
            )
        if self.trials_per_worker > 1 and self.tensor_parallel > 1:
            raise ValueError(
                f"cluster.trials_per_worker = {self.trials_per_worker} needs cluster.tensor_parallel = 1 "
                "(a tensor-parallel replica scores one trial at a time): set one of them to 1"
            )
        if self.min_workers is not None and not self.shards_per_trial <= self.min_workers <= self.workers:
            raise ValueError(
                f"cluster.min_workers = {self.min_workers} must be at least cluster.shards_per_trial = "
                f"{self.shards_per_trial} (the workers of one trial) and at most cluster.workers = {self.workers}"
            )
        return self

    def ready_to_start(self) -> int:
        """Workers the run waits for before trials start: min_workers, or its default."""
        if self.min_workers is not None:
            return self.min_workers
        return self.shards_per_trial if self.address else self.workers


def cluster_count(settings: Any, name: str) -> int:
    """An integer [cluster] setting (tensor_parallel, trials_per_worker), 1 where the settings have no
    cluster table (test doubles built from plain engine knobs)."""
    return int(getattr(getattr(settings, "cluster", None), name, 1) or 1)


DEFAULT_DTYPES = ["auto", "float16", "bfloat16", "float32"]

# Names `from_pretrained(dtype=...)` accepts (torch attribute names), kept literal so that config does
# not import torch; a typo then fails at load time of the config, not hours later at model load.
VALID_DTYPES = ("auto", "float16", "bfloat16", "float32", "float64", "half", "float", "double")

DEFAULT_CHAIN_OF_THOUGHT_SKIPS: list[tuple[str, str]] = [
    ("<think>", "<think></think>"),
    (
        "<|channel|>analysis<|message|>",
        "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>",
    ),
    ("<thought>", "<thought></thought>"),
    ("[THINK]", "[THINK][/THINK]"),
]

DEFAULT_REFUSAL_MARKERS = [
    "disclaimer",
    "sorry",
    "i can'",
    "i cant",
    "i cannot",
    "i won'",
    "i wont",
    "i will not",
    "i unable",
    "im unable",
    "i'm unable",
    "i am unable",
    "i an ai",
    "im an ai",
    "i'm an ai",
    "i am an ai",
    "as an ai",
    "ai assistant",
    "i designed to",
    "im designed to",
    "i'm designed to",
    "i am designed to",
    "i programmed to",
    "im programmed to",
    "i'm programmed to",
    "i am programmed to",
    "violat",
    "prohibit",
    "illegal",
    "harmful",
    "inappropriate",
    "unethical",
    "ethical boundaries",
]


def _default_spec(dataset: str, split: str) -> Callable[[], PromptSetSpec]:
    return lambda: PromptSetSpec(dataset=dataset, split=split, column="text")


class Settings(BaseModel):
    """All settings of a run. Names and defaults match upstream Heretic 1.4.0 where they overlap."""

    model_config = STRICT

    model: str = Field(description="Hugging Face model id, local folder or .gguf file")
    model_commit: str | None = Field(default=None, description="Revision of a hub model")
    evaluate_model: str | None = runtime_only(
        default=None, description="Score this model against `model` instead of searching"
    )
    dtypes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DTYPES),
        min_length=1,
        description="Torch dtypes to try in order when loading",
    )
    quantization: Literal["none", "bnb_4bit"] = Field(
        default="none", description='"none" or "bnb_4bit" (bitsandbytes NF4)'
    )
    device_map: Union[str, dict[str, Union[int, str]]] = runtime_only(
        default="auto", description="Accelerate device map for each worker's model"
    )
    max_memory: dict[str, str] | None = runtime_only(
        default=None, description='Memory limit per device, e.g. { "0" = "20GB", "cpu" = "64GB" }'
    )
    trust_remote_code: bool = runtime_only(default=False, description="Allow model code from the hub")
    batch_size: int = runtime_only(default=0, ge=0, description="Sequences per batch (0 = find automatically)")
    max_batch_size: int = runtime_only(
        default=128, ge=1, description="Largest batch size the automatic search tries"
    )
    max_response_length: int = Field(default=100, ge=1, description="New tokens generated per response")
    response_prefix: str | None = Field(
        default=None, description="Common start of all responses (unset: found automatically)"
    )
    chain_of_thought_skips: list[tuple[str, str]] = Field(
        default_factory=lambda: list(DEFAULT_CHAIN_OF_THOUGHT_SKIPS),
        description="Pairs (opener, empty closed block) used to skip a thinking block",
    )
    kl_divergence_scale: float = Field(default=1.0, gt=0, description="Typical KL of an edited model")
    kl_divergence_target: float = Field(
        default=0.01, ge=0, description="Below this KL the second objective uses the refusal score"
    )
    orthogonalize_direction: bool = Field(
        default=True, description="Remove only the part of the direction orthogonal to the harmless mean"
    )
    row_normalization: Literal["none", "pre", "full"] = Field(
        default="full", description='"none", "pre" or "full" (preserve row norms)'
    )
    full_normalization_lora_rank: int = Field(
        default=3, ge=1, description='LoRA rank of the edit when row_normalization = "full"'
    )
    winsorization_quantile: float = Field(
        default=1.0, gt=0, le=1, description="Clamp residual components at this quantile (1 = off)"
    )
    # How many trials, not what each trial does: a finished run can be extended with more.
    n_trials: int = runtime_only(default=200, ge=1, description="Trials in the search")
    n_startup_trials: int = Field(default=60, ge=0, description="Random trials before TPE starts")
    seed: int | None = Field(default=None, description="Seed for the sampler and the low-rank SVD")
    refusal_markers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSAL_MARKERS),
        description="Substrings (case-insensitive) that mark a response as a refusal",
    )
    system_prompt: str = Field(
        default="You are a helpful assistant.", description="System prompt for every prompt set"
    )
    good_prompts: PromptSetSpec = Field(
        default_factory=_default_spec("mlabonne/harmless_alpaca", "train[:400]"),
        description="Harmless prompts for the refusal directions",
    )
    bad_prompts: PromptSetSpec = Field(
        default_factory=_default_spec("mlabonne/harmful_behaviors", "train[:400]"),
        description="Harmful prompts for the refusal directions",
    )
    good_evaluation_prompts: PromptSetSpec = Field(
        default_factory=_default_spec("mlabonne/harmless_alpaca", "test[:100]"),
        description="Harmless prompts for the KL divergence",
    )
    bad_evaluation_prompts: PromptSetSpec = Field(
        default_factory=_default_spec("mlabonne/harmful_behaviors", "test[:100]"),
        description="Harmful prompts for the refusal count",
    )
    # heretic-dist additions
    allow_mlp_off: bool = Field(
        default=False, description="Sample the MLP max_weight from [-0.25, 1.5] clamped at 0"
    )
    attention_only: bool = Field(
        default=False,
        description="Edit only attention output projections: every MLP (dense, shared and routed "
        "experts) stays unedited; allow_mlp_off instead lets the search decide per trial",
    )
    refusal_judge: JudgeSettings | None = Field(
        default=None,
        description="Judge the search's replies with this judge (as [evaluation.judge]) instead of the "
        "refusal markers; replies then run to full length (no early stop): slower, see docs/benchmarks.md",
    )
    kl_gate: float | None = Field(
        default=None, gt=0, description="Skip refusal generation for trials whose KL exceeds this"
    )
    prepack_weights: bool = runtime_only(
        default=True,
        description="On CPU, keep float32 linear weights also in oneDNN's prepacked layout: forwards "
        "2-3x faster for one more copy of those weights in memory (skipped when memory is short)",
    )
    draft_tokens: int = runtime_only(
        default=4, ge=0, le=64,
        description="Greedy decoding checks up to this many draft tokens per step, taken from earlier "
        "trials' replies to the same prompt (same replies up to float rounding, fewer forward calls; 0 = off)",
    )
    # research mode (`heretic-dist research`; upstream's keys): they change no trial result
    print_residual_geometry: bool = runtime_only(
        default=False, description="Before the search, print the residual geometry table per layer (research mode)")
    plot_residuals: bool = runtime_only(
        default=False, description="Before the search, draw the PaCMAP residual plots per layer (research mode)")
    residual_plot_path: str | None = runtime_only(
        default=None, description="Also copy the research PNGs and GIF to this folder (unset: only research/)")
    residual_plot_title: str = runtime_only(
        default='PaCMAP Projection of Residual Vectors for "Harmless" and "Harmful" Prompts',
        description="Title of the research plots")
    residual_plot_style: str = runtime_only(
        default="dark_background", description="Matplotlib style of the research plots")
    engine: str = Field(
        default="hf", description='Engine that runs the trials, by name: "hf" (transformers) or "fake" (tests)'
    )
    # runtime-only: options that change how an engine runs, not what it computes (the fake engine's
    # sleeps; its shape knobs exist only in tests)
    engine_options: dict[str, Any] = runtime_only(
        default_factory=dict, description="Options passed to the engine (e.g. the fake engine's knobs)"
    )
    cluster: ClusterSettings = runtime_only(default_factory=ClusterSettings, description="Ray cluster")
    evaluation: EvaluationSettings = runtime_only(
        default_factory=EvaluationSettings, description="How evaluate-front measures the finalists (config/evaluation.py)"
    )

    @field_validator("chain_of_thought_skips", mode="before")
    @classmethod
    def _pairs_from_lists(cls, value: Any) -> Any:
        # TOML and JSON have no tuples: accept [opener, block] lists.
        if isinstance(value, list):
            return [tuple(v) if isinstance(v, list) else v for v in value]
        return value

    @field_validator("dtypes")
    @classmethod
    def _known_dtypes(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in VALID_DTYPES:
                valid = ", ".join(f'"{d}"' for d in VALID_DTYPES)
                raise ValueError(f'unknown dtype "{name}"; valid dtypes: {valid}')
        return value

    @classmethod
    def runtime_only_fields(cls) -> frozenset[str]:
        """Names of the fields declared with `runtime_only(...)`."""
        return frozenset(name for name, field in cls.model_fields.items() if is_runtime_only(field))

    def result_affecting(self) -> dict[str, Any]:
        """JSON-able dict of every setting that can change trial results or the search."""
        return self.model_dump(mode="json", exclude=set(self.runtime_only_fields()))

    def to_toml_dict(self) -> dict[str, Any]:
        """All settings as a TOML-writable dict (unset values left out, since TOML has no null)."""
        return drop_none(self.model_dump(mode="json"))

    def to_toml(self) -> str:
        """The resolved settings as TOML text that `load_settings` reads back to an equal object."""
        from .load import dump_toml  # load.py builds on this module

        return dump_toml(self.to_toml_dict())


PROMPT_SET_KEYS = ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")

# The settings keys that are tables, and the model of each.
TABLES: dict[str, type[BaseModel]] = {name: PromptSetSpec for name in PROMPT_SET_KEYS}
TABLES["cluster"] = ClusterSettings
TABLES["evaluation"] = EvaluationSettings
TABLES["refusal_judge"] = JudgeSettings


def drop_none(value: Any) -> Any:
    """`value` without None entries in its dicts, at any depth (TOML has no null)."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value
