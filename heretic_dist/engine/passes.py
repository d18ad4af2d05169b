"""Prompt rendering and the model passes a trial needs: residuals, first-token log-probs, replies."""

from __future__ import annotations

import logging
from os.path import commonprefix
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .ablation import winsorize
from .types import Prompt

log = logging.getLogger(__name__)


def render(tokenizer, prompts: list[Prompt], response_prefix: str = "") -> list[str]:
    """Chat-template each prompt (system + user, generation prompt added), then the prefix."""
    chats = [
        [{"role": "system", "content": p.system}, {"role": "user", "content": p.user}] for p in prompts
    ]
    texts = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    return [t + response_prefix for t in texts] if response_prefix else list(texts)


def tokenize(tokenizer, texts: list[str], device) -> dict[str, torch.Tensor]:
    return tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False).to(device)


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), max(size, 1)):
        yield items[start : start + size]


def length_groups(order: list[int], lengths: list[int], size: int, call_tokens: float) -> list[list[int]]:
    """`order` (indices, longest first) cut into consecutive batches of at most `size` that minimize the
    padded tokens computed plus `call_tokens` per call (a call's fixed cost, e.g. re-reading the
    weights, in tokens): a few long prompts then get a batch of their own instead of padding every row
    to their length. call_tokens = inf gives plain batches of `size`."""
    n, size = len(order), max(size, 1)
    if call_tokens == float("inf") or n <= 1:
        return list(batches(order, size))
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - size), end):
            cost = best[start] + call_tokens + (end - start) * lengths[order[start]]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def adapter_kwargs(adapters: list[str] | None, rows: list[int]) -> dict[str, list[str]]:
    """PEFT's per-row adapter choice for these prompt indices ("__base__" = no adapter), or nothing:
    with one trial per pass no argument is passed, so PEFT keeps its plain single-adapter forward."""
    return {} if adapters is None else {"adapter_names": [adapters[i] for i in rows]}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() computes them for the first step."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@torch.inference_mode()
def last_position_hidden_states(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hidden states at the last prompt position for every row, float32: (batch, L+1, d).

    The rows are what output_hidden_states=True returns at that position (the input of layer 0,
    the output of layers 0..L-2, and the final normed state), but hooks keep only the last
    position instead of L+1 full (batch, tokens, d) tensors. The final normed state is the input
    of the output head, which logits_to_keep=1 already cuts to the last position.
    """
    from .components import decoder_layers

    _, layers = decoder_layers(model)
    rows: list[torch.Tensor | None] = [None] * (len(layers) + 1)

    def keep(index: int, hidden: torch.Tensor) -> None:
        rows[index] = hidden[:, -1, :].to(torch.float32)

    def first_input(module, args, kwargs):
        keep(0, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def layer_output(index: int):
        return lambda module, args, output: keep(index + 1, output[0] if isinstance(output, tuple) else output)

    handles = [layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(layer_output(i)) for i, layer in enumerate(layers[:-1])]
    handles.append(model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: keep(len(layers), args[0])))
    try:
        model(**inputs, position_ids=position_ids(inputs["attention_mask"]), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(rows, dim=1)


@torch.inference_mode()
def all_hidden_states_at_last_position(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same rows through output_hidden_states=True (every position of every layer kept)."""
    out = model(**inputs, position_ids=position_ids(inputs["attention_mask"]), output_hidden_states=True,
                use_cache=False, logits_to_keep=1)
    return torch.stack([h[:, -1, :] for h in out.hidden_states], dim=1).to(torch.float32)


@torch.inference_mode()
def first_token_logprobs(model, inputs: dict[str, torch.Tensor], **adapters: list[str]) -> torch.Tensor:
    """Log-probabilities of the first generated token (batch, vocab), float32. `adapters`: the
    optional adapter_names of adapter_kwargs()."""
    out = model(
        **inputs,
        position_ids=position_ids(inputs["attention_mask"]),
        use_cache=False,
        logits_to_keep=1,
        **adapters,
    )
    return F.log_softmax(out.logits[:, -1, :].to(torch.float32), dim=-1)


def hooks_capture_correctly(model, tokenizer) -> bool:
    """Checked once per model on two short prompts: an architecture whose output head does not take
    the final hidden state as it is (e.g. one that rescales it first) falls back to output_hidden_states."""
    verdict = getattr(model, "_hook_capture_ok", None)
    if verdict is None:
        inputs = tokenize(tokenizer, ["Hello", "The quick brown fox"], model.device)
        hooked = last_position_hidden_states(model, inputs)
        reference = all_hidden_states_at_last_position(model, inputs)
        verdict = hooked.shape == reference.shape and torch.allclose(hooked, reference, rtol=1e-4, atol=1e-5)
        if not verdict:
            log.warning("hook capture differs from output_hidden_states for %s; using the latter",
                        type(model).__name__)
        model._hook_capture_ok = verdict
    return verdict


def residual_sums(
    model, tokenizer, prompts: list[Prompt], response_prefix: str, batch_size: int, quantile: float
) -> tuple[torch.Tensor, int]:
    """Float64 sums of (winsorized) first-token residuals over prompts: (L+1, d), count."""
    total = None
    capture = last_position_hidden_states if hooks_capture_correctly(model, tokenizer) else \
        all_hidden_states_at_last_position
    for batch in batches(prompts, batch_size):
        inputs = tokenize(tokenizer, render(tokenizer, batch, response_prefix), model.device)
        residuals = winsorize(capture(model, inputs), quantile)
        part = residuals.sum(dim=0, dtype=torch.float64).cpu()
        total = part if total is None else total + part
    if total is None:
        raise ValueError("residual_sums needs at least one prompt")
    return total, len(prompts)


def residuals(
    model, tokenizer, prompts: list[Prompt], response_prefix: str, batch_size: int, quantile: float
) -> torch.Tensor:
    """The (winsorized) first-token residuals themselves, float32 on the CPU: (n, L+1, d).
    Their float64 sum is what residual_sums returns (research mode stores them)."""
    capture = last_position_hidden_states if hooks_capture_correctly(model, tokenizer) else \
        all_hidden_states_at_last_position
    parts = []
    for batch in batches(prompts, batch_size):
        inputs = tokenize(tokenizer, render(tokenizer, batch, response_prefix), model.device)
        parts.append(winsorize(capture(model, inputs), quantile).to(torch.float32).cpu())
    if not parts:
        raise ValueError("residuals needs at least one prompt")
    return torch.cat(parts)


def sorted_batches(lengths: list[int], batch_size: int, sort_by_length: bool,
                   call_tokens: float = float("inf")) -> list[list[int]]:
    """Index batches: longest first and cut by call cost (length_groups) when sorting, else in order.
    Longest first: batches of similar length waste less compute on padding."""
    if not sort_by_length:
        return list(batches(list(range(len(lengths))), batch_size))
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return length_groups(order, lengths, batch_size, call_tokens)


def logprobs(model, tokenizer, prompts: list[Prompt], response_prefix: str, batch_size: int,
             sort_by_length: bool = True, adapters: list[str] | None = None,
             share_prefix: bool = False, call_tokens: float = float("inf")) -> torch.Tensor:
    """First-token log-probs in prompt order (computed in length-sorted batches when asked).
    `adapters`: the LoRA adapter of each prompt (several trials in one pass), None = the active one.
    `share_prefix`: the prompts' common leading tokens are prefilled once (engine/prefix.py).
    `call_tokens`: a forward call's fixed cost in tokens; sorted batches are then cut to minimize
    padding plus calls (length_groups)."""
    from . import prefix

    texts = render(tokenizer, prompts, response_prefix)
    encoded = tokenizer(texts, return_token_type_ids=False)["input_ids"]
    shared = prefix.split(model, encoded, adapters) if share_prefix else None
    own = [len(ids) for ids in (shared[1] if shared is not None else encoded)]  # tokens each row computes
    groups = sorted_batches(own, batch_size, sort_by_length, call_tokens)
    order = [i for group in groups for i in group]
    parts = []
    for b in groups:
        if shared is None:
            inputs = tokenize(tokenizer, [texts[i] for i in b], model.device)
            parts.append(first_token_logprobs(model, inputs, **adapter_kwargs(adapters, b)).cpu())
        else:
            head, suffixes = shared
            parts.append(prefix.first_token_logprobs(
                model, head, [suffixes[i] for i in b], tokenizer.pad_token_id,
                None if adapters is None else [adapters[i] for i in b]).cpu())
    result = torch.cat(parts, dim=0)
    return result[torch.argsort(torch.tensor(order))]


@torch.inference_mode()
def generate_replies(
    model,
    tokenizer,
    prompts: list[Prompt],
    response_prefix: str,
    max_new_tokens: int,
    batch_size: int,
    skip_special_tokens: bool,
    stop_when: Callable[[str], bool] | None = None,
    settle: CommonPrefixBound | None = None,
    adapters: list[str] | None = None,
) -> list[str]:
    """Greedy replies. With stop_when, a reply stops growing once stop_when(reply so far) holds.
    With settle, replies stop once their common prefix is known (they are then cut short).
    `adapters`: the LoRA adapter of each prompt (generate() keeps finished rows, so they stay fixed)."""
    replies: list[str] = []
    for rows in batches(list(range(len(prompts))), batch_size):
        batch = [prompts[i] for i in rows]
        inputs = tokenize(tokenizer, render(tokenizer, batch, response_prefix), model.device)
        kwargs = {}
        if stop_when is not None:
            kwargs["stopping_criteria"] = [_DecidedCriteria(tokenizer, inputs["input_ids"].shape[1], stop_when)]
        if settle is not None:
            kwargs["stopping_criteria"] = [_PrefixSettledCriteria(
                tokenizer, inputs["input_ids"].shape[1], settle, len(replies), skip_special_tokens)]
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
            **adapter_kwargs(adapters, rows),
        )
        replies += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=skip_special_tokens)
    return replies


class _DecidedCriteria:
    """A generate() stopping criterion that marks a row done once its verdict cannot change."""

    def __init__(self, tokenizer, prompt_length: int, decided: Callable[[str], bool], every: int = 4):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.decided = decided
        self.every = every

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids.shape[1] - self.prompt_length
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if new == 0 or new % self.every:
            return done
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        for i, text in enumerate(texts):
            done[i] = self.decided(text)
        return done


class CommonPrefixBound:
    """Knows, while replies are generated, when more tokens can no longer change their common prefix.

    A reply's text without its last `slack` characters (and any unfinished UTF-8 character) is
    stable: later tokens cannot change it. Once two stable texts differ at position p, the common
    prefix of the finished replies ends at or before p, so a reply whose stable text already
    reaches p has settled: whatever it generates next lies beyond every character that matters.
    Replies returned cut short this way have the same common prefix as the full ones.
    """

    def __init__(self, slack: int = 8):
        self.slack = slack
        self.stable: dict[int, str] = {}

    def update(self, key: int, text: str) -> None:
        text = text.rstrip("\ufffd")
        self.stable[key] = text[: max(0, len(text) - self.slack)]

    def bound(self) -> float:
        """The common prefix of all replies ends at or before this position (inf: not known yet)."""
        texts = list(self.stable.values())
        n = len(commonprefix(texts))
        return n if len({t[n] for t in texts if len(t) > n}) >= 2 else float("inf")

    def settled(self, key: int) -> bool:
        return len(self.stable.get(key, "")) >= self.bound()


class _PrefixSettledCriteria:
    """A generate() stopping criterion that marks rows done once their common prefix is settled."""

    def __init__(self, tokenizer, prompt_length: int, bound: CommonPrefixBound, offset: int,
                 skip_special_tokens: bool):
        self.tokenizer, self.prompt_length, self.bound = tokenizer, prompt_length, bound
        self.offset, self.skip_special_tokens = offset, skip_special_tokens

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :],
                                            skip_special_tokens=self.skip_special_tokens)
        for i, text in enumerate(texts):
            self.bound.update(self.offset + i, text)
        limit = self.bound.bound()
        return torch.tensor([len(self.bound.stable[self.offset + i]) >= limit for i in range(len(texts))],
                            dtype=torch.bool, device=input_ids.device)


def common_prefix(responses: list[str]) -> str:
    """Character-wise common prefix with trailing spaces removed (a space-led token would differ)."""
    return commonprefix(responses).rstrip(" ")


def detect_response_prefix(
    generate: Callable[[str], list[str]], chain_of_thought_skips: list[tuple[str, str]]
) -> str:
    """Common prefix of the replies; a chain-of-thought opener becomes its empty closed block.

    `generate(prefix)` returns the replies (special tokens kept) with `prefix` appended to prompts.
    """
    prefix = common_prefix(generate(""))
    if not prefix:
        return ""
    for opener, closed in chain_of_thought_skips:
        if prefix.startswith(opener):
            return closed + common_prefix(generate(closed))
    return prefix
