"""Research figures as PNG bytes (matplotlib, Agg) and the animation as a GIF (pillow)."""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

GOOD_COLOR, BAD_COLOR = "royalblue", "darkorange"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def layer_png(points: np.ndarray, labels: np.ndarray, layer: int, box: dict[str, Any], title: str = "",
              style: str = "default", names: tuple[str, str] = ("Harmless", "Harmful")) -> bytes:
    """One layer's embedding: two classes, legend, no axes (upstream's look)."""
    plt = _plt()
    with plt.style.context(style):
        fig, ax = plt.subplots(figsize=(6, 5))
        for cls, name, color in ((0, names[0], GOOD_COLOR), (1, names[1], BAD_COLOR)):
            p = points[labels == cls]
            ax.scatter(p[:, 0], p[:, 1], s=14, alpha=0.75, c=color, label=name, edgecolors="none")
        ax.set_xlim(*box["x"])
        ax.set_ylim(*box["y"])
        ax.set_axis_off()
        ax.legend(loc="lower right", frameon=False)
        ax.set_aspect("equal")
        ax.set_title(f"{title}\nlayer {layer}" if title else f"layer {layer}", fontsize=10 if title else 12)
        fig.tight_layout()
        return _png(fig)


def animation_gif(frames: Sequence[bytes], ms_per_frame: int = 400) -> bytes:
    """The layer PNGs as one looping GIF."""
    from PIL import Image

    images = [Image.open(io.BytesIO(f)).convert("RGB") for f in frames]
    if not images:
        raise ValueError("no frames")
    palette = [im.quantize(colors=255, method=Image.Quantize.MEDIANCUT) for im in images]
    buf = io.BytesIO()
    palette[0].save(buf, format="GIF", save_all=True, append_images=palette[1:], duration=ms_per_frame, loop=0)
    return buf.getvalue()


def geometry_png(rows: list[dict[str, Any]], title: str = "", style: str = "default") -> bytes:
    """Cosine similarities and silhouette over layers (left); norms over layers (right)."""
    plt = _plt()
    layers = [r["layer"] for r in rows]
    with plt.style.context(style):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for key in ("S(g,b)", "S(g*,b*)", "S(g,r)", "S(g*,r*)", "S(b,r)", "S(b*,r*)", "silhouette"):
            left.plot(layers, [r[key] for r in rows], label=key, lw=2 if key == "silhouette" else 1)
        left.set_xlabel("layer")
        left.set_ylabel("cosine similarity / silhouette")
        left.legend(fontsize=7, ncol=2)
        for key in ("|g|", "|g*|", "|b|", "|b*|", "|r|", "|r*|"):
            right.plot(layers, [r[key] for r in rows], label=key)
        right.set_xlabel("layer")
        right.set_ylabel("norm")
        right.legend(fontsize=7, ncol=2)
        fig.suptitle(f"{title}: residual geometry" if title else "residual geometry")
        fig.tight_layout()
        return _png(fig)


def sweep_png(rows: list[dict[str, Any]], base_refusals: int | None, n_bad: int, style: str = "default") -> bytes:
    """Refusals and KL of each layer's direction alone, against that layer."""
    plt = _plt()
    layers = [r["layer"] for r in rows]
    with plt.style.context(style):
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(layers, [r["refusals"] for r in rows], "o-", color="tab:red", label="refusals")
        if base_refusals is not None:
            ax.axhline(base_refusals, color="tab:red", ls=":", lw=1, label="base model refusals")
        ax.set_xlabel("layer of the direction (global scope, weight 1 on every layer)")
        ax.set_ylabel(f"refusals (of {n_bad})", color="tab:red")
        kl_ax = ax.twinx()
        kl_ax.plot(layers, [r["kl"] for r in rows], "s-", color="tab:blue", label="KL divergence")
        kl_ax.set_ylabel("KL divergence", color="tab:blue")
        lines = ax.get_legend_handles_labels()
        more = kl_ax.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper right")
        ax.set_title("direction sweep")
        fig.tight_layout()
        return _png(fig)
