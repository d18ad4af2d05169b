"""Greedy tokens from a bfloat16 screen of the LM head, exact as float32 (CPU, prepacked weights).

In a CPU decode step the LM head (vocab x hidden, 545 MB in float32 for the benchmark model) is about a
fifth of the weights streamed and, at tens of query positions, a third of the matmul work. Greedy
decoding only needs each position's argmax. On CPUs with bfloat16 matmul units (AMX, AVX512-BF16) the
head is computed from a bfloat16 copy in about half the time at one row and a quarter at 80, with a
proven bound on its error; every token whose screened logit comes within twice that bound of the
screened maximum is recomputed in float32 from the dense weight; the others become -inf. The exact
maximum is always among them (screen_slack's docstring has the argument), so the argmax is the
float32 argmax: the same replies as the float32 head, up to the float rounding that already
separates any two float32 kernels.

Only greedy_replies turns the screen on (argmax_only): the KL pass needs every log-probability and
keeps the float32 head.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

BF16_UNIT = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)
FP32_UNIT = 2.0 ** -24
CANDIDATES = 64  # tokens per row taken from the screen's top-k; more only where the bound needs it
WHOLE_ROW = 4096  # past this many candidates a row's float32 logits are computed whole (bounded memory)


def supported() -> bool:
    """bfloat16 matmuls in hardware and oneDNN's packed bfloat16 linear (a bfloat16 head is slower
    than the float32 one without them)."""
    try:
        hardware = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        return bool(hardware and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


def screen_slack(hidden_norms: torch.Tensor, top: torch.Tensor, weight_norm: float, k: int) -> torch.Tensor:
    """Per row, a bound E on |screened logit - exact logit| for every token whose screened logit is
    within 2E of the row's screened maximum `top`.

    Inputs and weights rounded to bfloat16 each err by at most u = 2^-8 relative, so a product errs by
    (2u + u^2) |w x|; float32 accumulation of k products adds at most k 2^-24 of sum |w x| (taken
    twice, for the blocked sums); sum |w_j x_j| <= |w| |x| <= weight_norm |x| (Cauchy-Schwarz,
    weight_norm the largest row norm). Rounding the output to bfloat16 adds u/(1-u) of its magnitude,
    which is at most |top| + 2E for the tokens that matter. Solving E = A + u'(|top| + 2E) for E.

    Why the argmax survives: let t be the exact argmax and j the screened one (screened logit top).
    y_t >= y_j >= top - E. The product and accumulation part A holds for every token, and rounding to
    bfloat16 is monotone, so t's screened logit is at least the rounding of y_t - A, which is within
    the output term of y_t - A: t's screened logit is >= top - 2E, and t is a candidate. Every
    non-candidate's screened logit is below top - 2E, and so below y_t, which t's recomputed float32
    logit carries (up to float32 rounding)."""
    u = BF16_UNIT
    u_out = u / (1 - u)
    products = (2 * u + u * u + 2 * k * FP32_UNIT) * hidden_norms * weight_norm
    slack = (products + u_out * top.abs()) / (1 - 2 * u_out)
    return slack * 1.01 + 1e-6  # margin for the float32 arithmetic of the bound itself


def _candidates(screened: torch.Tensor, threshold: torch.Tensor, values: torch.Tensor,
                indices: torch.Tensor, whole: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, tokens) at or above each row's threshold, from the top-k where it holds them all, and the
    rows to compute whole in float32 (`whole` in, plus those with more than WHOLE_ROW candidates)."""
    rows, slots = (values >= threshold[:, None]).nonzero(as_tuple=True)
    tokens = indices[rows, slots]
    crowded = ((values[:, -1] >= threshold) & ~whole).nonzero().squeeze(1)  # candidates beyond the top-k
    if len(crowded):
        more = screened[crowded] >= threshold[crowded, None]
        many = more.sum(dim=1) > WHOLE_ROW
        whole = whole.clone()
        whole[crowded[many]] = True
        more_rows, more_tokens = more[~many].nonzero(as_tuple=True)
        rows, tokens = torch.cat([rows, crowded[~many][more_rows]]), torch.cat([tokens, more_tokens])
    keep = ~whole[rows]
    return rows[keep], tokens[keep], whole


def screened_logits(x: torch.Tensor, weight: torch.Tensor, packed_bf16: torch.Tensor,
                    weight_norm: float) -> torch.Tensor:
    """Logits of `x` (..., hidden) whose argmax per row is the float32 argmax: the candidates' entries
    are exact float32 (x . w), every other entry -inf. Only the bfloat16 product and one top-k touch
    the whole vocabulary. A row with more than CANDIDATES candidates is compared in full; one with more
    than WHOLE_ROW, or with a non-finite screened maximum (NaN or inf in its input or the weight), gets
    its whole float32 row."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).float().contiguous()
    screened = torch.ops.mkldnn._linear_pointwise(flat.to(torch.bfloat16), packed_bf16, None, "none", [], "")
    values, indices = screened.topk(min(CANDIDATES, screened.shape[1]), dim=1)  # descending
    top = values[:, 0].float()
    threshold = top - 2 * screen_slack(flat.norm(dim=1), top, weight_norm, flat.shape[1])
    # in bfloat16, rounded down (never above the float32 threshold: more candidates, never fewer)
    threshold = (threshold - 2 * BF16_UNIT * threshold.abs()).to(torch.bfloat16)
    rows, tokens, whole = _candidates(screened, threshold, values, indices, ~torch.isfinite(threshold))
    logits = torch.full(screened.shape, float("-inf"), dtype=torch.float32, device=flat.device)
    logits[rows, tokens] = (weight[tokens].float() * flat[rows]).sum(dim=1)
    if bool(whole.any()):
        logits[whole] = torch.nn.functional.linear(flat[whole], weight.float())
    return logits.view(*shape[:-1], -1)


class HeadScreen:
    """The bfloat16 copy of an LM head's weight and the switch that makes the head screen."""

    def __init__(self, head: torch.nn.Linear):
        weight = head.weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), 16)
        self.weight_norm = float(weight.detach().float().norm(dim=1).max())
        self.weight, self.version = weight, weight._version  # a replaced or changed weight turns it off
        self._depth = threading.local()  # argmax_only's nesting depth, per thread
        self.calls = 0

    @property
    def active(self) -> int:
        return getattr(self._depth, "value", 0)

    @active.setter
    def active(self, value: int) -> None:
        self._depth.value = value

    def applies(self, head: torch.nn.Linear, x: torch.Tensor) -> bool:
        weight = head.weight
        return (self.active > 0 and not torch.is_grad_enabled() and x.dtype == torch.float32
                and weight is self.weight and weight._version == self.version)

    def __call__(self, head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return screened_logits(x, head.weight, self.packed, self.weight_norm)


def install(head: torch.nn.Module) -> int:
    """Give a prepacked float32 CPU LM head (engine/prepack.py) a bfloat16 screen; its packed forward
    uses it inside argmax_only. Returns the bytes of the copy (0: not installed)."""
    if (not hasattr(head, "_prepacked_weight") or head.bias is not None
            or head.weight.dtype != torch.float32 or not supported()):
        return 0
    head._head_screen = HeadScreen(head)
    return head.weight.numel() * 2


def uninstall(head: torch.nn.Module) -> int:
    """Remove the screen (the head's float32 forward again). Returns the bytes freed."""
    if getattr(head, "_head_screen", None) is None:
        return 0
    del head._head_screen
    return head.weight.numel() * 2


def screen_of(model) -> HeadScreen | None:
    head = model.get_output_embeddings()
    return getattr(head, "_head_screen", None) if head is not None else None


@contextlib.contextmanager
def argmax_only(model) -> Iterator[None]:
    """While inside, the model's logits serve argmax only (greedy decoding): a screened head applies."""
    screen = screen_of(model)
    if screen is None or getattr(model.config.get_text_config(), "final_logit_softcapping", None):
        yield  # a soft cap squashes large logits together: ties the screen could break differently
        return
    screen.active += 1
    try:
        yield
    finally:
        screen.active -= 1
