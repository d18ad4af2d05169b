"""PromptSetSpec: where a prompt set comes from (the search's four sets and the evaluation's)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

STRICT = ConfigDict(strict=True, extra="forbid", validate_default=False)


class PromptSetSpec(BaseModel):
    """Where a prompt set comes from. Same keys as upstream's DatasetSpecification."""

    model_config = STRICT

    dataset: str = Field(
        description="Hugging Face dataset id, local file (.txt .jsonl .json .csv .parquet), "
        "a folder saved by `datasets`, or builtin:NAME"
    )
    split: str | None = Field(
        default=None,
        description='Rows to use, e.g. "train[:400]", "[100:200]"; for single files only the slice counts',
    )
    column: str | None = Field(
        default=None, description='Column holding the prompt text (unset: "text"; ignored for .txt)'
    )
    system_prompt: str | None = Field(
        default=None, description="System prompt for this set (unset: the global system_prompt)"
    )
    prefix: str = Field(default="", description="Text put before each prompt (joined with a space)")
    suffix: str = Field(default="", description="Text put after each prompt (joined with a space)")
    commit: str | None = Field(default=None, description="Revision of a hub dataset")
    # Upstream plot cosmetics (config/upstream.py): accepted for compatibility, never used.
    residual_plot_label: str | None = Field(default=None, exclude=True)
    residual_plot_color: str | None = Field(default=None, exclude=True)
