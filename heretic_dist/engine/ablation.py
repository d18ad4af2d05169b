"""The math of the edit (ALGORITHM.md sections 2-4) as pure functions: tensors in, tensors out."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from heretic_dist.search.space import TrialParams


def winsorize(residuals: torch.Tensor, quantile: float) -> torch.Tensor:
    """Clamp each (prompt, row) vector to the q-quantile of its absolute components."""
    if not 0 <= quantile < 1:
        return residuals
    thresholds = torch.quantile(residuals.abs(), quantile, dim=-1, keepdim=True)
    return torch.clamp(residuals, -thresholds, thresholds)


def directions_from_sums(
    good_sum: torch.Tensor,
    good_count: int,
    bad_sum: torch.Tensor,
    bad_count: int,
    orthogonalize: bool,
) -> torch.Tensor:
    """Refusal direction per row from float64 residual sums (rows x d) -> float32 (rows x d).

    Sums, not means, are the unit of exchange so that shards over workers reduce exactly.
    """
    if good_count <= 0 or bad_count <= 0:
        raise ValueError("directions need at least one good and one bad prompt")
    good_mean = (good_sum / good_count).to(torch.float32)
    bad_mean = (bad_sum / bad_count).to(torch.float32)
    directions = F.normalize(bad_mean - good_mean, p=2, dim=1)
    if orthogonalize:
        # Remove only the part of the refusal direction orthogonal to the harmless mean.
        good_unit = F.normalize(good_mean, p=2, dim=1)
        along = (directions * good_unit).sum(dim=1, keepdim=True)
        directions = F.normalize(directions - along * good_unit, p=2, dim=1)
    return directions


def global_direction(directions: torch.Tensor, index: float) -> torch.Tensor:
    """Interpolate between rows k and k+1 for a float layer index (row 0 is the embedding)."""
    alpha, whole = math.modf(index + 1)
    k = int(whole)
    if alpha == 0.0:  # a whole index (the last row has no next one to interpolate with)
        return F.normalize(directions[k], p=2, dim=0)
    return F.normalize(directions[k].lerp(directions[k + 1], alpha), p=2, dim=0)


def layer_direction(directions: torch.Tensor, params: TrialParams, layer: int) -> torch.Tensor:
    if params.direction_index is None:
        return directions[layer + 1]
    return global_direction(directions, params.direction_index)


def lora_factors(
    weight: torch.Tensor,
    v: torch.Tensor,
    w: float,
    row_normalization: str,
    rank: int = 1,
    seed: int = 0,
    layout: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A: r x d_in, B: d_out x r) so that W + B A is the ablated weight.

    weight is float32 (d_out x d_in), or a stack (..., d_out, d_in) of modules that share v and w
    (e.g. one layer's experts: one batched call instead of one per module); v is a unit vector in
    the output space, w the tent weight. Batched factors equal the per-module ones.

    layout (engine/parallel.py ShardLayout): weight is this rank's column block of a row-parallel
    module; the factors are then the full module's, A cut to the same columns (B is whole).
    """
    b = (-w * v)[:, None].expand(*weight.shape[:-2], -1, 1)
    if row_normalization == "none":
        return (v @ weight)[..., None, :], b
    if row_normalization == "full":
        return full_normalization_factors(weight, v, w, rank, seed, layout)
    if row_normalization != "pre":
        raise ValueError(f"unknown row_normalization {row_normalization!r}")
    norms = _row_norms(weight, layout)[..., None]
    a = (v @ (weight / norms.clamp_min(1e-12)))[..., None, :]  # F.normalize's eps
    return a, norms * b


def _row_norms(weight: torch.Tensor, layout: Any = None) -> torch.Tensor:
    """L2 norm of each row (of the whole module: a row's columns may sit on several ranks)."""
    if layout is None:
        return torch.linalg.vector_norm(weight, dim=-1)
    return torch.sqrt(layout.reduce((weight * weight).sum(dim=-1)))


def full_normalization_factors(
    weight: torch.Tensor, v: torch.Tensor, w: float, rank: int, seed: int, layout: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors of delta = normalize_rows(U + b a) * norms - W, the seeded randomized SVD
    (torch.svd_lowrank, q = 2 rank + 4, 6 power iterations), without building any d_out x d_in matrix.
    weight may be a stack (..., d_out, d_in); every module then gets the factors it would get alone.

    With unit rows U = diag(1/norms) W, a = v U and b = -w v, the edited weight is
    diag(norms/n) (U + b a) where n holds the row norms of U + b a, so
    delta = diag(1/n - 1) W + (norms b / n) a. Every product with delta is then one product with
    W plus a rank-1 term, and the randomized SVD below is torch.svd_lowrank's algorithm step by step
    (same random draws, same orientation), run through those products. The products are ordered
    so that the big matrix is the second operand, which this CPU's GEMM handles 2-3x faster.

    With a `layout`, weight is one rank's column block: products into the output space are summed
    over the ranks, products into the input space are gathered whole, so every rank runs the same
    algorithm on the same (whole) small matrices and keeps its own columns of A.
    """
    reduce = layout.reduce if layout is not None else (lambda x: x)
    gather = layout.gather if layout is not None else (lambda x: x)
    local = layout.local if layout is not None else (lambda x, dim=-2: x)
    raw_norms = _row_norms(weight, layout)
    norms = raw_norms.clamp_min(1e-12)  # F.normalize's eps
    a = ((v / norms)[..., None, :] @ weight)[..., 0, :]  # v U (this rank's columns)
    b = -w * v
    u_dot_a = reduce((weight @ a[..., None])[..., 0]) / norms
    unit_sq = (raw_norms / norms) ** 2  # 1, or 0 for a zero row
    a_sq = reduce((a * a).sum(dim=-1, keepdim=True))
    n = torch.sqrt((unit_sq + 2 * b * u_dot_a + b * b * a_sq).clamp_min(0)).clamp_min(1e-12)
    scale, h = (1 / n - 1)[..., None], (norms * b / n)[..., None]  # (..., d_out, 1)

    def times(x: torch.Tensor) -> torch.Tensor:  # delta @ x, x: (..., d_in, k), whole
        x = local(x)
        return reduce(scale * (x.mT @ weight.mT).mT + h * (a[..., None, :] @ x))

    def times_t(y: torch.Tensor) -> torch.Tensor:  # delta.T @ y, y: (..., d_out, k) -> whole (..., d_in, k)
        return gather(((scale * y).mT @ weight).mT + a[..., :, None] * (h.mT @ y))

    m = weight.shape[-2]
    d_in = layout.total if layout is not None else weight.shape[-1]
    tall = m >= d_in  # torch.svd_lowrank works on the tall orientation
    mul, mul_t = (times, times_t) if tall else (times_t, times)
    q = 2 * rank + 4
    torch.manual_seed(seed)
    r = torch.randn(d_in if tall else m, q, dtype=weight.dtype, device=weight.device)
    basis = torch.linalg.qr(mul(r)).Q
    for _ in range(6):
        basis = torch.linalg.qr(mul_t(basis)).Q
        basis = torch.linalg.qr(mul(basis)).Q
    u, s, vh = torch.linalg.svd(mul_t(basis).mT, full_matrices=False)
    left, right = basis @ u, vh.mT
    if not tall:
        left, right = right, left
    sqrt_s = torch.sqrt(s[..., :rank])
    return local(sqrt_s[..., :, None] * right[..., :rank].mT, -1), left[..., :rank] * sqrt_s[..., None, :]


def reference_full_normalization_factors(
    weight: torch.Tensor, v: torch.Tensor, w: float, rank: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALGORITHM.md's full normalization written out: build the edited matrix, then svd_lowrank.
    Slow; the reference full_normalization_factors is tested and benchmarked against."""
    norms = weight.norm(dim=1, keepdim=True)
    unit_rows = F.normalize(weight, p=2, dim=1)
    edited = F.normalize(unit_rows - w * torch.outer(v, v @ unit_rows), p=2, dim=1) * norms
    torch.manual_seed(seed)
    u, s, vv = torch.svd_lowrank(edited - weight, q=2 * rank + 4, niter=6)
    sqrt_s = torch.sqrt(s[:rank])
    return sqrt_s[:, None] * vv[:, :rank].T, u[:, :rank] * sqrt_s[None, :]
