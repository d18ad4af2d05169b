"""What every refusal judge is (Verdict, Judge), the thinking stripper, and the registry by name.

A judge sees (prompt, reply) pairs on the driver and says which replies refuse. Judges are chosen by
name in `[evaluation.judge]` (lm-evaluation-harness-style registry); the heavy ones (a classifier in
a Ray actor, an HTTP endpoint) are imported only when chosen, so `import heretic_dist.evaluation`
stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from heretic_dist.errors import UserError

if TYPE_CHECKING:
    from heretic_dist.config.evaluation import JudgeSettings

    from ..cache import JudgementCache


@dataclass(frozen=True)
class Verdict:
    """One judged reply: `score` in [0, 1], higher = more refusing; `refusal` = the judge's call."""

    refusal: bool
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"refusal": self.refusal, "score": self.score}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        score = float(data["score"])
        if not isinstance(data["refusal"], bool) or not 0.0 <= score <= 1.0:
            raise ValueError(f"not a verdict: {data!r}")
        return cls(refusal=data["refusal"], score=score)


@runtime_checkable
class Judge(Protocol):
    """The contract `evaluate-front` relies on; any object with these members is a judge."""

    name: str

    def identity(self) -> dict[str, Any]:
        """Everything that determines the verdicts (the cache key hashes it); never a secret."""
        ...

    def start(self) -> None:
        """Get ready (start an actor, load a model) once Ray is up; judge() does it on first use.
        Constructing a judge starts nothing, so identity() works before Ray exists; idempotent."""
        ...

    def judge(self, items: Sequence[tuple[str, str]]) -> list[Verdict]:
        """One verdict per (prompt, reply), in order. Raises UserError (one line) on failure."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters for the report: calls, items, retries, failures, cache hits..."""
        ...

    def close(self) -> None:
        """Free what the judge holds (an actor, threads); idempotent."""
        ...


def strip_thinking(reply: str, thinking_tags: Sequence[tuple[str, str]], response_prefix: str = "") -> str:
    """The answer part of a reply: only the answer is judged, not what the model thought about.

    Removes `response_prefix` at the start (the run forced it into the reply), then every
    open..close thinking block; an open tag never closed drops everything after it (the model was
    still thinking). A close tag before any open tag (the chat template opened the block in the
    prompt, as reasoning models' templates do) drops everything before it.
    """
    text = reply[len(response_prefix):] if response_prefix and reply.startswith(response_prefix) else reply
    tags = [(o, c) for o, c in thinking_tags if o and c]
    orphan = _orphan_close(text, tags)
    if orphan is not None:
        text = text[orphan:]
    parts: list[str] = []
    pos = 0
    while True:
        hit = _first_open(text, pos, tags)
        if hit is None:
            parts.append(text[pos:])
            break
        start, open_tag, close_tag = hit
        parts.append(text[pos:start])
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            break
        pos = end + len(close_tag)
    return "".join(parts).strip()


def _first_open(text: str, pos: int, tags: list[tuple[str, str]]) -> tuple[int, str, str] | None:
    """The earliest open tag at or after pos (the longest one when two start at the same place)."""
    best: tuple[int, str, str] | None = None
    for open_tag, close_tag in tags:
        i = text.find(open_tag, pos)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(open_tag) > len(best[1]))):
            best = (i, open_tag, close_tag)
    return best


def _orphan_close(text: str, tags: list[tuple[str, str]]) -> int | None:
    """End of the first close tag if no open tag comes before it (the prompt opened the block)."""
    hits = [(i, i + len(close_tag)) for _, close_tag in tags if (i := text.find(close_tag)) >= 0]
    if not hits:
        return None
    start, end = min(hits)
    opened = _first_open(text, 0, tags)
    return end if opened is None or opened[0] > start else None


def format_question(question: str, prompt: str, reply: str) -> str:
    """The judge question with the request and the reply put in ({prompt} and {reply})."""
    return question.format(prompt=prompt, reply=reply)


def check_question(question: str) -> None:
    """Fail at the start, in one line, if the question cannot be filled in or omits the reply."""
    try:
        filled = format_question(question, "\x00prompt\x00", "\x00reply\x00")
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(
            f"evaluation.judge.question has a placeholder other than {{prompt}} and {{reply}} ({error!r}); "
            "write literal braces as {{ and }}"
        ) from None
    if "\x00reply\x00" not in filled:
        raise UserError("evaluation.judge.question must contain {reply} (the judge has to see the reply)")


def one_line(text: str, limit: int = 300) -> str:
    """A message as one line (newlines folded, long text cut), for UserError."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- registry ---------------------------------------------------------------------------------------

JudgeFactory = Callable[["JudgeSettings", list[str], str], Judge]

# name -> "module:attribute" of a factory(settings, refusal_markers, response_prefix); imported on use
_REGISTRY: dict[str, str | JudgeFactory] = {
    "keywords": "heretic_dist.evaluation.judges.keywords:KeywordJudge",
    "classifier": "heretic_dist.evaluation.judges.classifier:ClassifierJudge",
    "openai": "heretic_dist.evaluation.judges.openai:OpenAIJudge",
}


def register_judge(name: str, factory: str | JudgeFactory) -> None:
    """Add (or replace) a judge: a factory(settings, refusal_markers, response_prefix) or its path."""
    _REGISTRY[name] = factory


def judge_names() -> list[str]:
    return sorted(_REGISTRY)


def make_judge(
    settings: JudgeSettings,
    refusal_markers: list[str],
    response_prefix: str = "",
    cache: JudgementCache | None = None,
) -> Judge:
    """The judge `settings.name` names; with `cache`, wrapped so that judged replies are not paid twice."""
    factory = _REGISTRY.get(settings.name)
    if factory is None:
        raise UserError(f"unknown judge {settings.name!r}; known judges: {', '.join(judge_names())}")
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        factory = getattr(importlib.import_module(module), attribute)
    judge = factory(settings, list(refusal_markers), response_prefix)
    if cache is None:
        return judge
    from ..cache import CachedJudge

    return CachedJudge(judge, cache)
