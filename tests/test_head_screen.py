"""The bfloat16 screen of the LM head (engine/head_screen.py): its error bound holds, its argmax is the
float32 argmax where bfloat16 alone gets it wrong, and greedy replies do not change with it."""

from __future__ import annotations

import pytest
import torch
from test_engine import BAD, GOOD, llama, ready_engine  # noqa: F401 (llama: a fixture)

from heretic_dist.engine import head_screen, passes
from heretic_dist.engine.generation import greedy_replies

pytestmark = pytest.mark.skipif(not head_screen.supported(), reason="no bfloat16 matmul units on this CPU")


def packed(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), 16)


def screen(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return head_screen.screened_logits(x, weight, packed(weight), float(weight.norm(dim=1).max()))


@pytest.mark.parametrize("hidden,scale", [(64, 1.0), (896, 6.0), (2048, 30.0)])
def test_slack_bounds_the_screen_error(hidden, scale):
    """Wherever the argument of screen_slack needs it (screened logits within 2E of the top), the
    bfloat16 logits are within E of the exact ones (float64), also at large hidden norms."""
    gen = torch.Generator().manual_seed(hidden)
    weight = torch.randn(3000, hidden, generator=gen) * 0.05
    weight[:10] *= 4  # a few long rows: the bound uses the longest
    x = torch.randn(40, hidden, generator=gen) * scale
    screened = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed(weight), None, "none", [],
                                                  "").double()
    exact = x.double() @ weight.double().T
    top = screened.max(dim=1).values
    slack = head_screen.screen_slack(x.norm(dim=1), top.float(), float(weight.norm(dim=1).max()), hidden).double()
    near = screened >= (top - 2 * slack)[:, None]
    error = (screened - exact).abs()
    assert bool((error[near] <= slack[:, None].expand_as(error)[near]).all())
    assert float((error / slack[:, None]).max()) > 1e-3  # the bound is not vacuous: errors are real


def test_slack_is_nearly_reached_by_a_worst_case():
    """Every input and weight rounds down to bfloat16 by almost a unit and the output rounds down too:
    the error comes within a few percent of the bound (a bound 1.1x too small fails here)."""
    k = 257
    value = 1 + 2.0 ** -8 - 2.0 ** -20  # rounds down to 1 in bfloat16
    x, weight = torch.full((1, k), value), torch.full((4, k), value)
    screened = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed(weight), None, "none", [], "")
    exact = float(x[0].double() @ weight[0].double())
    top = screened.max(dim=1).values.float()
    slack = float(head_screen.screen_slack(x.norm(dim=1), top, float(weight.norm(dim=1).max()), k))
    error = abs(float(screened[0, 0]) - exact)
    assert 0.9 * slack < error <= slack


def test_rows_with_nan_or_inf_or_no_contrast_get_their_float32_row():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(6000, 64, generator=gen) * 0.05
    x = torch.randn(4, 64, generator=gen)
    x[1] = 0.0  # every token ties: more candidates than WHOLE_ROW
    x[2, 5] = float("nan")
    x[3, 7] = float("inf")
    plain = torch.nn.functional.linear(x, weight)
    logits = screen(x, weight)
    assert torch.equal(logits.max(dim=1).indices, plain.max(dim=1).indices)
    assert bool(torch.isfinite(logits[1]).all())  # computed whole, not gathered token by token
    weight[123, 0] = float("nan")
    assert torch.equal(screen(x[:1], weight).max(dim=1).indices, torch.tensor([123]))


def test_screen_applies_only_inside_argmax_only_and_for_the_weight_it_copied(llama):
    engine = ready_engine(llama, prepack_weights=True)
    head, screen_ = engine.model.get_output_embeddings(), head_screen.screen_of(engine.model)
    x = torch.randn(2, head.in_features)
    with torch.inference_mode():
        assert not screen_.applies(head, x)
        with pytest.raises(RuntimeError):
            with head_screen.argmax_only(engine.model):
                assert screen_.applies(head, x)
                raise RuntimeError("a failed call")
        assert screen_.active == 0 and not screen_.applies(head, x)  # the depth is restored
        with head_screen.argmax_only(engine.model):
            head.weight.mul_(1.0)  # an in-place change: the copy is stale, the float32 head answers
            assert not screen_.applies(head, x)
    before = engine.prepacked_bytes
    engine.screen_head = False
    assert head_screen.screen_of(engine.model) is None
    assert engine.prepacked_bytes == before - head.weight.numel() * 2
    engine.screen_head = True
    assert engine.screen_head and engine.prepacked_bytes == before


def near_tie_head(vocab: int, hidden: int = 256, twins: int = 8, gap: float = 2e-3):
    """Hidden states whose best tokens come in groups of `twins` rows that differ by `gap` in logit:
    bfloat16 cannot order them, float32 can."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, hidden, generator=gen) * 4
    weight = torch.randn(vocab, hidden, generator=gen) * 0.02
    spacing = twins + 2
    for r in range(len(x)):  # row r's best group: `twins` tokens from spacing * r, logits 10 + gap * k
        unit = x[r] / x[r].norm()
        for k in range(twins):
            token = spacing * r + k
            weight[token] = weight[token] - (weight[token] @ unit) * unit
            weight[token] += (10 + gap * ((k * 7) % twins)) / x[r].norm() * unit
    return x, weight


@pytest.mark.parametrize("twins", [8, 150])  # 150: more candidates than the top-k holds
def test_screened_argmax_is_the_float32_argmax_on_near_ties(twins):
    x, weight = near_tie_head(vocab=64 * (twins + 2) + 200, twins=twins, gap=2e-3 if twins == 8 else 1e-4)
    exact = (x.double() @ weight.double().T).argmax(dim=1)
    assert torch.equal((x @ weight.T).argmax(dim=1), exact)  # float32 orders the ties right
    bf16_only = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed(weight), None, "none", [], "")
    assert int((bf16_only.float().argmax(dim=1) != exact).sum()) >= 10  # bfloat16 alone would not
    logits = screen(x, weight)
    assert torch.equal(logits.max(dim=1).indices, exact)
    finite = torch.isfinite(logits).sum(dim=1)
    assert int(finite.min()) >= twins  # every near-tied token was recomputed
    assert int(finite.max()) < logits.shape[1] // 4  # and far from all of them


def test_screened_logits_keep_the_batch_shape():
    x, weight = near_tie_head(vocab=64 * 10 + 200)
    logits = screen(x.view(8, 8, -1), weight)
    assert logits.shape == (8, 8, weight.shape[0])
    assert torch.equal(logits.view(64, -1).max(dim=1).indices, (x @ weight.T).argmax(dim=1))


def test_greedy_replies_are_the_same_with_the_screen(llama):
    engine = ready_engine(llama, max_response_length=24, prepack_weights=True)
    screen_ = head_screen.screen_of(engine.model)
    assert screen_ is not None, "the engine screens its prepacked CPU head"
    texts = passes.render(engine.tokenizer, BAD + GOOD)

    def replies():
        return greedy_replies(engine.model, engine.tokenizer, texts, 24, 4, None, None, True, None)

    logprobs = engine.logprobs(GOOD)
    screened = replies()
    assert screen_.calls > 0 and screen_.active == 0
    calls = screen_.calls
    assert torch.equal(engine.logprobs(GOOD), logprobs)  # the KL pass never screens
    assert screen_.calls == calls
    engine.model.get_output_embeddings()._head_screen = None  # the plain float32 head
    assert replies() == screened
    engine.model.get_output_embeddings()._head_screen = screen_
    engine.unpack()
    assert head_screen.screen_of(engine.model) is None  # export's plain forwards carry no screen
    assert replies() == screened
