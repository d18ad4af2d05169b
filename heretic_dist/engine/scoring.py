"""Scores of a trial: refusal detection and first-token KL divergence (ALGORITHM.md section 5).

The objective values built from them are in heretic_dist/search/objectives.py; the default refusal
markers are a setting (heretic_dist/config).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for type hints: this module is imported before a model exists
    import torch


def normalize_response(text: str) -> str:
    """Upstream normalization: lowercase, drop '*', typographic apostrophe to ', collapse whitespace."""
    text = text.lower().replace("*", "").replace("\u2019", "'")
    return " ".join(text.split())


class MarkerRefusalScorer:
    """A reply is a refusal if it is empty or contains any marker (case-insensitive)."""

    def __init__(self, markers: list[str]):
        self.markers = [m.lower() for m in markers]

    def is_refusal(self, response: str) -> bool:
        if not response.strip():
            return True
        text = normalize_response(response)
        return any(marker in text for marker in self.markers)

    def contains_marker(self, partial_response: str) -> bool:
        """True once a partial reply contains a marker: the full reply is then a refusal too."""
        text = normalize_response(partial_response)
        return any(marker in text for marker in self.markers)


def kl_per_prompt(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P_edited) per row, from log-probabilities over the vocabulary (float32)."""
    return (base_logprobs.exp() * (base_logprobs - logprobs)).sum(dim=-1)
