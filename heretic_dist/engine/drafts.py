"""Draft tokens for greedy decoding, taken from earlier trials' replies to the same prompt.

A search generates replies to the same harmful prompts in every trial, and nearby edits give replies
that share long stretches (the same refusal, the same opening of a compliant answer). So a worker
keeps its recent replies per prompt and, at each decode step, proposes the tokens that followed the
row's reply so far in one of them. The model checks a row's proposal in the same forward that decodes
its next token (one query position per draft token); the longest run of draft tokens that greedy
decoding would have produced itself is kept, plus the model's own token after it. So the replies are
the greedy replies, exactly up to float rounding; only the number of forward calls changes.

A decode step re-reads every weight whatever its width, so on a GPU (memory-bound decoding) a wider
step costs little more; on a CPU each query position costs compute. `DraftPolicy` chooses each step's
width from a cost model per call, 1 + position_cost x query positions (a constant per device, so the
widths, and with them the float rounding of a trial, do not depend on timing), and the acceptance rate
seen so far. It also fits the calls' measured cost (a + b x positions) for benchmarks to report.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class _Reply:
    tokens: list[int]
    bigrams: dict[tuple[int, int], int]  # bigram -> its last start position in tokens


def _bigram_index(tokens: list[int]) -> dict[tuple[int, int], int]:
    return {(tokens[i], tokens[i + 1]): i for i in range(len(tokens) - 1)}


class ReplyMemory:
    """The last `per_prompt` distinct replies (token ids) to each of the last `prompts` prompts."""

    def __init__(self, per_prompt: int = 8, prompts: int = 2048):
        self.per_prompt, self.prompts = per_prompt, prompts
        self._replies: OrderedDict[tuple[int, ...], deque[_Reply]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._replies)

    def add(self, prompt: tuple[int, ...], reply: list[int]) -> None:
        if len(reply) < 2:
            return
        replies = self._replies.pop(prompt, None) or deque(maxlen=self.per_prompt)
        for old in list(replies):
            if old.tokens == reply:
                replies.remove(old)
        replies.append(_Reply(list(reply), _bigram_index(reply)))
        self._replies[prompt] = replies  # most recently used prompt last
        while len(self._replies) > self.prompts:
            self._replies.popitem(last=False)

    def draft(self, prompt: tuple[int, ...], generated: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that may follow `generated`: the continuation of the most recent reply
        that starts with `generated` (with nothing generated yet: the most recent reply's start), else
        what followed generated's last two tokens in a reply."""
        replies = self._replies.get(prompt)
        if not replies or limit <= 0:
            return []
        n = len(generated)
        for reply in reversed(replies):
            if len(reply.tokens) > n and reply.tokens[:n] == generated:
                return reply.tokens[n:n + limit]
        if n >= 2:
            bigram = (generated[-2], generated[-1])
            for reply in reversed(replies):
                at = reply.bigrams.get(bigram)
                if at is not None and at + 2 < len(reply.tokens):
                    return reply.tokens[at + 2:at + 2 + limit]
        return []


@dataclass
class DraftPolicy:
    """Chooses how many query positions a decode step gets, from measured costs and acceptance."""

    max_tokens: int
    position_cost: float = 0.0  # one query position's cost over a call's fixed cost (0: memory-bound GPU)
    accepted: float = 7.0  # draft tokens accepted / proposed, with a prior of 0.7 worth 10 tokens
    proposed: float = 10.0
    _fit: list[float] = field(default_factory=lambda: [0.0] * 5)  # n, sum x, sum y, sum xx, sum xy
    calls: int = 0  # decode calls made with drafts on (for tests and benchmarks)
    wide_calls: int = 0

    def acceptance(self) -> float:
        return self.accepted / self.proposed

    def observe_drafts(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted

    def observe_call(self, positions: int, seconds: float) -> None:
        """One decode call of `positions` query positions (rows x width) took `seconds`."""
        n, sx, sy, sxx, sxy = self._fit
        self._fit = [n + 1, sx + positions, sy + seconds, sxx + positions * positions, sxy + positions * seconds]
        self.calls += 1

    def measured_cost(self) -> tuple[float, float]:
        """(a, b) of seconds = a + b x positions, least squares over the timed calls (for reports);
        (nan, nan) until the calls seen vary in size."""
        n, sx, sy, sxx, sxy = self._fit
        var = sxx - sx * sx / n if n >= 3 else 0.0
        if var <= 1e-9 * max(1.0, sxx):
            return float("nan"), float("nan")
        b = (sxy - sx * sy / n) / var
        return sy / n - b * sx / n, b

    def width(self, draft_lengths: list[int]) -> int:
        """The step's width (1 = no drafts) with the most expected tokens per second."""
        longest = min(max(draft_lengths, default=0), self.max_tokens)
        if longest == 0:
            return 1
        p = self.acceptance()
        a, b = 1.0, self.position_cost
        rows = len(draft_lengths)
        best, best_width = -1.0, 1
        for width in range(1, longest + 2):
            gain = sum((1 - p ** min(width, 1 + d)) / (1 - p) if p < 1 else min(width, 1 + d)
                       for d in draft_lengths)
            rate = gain / (a + b * rows * width)
            if rate > best * (1 + 1e-9):
                best, best_width = rate, width
        if best_width > 1:
            self.wide_calls += 1
        return best_width


def accepted_length(draft: list[int], predicted: list[int]) -> int:
    """How many leading draft tokens greedy decoding produces itself: predicted[j] is the model's token
    after the row's tokens up to draft[j - 1] (predicted[0]: after the token fed before the draft)."""
    n = 0
    while n < len(draft) and draft[n] == predicted[n]:
        n += 1
    return n


class Drafts:
    """One engine's reply memory and width policy (kept across trials: that is where drafts come from)."""

    def __init__(self, max_tokens: int):
        self.memory = ReplyMemory()
        self.policy = DraftPolicy(max_tokens)

    def for_rows(self, prompts: list[tuple[int, ...]], generated: list[list[int]], room: list[int]) -> list[list[int]]:
        """Each row's draft, cut to the step's width and to the row's room (new tokens it may still take)."""
        limit = self.policy.max_tokens
        drafts = [self.memory.draft(p, g, min(limit, r)) for p, g, r in zip(prompts, generated, room)]
        width = self.policy.width([len(d) for d in drafts])
        return [d[: width - 1] for d in drafts]

