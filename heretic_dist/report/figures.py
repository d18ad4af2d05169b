"""The report's PNG figures: Pareto front, optimization history, layer kernel, small fronts for a batch.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), so reports
can be made from any thread or a notebook without side effects.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

from heretic_dist.errors import UserError
from heretic_dist.report.data import RunData, Trial
from heretic_dist.search.front import KL_THRESHOLD
from heretic_dist.search.space import TrialParams, layer_weight

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LOG_RATIO = 20.0  # the KL axis goes log when max/min of the positive KLs exceeds this

COLORS = {
    "trial": "#9aa5b1",
    "pareto": "#d1495b",
    "base": "#2e4057",
    "chosen": "#edae49",
    "fail": "#c0392b",
    "attn.o_proj": "#00798c",
    "mlp.down_proj": "#d1495b",
}
FALLBACK_COLORS = ["#00798c", "#d1495b", "#edae49", "#66a182", "#2e4057", "#8d96a3"]


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the report needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})  # no version: stable bytes
    return buf.getvalue()


def _kl_axis(kls: list[float]) -> tuple[bool, float]:
    """(log scale?, y at which KL = 0 is drawn): a log axis has no 0, so KL 0 sits on a floor."""
    positive = [k for k in kls if k > 0]
    if len(positive) >= 2 and max(positive) / min(positive) > LOG_RATIO:
        return True, min(positive) / 3.0
    return False, 0.0


def _tick(y: float) -> str:
    return f"{y:g}" if y >= 1e-3 else f"{y:.0e}"


def _grid(ax: Axes) -> None:
    ax.grid(True, color="#eeeeee", lw=0.6, zorder=0)
    ax.set_axisbelow(True)


# --------------------------------------------------------------------------------------------------
# Pareto front


def _draw_trials(ax: Axes, run: RunData, y: Any, chosen: Trial | None, small: bool) -> None:
    """Complete trials, the front as a step line, the chosen trial ringed. `y` maps a KL to its y."""
    size = 14 if small else 24
    on_front = {t.number for t in run.pareto}
    others = [t for t in run.complete if t.number not in on_front]
    if others:
        ax.scatter([t.refusals for t in others], [y(t.kl) for t in others], s=size, color=COLORS["trial"],
                   alpha=0.75, lw=0, label=f"trial ({len(run.complete)} complete)", zorder=2)
    if run.pareto:
        xs = [t.refusals for t in run.pareto]
        ys = [y(t.kl) for t in run.pareto]
        ax.plot(xs, ys, drawstyle="steps-post", color=COLORS["pareto"], lw=1.4, zorder=3, alpha=0.8)
        ax.scatter(xs, ys, s=size * 1.8, color=COLORS["pareto"], edgecolor="white", lw=0.6, zorder=4,
                   label=f"Pareto-optimal ({len(run.pareto)})")
        if not small and len(run.pareto) <= 30:
            for t, x, yy in zip(run.pareto, xs, ys):
                ax.annotate(f"#{t.number}", (x, yy), xytext=(4, 4), textcoords="offset points",
                            fontsize=7, color=COLORS["pareto"], zorder=5)
    if chosen is not None and not small:
        ax.scatter([chosen.refusals], [y(chosen.kl)], s=size * 6, facecolor="none", edgecolor=COLORS["chosen"],
                   lw=2, zorder=6, label=f"trial #{chosen.number} (layer weights below)")


def _draw_base(ax: Axes, run: RunData, zero_y: float, small: bool) -> None:
    base = run.base_refusals
    if base is None:
        return
    size = 14 if small else 24
    ax.scatter([base], [zero_y], marker="*", s=size * (5 if small else 8), color=COLORS["base"], zorder=7,
               label=f"base model ({base}/{run.n_bad} refusals, KL 0)")
    if not small:
        ax.annotate("base model\n(KL = 0)", (base, zero_y), xytext=(-12, 14), textcoords="offset points",
                    ha="right", va="bottom", fontsize=8, color=COLORS["base"],
                    arrowprops=dict(arrowstyle="-", color=COLORS["base"], lw=0.8))


def _set_kl_limits(ax: Axes, kls: list[float], log: bool, zero_y: float, small: bool) -> None:
    if log:
        ax.set_yscale("log")
        top = max(kls) * 1.6
        ax.set_ylim(zero_y / 1.8, top)
        # Label the floor as 0: that is where KL = 0 (the base model) is drawn.
        ax.axhline(zero_y * 1.35, color="#cccccc", lw=0.6, ls=(0, (2, 3)), zorder=1)
        ticks = [y for y in ax.get_yticks() if zero_y * 1.6 < y <= top]
        ax.set_yticks([zero_y] + ticks, ["0"] + [_tick(y) for y in ticks])
        ax.minorticks_off()
    else:
        top = max(kls or [KL_THRESHOLD]) * 1.08 or 1.0
        ax.set_ylim(-0.04 * top, top)
    if not small and kls and (not log or min(kls) <= KL_THRESHOLD <= max(kls) * 1.6):
        ax.axhline(KL_THRESHOLD, color="#888888", lw=0.8, ls="--", zorder=1)
        ax.annotate(f"KL {KL_THRESHOLD}", (0, KL_THRESHOLD), xycoords=("axes fraction", "data"),
                    xytext=(3, 2), textcoords="offset points", fontsize=7, color="#666666")


def _label_front_axes(ax: Axes, run: RunData, log: bool, small: bool) -> None:
    n_bad, base = run.n_bad, run.base_refusals
    xmax = max([t.refusals for t in run.complete] + ([base] if base is not None else []) + [1])
    ax.set_xlim(-0.03 * xmax - 0.5, xmax * 1.05 + 0.5)
    _grid(ax)
    log_note = " (log)" if log else ""
    if small:
        ax.set_xlabel(f"refusals (of {n_bad})", fontsize=8)
        ax.set_ylabel("KL divergence" + log_note, fontsize=8)
        ax.tick_params(labelsize=7)
        return
    ax.set_xlabel(f"refusals (of {n_bad} harmful prompts)", fontsize=10)
    ax.set_ylabel("KL divergence from the base model" + log_note, fontsize=10)
    if n_bad > 0:
        sec = ax.secondary_xaxis("top", functions=(lambda x: x / n_bad, lambda f: f * n_bad))
        sec.set_xlabel("fraction refused", fontsize=8)
        sec.tick_params(labelsize=8)


def _draw_front(ax: Axes, run: RunData, *, chosen: Trial | None = None, small: bool = False) -> None:
    """Scatter of complete trials, the Pareto front as a step line, the base model at KL = 0."""
    kls = [t.kl for t in run.complete if t.kl is not None]
    log, zero_y = _kl_axis(kls)
    _draw_trials(ax, run, (lambda kl: max(kl, zero_y)) if log else (lambda kl: kl), chosen, small)
    _draw_base(ax, run, zero_y, small)
    _set_kl_limits(ax, kls, log, zero_y, small)
    _label_front_axes(ax, run, log, small)


def pareto_png(run: RunData, chosen: Trial | None = None) -> bytes:
    fig = _figure(8.5, 5.6)
    ax = fig.add_subplot()
    _draw_front(ax, run, chosen=chosen)
    ax.set_title(f"{run.model_name}: refusals vs KL divergence", fontsize=11)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return _png(fig)


def small_front_png(run: RunData) -> bytes:
    fig = _figure(3.4, 2.4)
    ax = fig.add_subplot()
    _draw_front(ax, run, small=True)
    ax.set_title(run.model_name, fontsize=8)
    return _png(fig, dpi=140)


# --------------------------------------------------------------------------------------------------
# History


def running_front_sizes(trials: list[Trial]) -> list[int]:
    """Size of the Pareto front after each complete trial, in trial-number order. Incremental, with
    search/front.py's rule (a point equal to one already on the front does not join it)."""
    front: list[tuple[int, float]] = []
    sizes = []
    for t in trials:
        p = (t.refusals, t.kl)
        if not any(q[0] <= p[0] and q[1] <= p[1] for q in front):
            front = [q for q in front if not (p[0] <= q[0] and p[1] <= q[1])] + [p]
        sizes.append(len(front))
    return sizes


def _running(values: list[float]) -> list[float]:
    out, low = [], math.inf
    for v in values:
        low = min(low, v)
        out.append(low if low < math.inf else math.nan)
    return out


def _refusals_panel(ax: Axes, run: RunData, colors: list[str]) -> None:
    done = run.complete
    xs = [t.number for t in done]
    ax.scatter(xs, [t.refusals for t in done], c=colors, s=16, lw=0, zorder=3)
    ax.plot(xs, _running([t.refusals for t in done]), drawstyle="steps-post", color=COLORS["base"], lw=1.2,
            label="fewest so far")
    within = [t.refusals if t.kl <= KL_THRESHOLD else math.inf for t in done]
    ax.plot(xs, _running(within), drawstyle="steps-post", color=COLORS["chosen"], lw=1.2,
            label=f"fewest so far at KL ≤ {KL_THRESHOLD}")
    if run.base_refusals is not None:
        ax.axhline(run.base_refusals, color=COLORS["base"], lw=0.8, ls=":", label="base model")
    ax.set_ylabel(f"refusals (of {run.n_bad})")
    ax.scatter([], [], color=COLORS["pareto"], s=16, label="Pareto-optimal")
    ax.legend(fontsize=7, loc="upper right", framealpha=0.9)


def _kl_panel(ax: Axes, run: RunData, colors: list[str]) -> None:
    xs = [t.number for t in run.complete]
    kls = [t.kl for t in run.complete]
    ax.scatter(xs, kls, c=colors, s=16, lw=0, zorder=3)
    log, _ = _kl_axis(kls)
    if log:
        ax.set_yscale("log")
    ax.plot(xs, _running(kls), drawstyle="steps-post", color=COLORS["base"], lw=1.2, label="lowest so far")
    ax.axhline(KL_THRESHOLD, color="#888888", lw=0.8, ls="--", label=f"KL {KL_THRESHOLD}")
    ax.set_ylabel("KL divergence" + (" (log)" if log else ""))
    ax.legend(fontsize=7, loc="upper right", framealpha=0.9)


def _front_size_panel(ax: Axes, run: RunData) -> None:
    ax.plot([t.number for t in run.complete], running_front_sizes(run.complete), drawstyle="steps-post",
            color=COLORS["pareto"], lw=1.4, label="Pareto front size")
    failed = run.failed
    if failed:
        ax.scatter([t.number for t in failed], [0] * len(failed), marker="x", color=COLORS["fail"], s=28,
                   zorder=4, label=f"failed trial ({len(failed)})", clip_on=False)
    ax.set_ylabel("front size")
    ax.set_xlabel("trial number")
    ax.set_ylim(bottom=-0.3)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.9)


def history_png(run: RunData) -> bytes:
    fig = _figure(8.5, 7.2)
    axes = fig.subplots(3, 1, sharex=True, height_ratios=[3, 3, 2])
    on_front = {t.number for t in run.pareto}
    colors = [COLORS["pareto"] if t.number in on_front else COLORS["trial"] for t in run.complete]
    _refusals_panel(axes[0], run, colors)
    _kl_panel(axes[1], run, colors)
    _front_size_panel(axes[2], run)
    startup = (run.manifest.get("settings") or {}).get("n_startup_trials")
    if isinstance(startup, int) and run.complete and 0 < startup <= run.complete[-1].number:
        for ax in axes:
            ax.axvline(startup - 0.5, color="#999999", lw=0.8, ls="-.", zorder=1)
        axes[0].annotate("end of random start-up", (startup - 0.5, 1), xycoords=("data", "axes fraction"),
                         xytext=(3, -10), textcoords="offset points", fontsize=7, color="#666666")
    for ax in axes:
        _grid(ax)
    axes[0].set_title(f"{run.model_name}: optimization history "
                      f"({len(run.complete)} complete, {len(run.failed)} failed)", fontsize=11)
    return _png(fig)


# --------------------------------------------------------------------------------------------------
# Layer kernel


def _n_layers(run: RunData, params: TrialParams) -> int:
    n = run.manifest.get("n_layers")
    if isinstance(n, int) and n > 0:
        return n
    reach = [c.max_weight_position + c.min_weight_distance for c in params.components.values()]
    return int(math.ceil(max(reach, default=0))) + 1


def kernel_png(run: RunData, trial: Trial) -> bytes:
    """The per-layer ablation weight of each edited component of `trial` (a complete trial)."""
    params = TrialParams.from_dict(trial.decoded or {})
    n_layers = _n_layers(run, params)
    layers = list(range(n_layers))
    fig = _figure(8.5, 3.9)
    ax = fig.add_subplot()
    for i, (name, comp) in enumerate(params.components.items()):
        color = COLORS.get(name, FALLBACK_COLORS[i % len(FALLBACK_COLORS)])
        weights = [layer_weight(layer, comp) for layer in layers]
        ax.plot(layers, weights, color=color, lw=1.4, marker="o", ms=3.5, label=name, zorder=3)
        ax.fill_between(layers, weights, color=color, alpha=0.12, lw=0)
        ax.axvline(comp.max_weight_position, color=color, lw=0.8, ls=":", zorder=2)
    if params.direction_index is not None:
        ax.axvline(params.direction_index, color=COLORS["base"], lw=1.0, ls="--", zorder=2,
                   label=f"global direction index {params.direction_index:.2f}")
    else:
        ax.plot([], [], " ", label="direction: per layer")
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"layer (of {n_layers}); dotted: max_weight_position")
    ax.set_ylabel("ablation weight (0 = not edited)")
    _grid(ax)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    ax.set_title(f"Layer weights of trial #{trial.number}: {trial.refusals}/{trial.n_bad} refusals, "
                 f"KL {trial.kl:.4g}", fontsize=11)
    return _png(fig)


def evaluation_png(rows: list[dict[str, Any]]) -> bytes:
    """Candidates of an evaluation: judged refusal rate against damage (multi-token KL, or the
    search's KL when the evaluation measured none), the base model marked; over-refusal beside each."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    use_kl = any(r.get("kl") is not None for r in rows)
    for r in rows:
        rate = r.get("refusal_rate")
        damage = r.get("kl") if use_kl else r.get("search_kl")
        if rate is None or damage is None:
            continue
        base = r["trial"] == -1
        ax.scatter([damage], [100 * rate], s=60 if base else 36, zorder=3,
                   color=COLORS["base"] if base else COLORS["pareto"], marker="s" if base else "o")
        label = "base" if base else f"#{r['trial']}"
        if r.get("over_refusal_rate") is not None:
            label += f" (over {100 * r['over_refusal_rate']:.0f}%)"
        ax.annotate(label, (damage, 100 * rate), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"KL over the base model's first {rows[0].get('kl_tokens')} reply tokens" if use_kl and rows
                  else "KL (search, first token)")
    ax.set_ylabel(f"refusals, judge {rows[0].get('judge', '?') if rows else '?'} (%)")
    ax.set_ylim(bottom=-3, top=103)
    _grid(ax)
    return _png(fig)
