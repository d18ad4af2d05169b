"""The pure math of ALGORITHM.md sections 2-4, on random tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from heretic_dist.engine.ablation import (
    directions_from_sums,
    full_normalization_factors,
    global_direction,
    lora_factors,
    reference_full_normalization_factors,
    winsorize,
)
from heretic_dist.search.space import ComponentParams, decode_trial_params, layer_weight

torch.manual_seed(0)


def unit(d: int) -> torch.Tensor:
    return F.normalize(torch.randn(d), dim=0)


def test_none_with_weight_one_cannot_write_along_v():
    W, v = torch.randn(64, 48), unit(64)
    A, B = lora_factors(W, v, 1.0, "none")
    edited = W + B @ A
    y = edited @ torch.randn(48, 200)  # module outputs for 200 random inputs
    ratio = (v @ y).abs() / y.norm(dim=0)
    assert ratio.max() < 1e-5
    # and the unedited module does write along v
    assert ((v @ (W @ torch.randn(48, 200))).abs() / (W @ torch.randn(48, 200)).norm(dim=0)).max() > 1e-2


def test_none_is_projection_formula():
    W, v, w = torch.randn(16, 8), unit(16), 0.7
    A, B = lora_factors(W, v, w, "none")
    expected = (torch.eye(16) - w * torch.outer(v, v)) @ W
    torch.testing.assert_close(W + B @ A, expected, rtol=1e-5, atol=1e-5)


def test_pre_formula():
    W, v, w = torch.randn(16, 8), unit(16), 1.2
    A, B = lora_factors(W, v, w, "pre")
    n = W.norm(dim=1, keepdim=True)
    W_hat = W / n
    torch.testing.assert_close(A, (v @ W_hat).view(1, -1))
    torch.testing.assert_close(B, -w * (n * v.view(-1, 1)))


def test_full_formula_and_rank():
    W, v, w, r = torch.randn(32, 24), unit(32), 0.9, 3
    A, B = lora_factors(W, v, w, "full", rank=r, seed=7)
    assert A.shape == (r, 24) and B.shape == (32, r)
    n = W.norm(dim=1, keepdim=True)
    W_hat = W / n
    M = W_hat - w * torch.outer(v, v) @ W_hat
    target = F.normalize(M, dim=1) * n - W
    # the rank-r approximation is close to the best rank-r approximation of the exact delta
    U, S, Vh = torch.linalg.svd(target)
    best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    assert (B @ A - best).norm() / best.norm() < 1e-3
    # reseeded: the same trial gives the same factors
    A2, B2 = lora_factors(W, v, w, "full", rank=r, seed=7)
    assert torch.equal(A, A2) and torch.equal(B, B2)


@pytest.mark.parametrize("shape", [(48, 48), (40, 120), (120, 40)])
@pytest.mark.parametrize("w", [0.05, 0.9, 1.5])
def test_full_factors_match_the_written_out_reference(shape, w):
    """The fast path (no d_out x d_in temporaries, reordered products) computes the same factors."""
    W, v = torch.randn(*shape) * 0.05, unit(shape[0])
    W[3] = 0.0  # a zero row stays zero, as F.normalize leaves it
    A, B = full_normalization_factors(W, v, w, 3, seed=11)
    A_ref, B_ref = reference_full_normalization_factors(W, v, w, 3, seed=11)
    delta, delta_ref = B @ A, B_ref @ A_ref
    assert (delta - delta_ref).norm() / delta_ref.norm() < 1e-4
    assert delta[3].abs().max() < 1e-6 * delta.abs().max()  # the zero row stays (numerically) zero
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


def test_full_edited_rows_keep_their_norms():
    W, v = torch.randn(32, 24), unit(32)
    A, B = lora_factors(W, v, 1.0, "full", rank=32, seed=0)  # full rank: exact delta
    torch.testing.assert_close((W + B @ A).norm(dim=1), W.norm(dim=1), rtol=1e-4, atol=1e-4)


def test_float_direction_index_interpolates():
    d = F.normalize(torch.randn(6, 10), dim=1)
    # index phi uses rows k=floor(phi+1) and k+1 with alpha = frac(phi+1)
    got = global_direction(d, 1.25)
    expected = F.normalize(0.75 * d[2] + 0.25 * d[3], dim=0)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(global_direction(d, 2.0), d[3])


def test_tent_kernel():
    k = ComponentParams(max_weight=1.5, max_weight_position=10.0, min_weight=0.5, min_weight_distance=4.0)
    assert layer_weight(10, k) == pytest.approx(1.5)
    assert layer_weight(12, k) == pytest.approx(1.0)  # halfway from 1.5 to 0.5
    assert layer_weight(6, k) == pytest.approx(0.5)  # at the edge: min weight
    assert layer_weight(15, k) == 0.0  # beyond the distance: skipped
    assert layer_weight(5, k) == 0.0


def _raw(mlp_max_weight: float) -> dict:
    raw = {"direction_scope": "global", "direction_index": 3.3}
    for c, mw in (("attn.o_proj", 1.0), ("mlp.down_proj", mlp_max_weight)):
        raw |= {f"{c}.max_weight": mw, f"{c}.max_weight_position": 5.0, f"{c}.min_weight": 0.5,
                f"{c}.min_weight_distance": 2.0}
    return raw


def test_decode_params_min_weight_is_fraction_and_mlp_switch_off():
    p = decode_trial_params(_raw(1.2), n_layers=8)
    assert p.components["mlp.down_proj"].min_weight == pytest.approx(0.6)
    assert p.direction_index == pytest.approx(3.3)
    off = decode_trial_params(_raw(-0.2), n_layers=8, allow_mlp_off=True)
    assert off.components["mlp.down_proj"].max_weight == 0.0
    assert all(layer_weight(i, off.components["mlp.down_proj"]) == 0.0 for i in range(8))
    per_layer = decode_trial_params(_raw(1.0) | {"direction_scope": "per layer"}, n_layers=8)
    assert per_layer.direction_index is None


def test_directions_projection_is_orthogonal_to_good_mean():
    good, bad = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    d = directions_from_sums(good * 3, 3, bad * 4, 4, orthogonalize=True)
    g = F.normalize(good.float(), dim=1)
    assert (d * g).sum(dim=1).abs().max() < 1e-5
    torch.testing.assert_close(d.norm(dim=1), torch.ones(5))
    plain = directions_from_sums(good * 3, 3, bad * 4, 4, orthogonalize=False)
    torch.testing.assert_close(plain, F.normalize((bad - good).float(), dim=1))


def test_winsorize_clamps_to_quantile():
    x = torch.randn(4, 3, 100)
    x[0, 0, 0] = 1000.0
    y = winsorize(x, 0.9)
    t = torch.quantile(x.abs(), 0.9, dim=-1, keepdim=True)
    assert (y.abs() <= t + 1e-6).all()
    assert torch.equal(winsorize(x, 1.0), x)
    assert math.isclose(float(y[0, 0, 0]), float(t[0, 0, 0]), rel_tol=1e-6)


@pytest.mark.parametrize("mode", ["none", "pre", "full"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_batched_factors_equal_per_module_factors(mode, shape):
    """A stack of same-shape modules (a layer's experts) in one call gives each module its own factors."""
    experts, v = torch.randn(5, *shape) * 0.1, unit(shape[0])
    A, B = lora_factors(experts, v, 0.8, mode, rank=3, seed=5)
    for i in range(5):
        A_i, B_i = lora_factors(experts[i], v, 0.8, mode, rank=3, seed=5)
        assert A[i].shape == A_i.shape and B[i].shape == B_i.shape
        torch.testing.assert_close(B[i] @ A[i], B_i @ A_i, rtol=1e-4, atol=1e-6)
