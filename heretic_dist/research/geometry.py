"""Residual geometry per layer, upstream Heretic's definitions. Pure numpy: no Ray, no torch, no model.

For one layer, with G the good (harmless) and B the bad (harmful) first-token residuals:
g, b their means; g*, b* their geometric medians; r = b - g, r* = b* - g*. The table has the cosine
similarities S(g,b), S(g*,b*), S(g,r), S(g*,r*), S(b,r), S(b*,r*), the norms |g|, |g*|, |b|, |b*|,
|r|, |r*|, and the silhouette coefficient of the good-vs-bad split (Euclidean distances).
"""

from __future__ import annotations

import numpy as np

COLUMNS = ("S(g,b)", "S(g*,b*)", "S(g,r)", "S(g*,r*)", "S(b,r)", "S(b*,r*)",
           "|g|", "|g*|", "|b|", "|b*|", "|r|", "|r*|", "silhouette")


def geometric_median(points: np.ndarray, tol: float = 1e-7, max_iter: int = 1000) -> np.ndarray:
    """The point minimising the sum of Euclidean distances to `points` (n, d): Weiszfeld's iteration,
    started at the mean, with the usual guard when an iterate lands on a data point."""
    x = np.asarray(points, dtype=np.float64)
    if len(x) == 1:
        return x[0].copy()
    y = x.mean(axis=0)
    scale = max(float(np.abs(x).max()), 1e-12)
    for _ in range(max_iter):
        dist = np.linalg.norm(x - y, axis=1)
        close = dist < 1e-12 * scale
        w = 1.0 / np.where(close, 1.0, dist)
        w[close] = 0.0
        t = (w[:, None] * x).sum(axis=0) / w.sum()
        if close.any():  # Vardi-Zhang step: the median may sit on the coincident data point
            r = np.linalg.norm((w[:, None] * (x - y)).sum(axis=0))
            eta = float(close.sum())
            t = y if r == 0 else max(0.0, 1 - eta / r) * t + min(1.0, eta / r) * y
        if np.linalg.norm(t - y) <= tol * scale:
            return t
        y = t
    return y


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(np.dot(a, b) / (na * nb))


def silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient (Euclidean) of a two-or-more-class labelling (as sklearn's)."""
    x = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        return float("nan")
    sq = (x * x).sum(axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
    np.fill_diagonal(dist, 0.0)
    scores = np.zeros(len(x))
    for i in range(len(x)):
        own = labels == labels[i]
        n_own = own.sum() - 1
        if n_own == 0:
            continue  # a singleton cluster scores 0
        a = dist[i, own].sum() / n_own
        b = min(dist[i, labels == c].mean() for c in classes if c != labels[i])
        scores[i] = 0.0 if max(a, b) == 0 else (b - a) / max(a, b)
    return float(scores.mean())


def layer_geometry(good: np.ndarray, bad: np.ndarray) -> dict[str, float]:
    """The table row of one layer from its good (n_g, d) and bad (n_b, d) residuals."""
    good = np.asarray(good, dtype=np.float64)
    bad = np.asarray(bad, dtype=np.float64)
    g, b = good.mean(axis=0), bad.mean(axis=0)
    gm, bm = geometric_median(good), geometric_median(bad)
    r, rm = b - g, bm - gm
    points = np.concatenate([good, bad])
    labels = np.array([0] * len(good) + [1] * len(bad))
    norm = lambda v: float(np.linalg.norm(v))  # noqa: E731
    return {
        "S(g,b)": cosine(g, b), "S(g*,b*)": cosine(gm, bm), "S(g,r)": cosine(g, r), "S(g*,r*)": cosine(gm, rm),
        "S(b,r)": cosine(b, r), "S(b*,r*)": cosine(bm, rm),
        "|g|": norm(g), "|g*|": norm(gm), "|b|": norm(b), "|b*|": norm(bm), "|r|": norm(r), "|r*|": norm(rm),
        "silhouette": silhouette(points, labels),
    }
