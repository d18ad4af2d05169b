"""2-D PaCMAP embeddings per layer (computed in parallel as Ray tasks), then aligned layer to layer.

Upstream seeds each layer's PaCMAP with the previous layer's embedding, which is serial. Here every
layer is embedded on its own (in parallel), and afterwards each embedding is fitted to its aligned
neighbour by an orthogonal Procrustes fit (rotation, possibly a reflection, and a scale), so an
animation over layers does not jump. Then the orientation rule is applied to every layer: the line
from the good 2-D geometric median to the bad one is horizontal, good on the left. The rule leaves a
reflection about that horizontal line free; the one closer to the previous layer is kept.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .geometry import geometric_median

N_NEIGHBORS = 30  # as upstream


def pacmap_layer(points: np.ndarray, seed: int, n_neighbors: int = N_NEIGHBORS) -> np.ndarray:
    """One layer's 2-D PaCMAP embedding (n, 2), float64."""
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # one task = one CPU, before numba is imported
    import pacmap

    x = np.asarray(points, dtype=np.float32)
    n_neighbors = max(1, min(n_neighbors, len(x) - 2))
    reducer = pacmap.PaCMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed)
    return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def embed_layers(layers: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """PaCMAP of every layer, one Ray task (1 CPU) per layer over the cluster's CPUs."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(pacmap_layer)
    refs = [task.remote(ray.put(np.ascontiguousarray(x, dtype=np.float32)), seed) for x in layers]
    return list(ray.get(refs))


def geometry_layers(good: list[np.ndarray], bad: list[np.ndarray]) -> list[dict[str, float]]:
    """geometry.layer_geometry of every layer, one Ray task per layer (medians, silhouette)."""
    import ray

    from .geometry import layer_geometry

    task = ray.remote(num_cpus=1, max_retries=2)(layer_geometry)
    return list(ray.get([task.remote(g, b) for g, b in zip(good, bad)]))


# -- alignment (pure numpy) --------------------------------------------------------------------------


def _medians(points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return geometric_median(points[labels == 0]), geometric_median(points[labels == 1])


def orient(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rotate (about the midpoint of the medians) so that good's median is left of bad's, same height;
    centred on that midpoint. labels: 0 good, 1 bad."""
    gm, bm = _medians(points, labels)
    d = bm - gm
    angle = np.arctan2(d[1], d[0])
    c, s = np.cos(-angle), np.sin(-angle)
    rot = np.array([[c, -s], [s, c]])
    return (points - (gm + bm) / 2) @ rot.T


def procrustes(points: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`points` rotated or reflected (about its centroid) onto `target` (same rows), least squares."""
    p = points - points.mean(axis=0)
    t = target - target.mean(axis=0)
    u, _, vt = np.linalg.svd(p.T @ t)
    return p @ (u @ vt) + target.mean(axis=0)


def _unit_scale(points: np.ndarray) -> np.ndarray:
    """Scaled so the median distance to the centre is 1 (robust: a few far points do not shrink the rest)."""
    centre = np.median(points, axis=0)
    spread = float(np.median(np.linalg.norm(points - centre, axis=1)))
    return (points - centre) / spread if spread > 0 else points - centre


def align(embeddings: list[np.ndarray], labels: np.ndarray) -> list[np.ndarray]:
    """Each layer fitted to the previous aligned one, then oriented (the rule holds on every layer)."""
    out: list[np.ndarray] = []
    for points in embeddings:
        points = _unit_scale(np.asarray(points, dtype=np.float64))
        if out:
            points = procrustes(points, out[-1])
        oriented = orient(points, labels)
        if out:
            flipped = oriented * np.array([1.0, -1.0])
            if ((flipped - out[-1]) ** 2).sum() < ((oriented - out[-1]) ** 2).sum():
                oriented = flipped
        out.append(oriented)
    return out


def orientation_holds(points: np.ndarray, labels: np.ndarray, tol: float = 1e-6) -> bool:
    """Good's 2-D median left of bad's, on the same horizontal line."""
    gm, bm = _medians(points, labels)
    span = float(np.linalg.norm(bm - gm))
    return bool(bm[0] > gm[0] and abs(bm[1] - gm[1]) <= tol * max(span, 1.0))


def limits(points: np.ndarray, margin: float = 0.35) -> dict[str, Any]:
    """Axis limits of one layer's frame: centred on the origin (the midpoint of the medians), a square
    around the 3rd to 97th percentiles of the points, so a few far points do not shrink the picture."""
    lo, hi = np.percentile(points, 3, axis=0), np.percentile(points, 97, axis=0)
    half = float(max(np.abs(lo).max(), np.abs(hi).max(), 1e-9)) * (1 + margin)
    return {"x": (-half, half), "y": (-half, half)}
