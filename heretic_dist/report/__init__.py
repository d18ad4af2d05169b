"""HTML reports of a run (and of a batch of runs), readable offline.

`write_report(run_uri)` reads the files the driver leaves in a run directory (manifest.json,
run_info.json, trials.parquet) and writes `report.html` plus its PNG figures beside it:

- `report-pareto.png`   raw refusals vs KL divergence: every complete trial, the Pareto front as a
                         step line, the base model (KL = 0) marked;
- `report-history.png`  refusals, KL and the running Pareto-front size over trial numbers;
- `report-kernel.png`   the per-layer ablation weights of one chosen Pareto trial.

The HTML references the PNGs by relative path (one convention, no base64): it loads nothing from
the network (no scripts, no remote fonts, no CSS files), so the folder can be copied anywhere.
The Pareto front is recomputed from trials.parquet over raw (refusals, KL), the same definition
pareto.parquet uses, so a report of a run stopped mid-way is still correct.

`write_batch_report(batch_uri)` writes one page for a batch of models (batch_state.json): a row
per model with its status, base refusals, best points, trial counts and wall time, a small front
per model, and a link to each model's own report (written too unless `per_model=False`).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch), so reports can be made from any thread or a notebook without side effects.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from heretic_dist import __version__
from heretic_dist.errors import UserError
from heretic_dist.rundir import MANIFEST, TRIALS, RunDir

RUN_INFO = "run_info.json"
BATCH_STATE = "batch_state.json"
REPORT = "report.html"
KL_THRESHOLD = 0.05  # default choice of the trial whose kernel is drawn: fewest refusals at KL <= this
_LOG_RATIO = 20.0  # KL axis goes log when max/min of the positive KLs exceeds this

_COLORS = {
    "trial": "#9aa5b1",
    "pareto": "#d1495b",
    "base": "#2e4057",
    "chosen": "#edae49",
    "fail": "#c0392b",
    "attn.o_proj": "#00798c",
    "mlp.down_proj": "#d1495b",
}
_FALLBACK_COLORS = ["#00798c", "#d1495b", "#edae49", "#66a182", "#2e4057", "#8d96a3"]


# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class Trial:
    number: int
    state: str
    refusals: int | None
    kl: float | None
    n_bad: int
    decoded: dict[str, Any] | None
    duration_s: float | None
    fail_reason: str | None
    row: dict[str, Any]

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE" and self.refusals is not None and self.kl is not None


@dataclass
class RunData:
    uri: str
    manifest: dict[str, Any]
    info: dict[str, Any]
    trials: list[Trial]
    complete: list[Trial] = field(default_factory=list)
    pareto: list[Trial] = field(default_factory=list)  # sorted by refusals, then KL

    @property
    def n_bad(self) -> int:
        n = self.manifest.get("n_bad_prompts")
        if isinstance(n, int) and n > 0:
            return n
        return max((t.n_bad for t in self.trials), default=0)

    @property
    def base_refusals(self) -> int | None:
        value = self.manifest.get("base_refusals")
        return int(value) if isinstance(value, (int, float)) else None

    @property
    def model_name(self) -> str:
        settings = self.manifest.get("settings") or {}
        model = self.manifest.get("model")
        if isinstance(settings.get("model"), str) and settings["model"]:
            return settings["model"]
        if isinstance(model, str):
            return model
        if isinstance(model, dict):
            for key in ("name", "id", "name_or_path", "path", "model"):
                if isinstance(model.get(key), str) and model[key]:
                    return model[key]
        return "unknown model"

    @property
    def failed(self) -> list[Trial]:
        return [t for t in self.trials if t.state == "FAIL"]

    @property
    def running(self) -> list[Trial]:
        return [t for t in self.trials if t.state not in ("COMPLETE", "FAIL")]

    def by_number(self, number: int) -> Trial | None:
        return next((t for t in self.complete if t.number == number), None)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _trial(row: dict[str, Any], default_n_bad: int) -> Trial:
    refusals = _num(row.get("refusals"))
    n_bad = _num(row.get("n_bad_prompts"))
    decoded = row.get("decoded")
    return Trial(
        number=int(row.get("number", -1)),
        state=str(row.get("state") or "UNKNOWN").upper(),
        refusals=None if refusals is None else int(refusals),
        kl=_num(row.get("kl")),
        n_bad=int(n_bad) if n_bad else default_n_bad,
        decoded=decoded if isinstance(decoded, dict) else None,
        duration_s=_num(row.get("duration_s")),
        fail_reason=row.get("fail_reason"),
        row=row,
    )


def pareto_front(trials: Iterable[Trial]) -> list[Trial]:
    """Non-dominated complete trials over raw (refusals, KL), both minimized; ties are all kept.

    Sorted by refusals ascending (so KL descending).
    """
    points = sorted((t for t in trials if t.complete), key=lambda t: (t.refusals, t.kl, t.number))
    front: list[Trial] = []
    best_kl = math.inf  # lowest KL among trials with strictly fewer refusals
    i = 0
    while i < len(points):
        r = points[i].refusals
        group = [t for t in points[i:] if t.refusals == r]
        low = group[0].kl
        assert low is not None
        if low < best_kl:
            front.extend(t for t in group if t.kl == low)
            best_kl = low
        i += len(group)
    return front


def choose_trial(run: RunData, number: int | None = None) -> Trial | None:
    """The trial whose kernel is drawn: `number` if given, else the Pareto trial with the fewest
    refusals at KL <= KL_THRESHOLD, else the Pareto trial with the lowest KL (the least damage)."""
    if number is not None:
        trial = run.by_number(number)
        if trial is None:
            raise UserError(f"trial {number} is not a complete trial of {run.uri}")
        return trial
    if not run.pareto:
        return None
    within = [t for t in run.pareto if t.kl is not None and t.kl <= KL_THRESHOLD]
    if within:
        return min(within, key=lambda t: (t.refusals, t.kl))
    return min(run.pareto, key=lambda t: (t.kl, t.refusals))


def load_run(run_uri: str | os.PathLike[str]) -> RunData:
    """Read a run directory; one-line UserErrors for what is missing."""
    run = RunDir(str(run_uri))
    if run.is_local:
        assert run.local_path is not None
        if not run.local_path.exists():
            raise UserError(f"run directory {run.uri} does not exist")
        if not run.local_path.is_dir():
            raise UserError(f"run directory {run.uri} is a file, not a folder")
    if not run.exists(TRIALS):
        hint = "" if run.exists(MANIFEST) else " (and no manifest.json: is this a heretic-dist run directory?)"
        raise UserError(
            f"no {TRIALS} in {run.uri}: no trial has finished yet, nothing to report{hint}"
        )
    if not run.exists(MANIFEST):
        raise UserError(f"no {MANIFEST} in {run.uri}: not a complete heretic-dist run directory")
    manifest = run.read_json(MANIFEST)
    if not isinstance(manifest, dict):
        raise UserError(f"{MANIFEST} in {run.uri} is not a JSON object")
    info = run.read_json(RUN_INFO) if run.exists(RUN_INFO) else {}
    if not isinstance(info, dict):
        info = {}
    try:
        rows = run.read_parquet(TRIALS)
    except UserError:
        raise
    except Exception as exc:  # a truncated or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{TRIALS} in {run.uri} cannot be read: {first}") from None
    n_bad = manifest.get("n_bad_prompts") if isinstance(manifest.get("n_bad_prompts"), int) else 0
    trials = sorted((_trial(r, n_bad) for r in rows), key=lambda t: t.number)
    data = RunData(uri=run.uri, manifest=manifest, info=info, trials=trials)
    data.complete = [t for t in trials if t.complete]
    data.pareto = pareto_front(data.complete)
    return data


# --------------------------------------------------------------------------------------------------
# Figures


def _mpl():
    """matplotlib's Figure + Agg canvas, or a UserError saying how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(
            "the report needs matplotlib: pip install matplotlib (or heretic-dist[research])"
        ) from None
    return Figure, FigureCanvasAgg


def _figure(width: float, height: float, **kwargs: Any):
    Figure, Canvas = _mpl()
    fig = Figure(figsize=(width, height), layout="constrained", **kwargs)
    Canvas(fig)
    return fig


def _png(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def _kl_axis(kls: list[float]) -> tuple[bool, float]:
    """(log scale?, y at which KL = 0 is drawn)."""
    positive = [k for k in kls if k > 0]
    if len(positive) >= 2 and max(positive) / min(positive) > _LOG_RATIO:
        return True, min(positive) / 3.0
    return False, 0.0


def _draw_front(ax, run: RunData, *, chosen: Trial | None = None, small: bool = False) -> None:
    """Scatter of complete trials, the Pareto front as a step line, the base model at KL = 0."""
    n_bad = run.n_bad
    base = run.base_refusals
    kls = [t.kl for t in run.complete if t.kl is not None]
    log, zero_y = _kl_axis(kls)
    size = 14 if small else 24
    others = [t for t in run.complete if t not in run.pareto]
    if others:
        ax.scatter(
            [t.refusals for t in others], [max(t.kl, zero_y) if log else t.kl for t in others],
            s=size, color=_COLORS["trial"], alpha=0.75, lw=0, label=f"trial ({len(run.complete)} complete)",
            zorder=2,
        )
    if run.pareto:
        xs = [t.refusals for t in run.pareto]
        ys = [max(t.kl, zero_y) if log else t.kl for t in run.pareto]
        ax.plot(xs, ys, drawstyle="steps-post", color=_COLORS["pareto"], lw=1.4, zorder=3, alpha=0.8)
        ax.scatter(xs, ys, s=size * 1.8, color=_COLORS["pareto"], edgecolor="white", lw=0.6, zorder=4,
                   label=f"Pareto-optimal ({len(run.pareto)})")
        if not small and len(run.pareto) <= 30:
            for t, x, y in zip(run.pareto, xs, ys):
                ax.annotate(f"#{t.number}", (x, y), xytext=(4, 4), textcoords="offset points",
                            fontsize=7, color=_COLORS["pareto"], zorder=5)
    if chosen is not None and not small:
        ax.scatter([chosen.refusals], [max(chosen.kl, zero_y) if log else chosen.kl], s=size * 6,
                   facecolor="none", edgecolor=_COLORS["chosen"], lw=2, zorder=6,
                   label=f"trial #{chosen.number} (layer weights below)")
    if base is not None:
        ax.scatter([base], [zero_y], marker="*", s=size * 8 if not small else size * 5,
                   color=_COLORS["base"], zorder=7, label=f"base model ({base}/{n_bad} refusals, KL 0)")
        if not small:
            ax.annotate("base model\n(KL = 0)", (base, zero_y), xytext=(-12, 14), textcoords="offset points",
                        ha="right", va="bottom", fontsize=8, color=_COLORS["base"],
                        arrowprops=dict(arrowstyle="-", color=_COLORS["base"], lw=0.8))
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
        top = max(kls + [KL_THRESHOLD if not kls else 0.0]) * 1.08 or 1.0
        ax.set_ylim(-0.04 * top, top)
    if not small and kls and (not log or min(kls) <= KL_THRESHOLD <= max(kls) * 1.6):
        ax.axhline(KL_THRESHOLD, color="#888888", lw=0.8, ls="--", zorder=1)
        ax.annotate(f"KL {KL_THRESHOLD}", (0, KL_THRESHOLD), xycoords=("axes fraction", "data"),
                    xytext=(3, 2), textcoords="offset points", fontsize=7, color="#666666")
    xmax = max([t.refusals for t in run.complete] + ([base] if base is not None else []) + [1])
    ax.set_xlim(-0.03 * xmax - 0.5, xmax * 1.05 + 0.5)
    ax.grid(True, color="#eeeeee", lw=0.6, zorder=0)
    ax.set_axisbelow(True)
    fs = 8 if small else 10
    if small:
        ax.set_xlabel(f"refusals (of {n_bad})", fontsize=fs)
        ax.set_ylabel("KL divergence" + (" (log)" if log else ""), fontsize=fs)
    else:
        ax.set_xlabel(f"refusals (of {n_bad} harmful prompts)", fontsize=fs)
        ax.set_ylabel("KL divergence from the base model" + (" (log)" if log else ""), fontsize=fs)
    if small:
        ax.tick_params(labelsize=7)
    elif n_bad > 0:
        sec = ax.secondary_xaxis("top", functions=(lambda x: x / n_bad, lambda f: f * n_bad))
        sec.set_xlabel("fraction refused", fontsize=8)
        sec.tick_params(labelsize=8)


def _tick(y: float) -> str:
    return f"{y:g}" if y >= 1e-3 else f"{y:.0e}"


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


def _running_front_sizes(trials: list[Trial]) -> list[int]:
    """Size of the Pareto front after each complete trial, in trial-number order."""
    front: list[tuple[int, float]] = []
    sizes = []
    for t in trials:
        p = (t.refusals, t.kl)
        if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in front):
            front = [q for q in front if not (p[0] <= q[0] and p[1] <= q[1] and q != p)] + [p]
        sizes.append(len(front))
    return sizes


def history_png(run: RunData) -> bytes:
    fig = _figure(8.5, 7.2)
    axes = fig.subplots(3, 1, sharex=True, height_ratios=[3, 3, 2])
    done = run.complete
    xs = [t.number for t in done]
    on_front = {t.number for t in run.pareto}
    colors = [_COLORS["pareto"] if t.number in on_front else _COLORS["trial"] for t in done]
    ref_ax, kl_ax, size_ax = axes

    ref_ax.scatter(xs, [t.refusals for t in done], c=colors, s=16, lw=0, zorder=3)
    best, best_ok, ys, ys_ok = math.inf, math.inf, [], []
    for t in done:
        best = min(best, t.refusals)
        if t.kl is not None and t.kl <= KL_THRESHOLD:
            best_ok = min(best_ok, t.refusals)
        ys.append(best)
        ys_ok.append(best_ok if best_ok < math.inf else math.nan)
    ref_ax.plot(xs, ys, drawstyle="steps-post", color=_COLORS["base"], lw=1.2, label="fewest so far")
    ref_ax.plot(xs, ys_ok, drawstyle="steps-post", color=_COLORS["chosen"], lw=1.2,
                label=f"fewest so far at KL ≤ {KL_THRESHOLD}")
    if run.base_refusals is not None:
        ref_ax.axhline(run.base_refusals, color=_COLORS["base"], lw=0.8, ls=":", label="base model")
    ref_ax.set_ylabel(f"refusals (of {run.n_bad})")
    ref_ax.scatter([], [], color=_COLORS["pareto"], s=16, label="Pareto-optimal")
    ref_ax.legend(fontsize=7, loc="upper right", framealpha=0.9)

    kls = [t.kl for t in done]
    kl_ax.scatter(xs, kls, c=colors, s=16, lw=0, zorder=3)
    log, _ = _kl_axis(kls)
    if log:
        kl_ax.set_yscale("log")
    running, low = [], math.inf
    for k in kls:
        low = min(low, k)
        running.append(low)
    kl_ax.plot(xs, running, drawstyle="steps-post", color=_COLORS["base"], lw=1.2, label="lowest so far")
    kl_ax.axhline(KL_THRESHOLD, color="#888888", lw=0.8, ls="--", label=f"KL {KL_THRESHOLD}")
    kl_ax.set_ylabel("KL divergence" + (" (log)" if log else ""))
    kl_ax.legend(fontsize=7, loc="upper right", framealpha=0.9)

    size_ax.plot(xs, _running_front_sizes(done), drawstyle="steps-post", color=_COLORS["pareto"], lw=1.4,
                 label="Pareto front size")
    failed = run.failed
    if failed:
        size_ax.scatter([t.number for t in failed], [0] * len(failed), marker="x", color=_COLORS["fail"],
                        s=28, zorder=4, label=f"failed trial ({len(failed)})", clip_on=False)
    size_ax.set_ylabel("front size")
    size_ax.set_xlabel("trial number")
    size_ax.set_ylim(bottom=-0.3)
    size_ax.legend(fontsize=7, loc="upper left", framealpha=0.9)

    startup = (run.manifest.get("settings") or {}).get("n_startup_trials")
    if isinstance(startup, int) and done and 0 < startup <= max(xs):
        for ax in axes:
            ax.axvline(startup - 0.5, color="#999999", lw=0.8, ls="-.", zorder=1)
        ref_ax.annotate("end of random start-up", (startup - 0.5, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -10), textcoords="offset points", fontsize=7, color="#666666")
    for ax in axes:
        ax.grid(True, color="#eeeeee", lw=0.6)
        ax.set_axisbelow(True)
    ref_ax.set_title(f"{run.model_name}: optimization history ({len(done)} complete, {len(failed)} failed)",
                     fontsize=11)
    return _png(fig)


def _n_layers(run: RunData, params) -> int:
    n = run.manifest.get("n_layers")
    if isinstance(n, int) and n > 0:
        return n
    reach = [c.max_weight_position + c.min_weight_distance for c in params.components.values()]
    return int(math.ceil(max(reach, default=0))) + 1


def kernel_png(run: RunData, trial: Trial) -> bytes:
    from heretic_dist.engine.ablation import layer_weight
    from heretic_dist.engine.types import TrialParams

    params = TrialParams.from_dict(trial.decoded or {})
    n_layers = _n_layers(run, params)
    layers = list(range(n_layers))
    fig = _figure(8.5, 3.9)
    ax = fig.add_subplot()
    for i, (name, comp) in enumerate(params.components.items()):
        color = _COLORS.get(name, _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)])
        weights = [layer_weight(layer, comp) for layer in layers]
        ax.plot(layers, weights, color=color, lw=1.4, marker="o", ms=3.5, label=name, zorder=3)
        ax.fill_between(layers, weights, color=color, alpha=0.12, lw=0)
        ax.axvline(comp.max_weight_position, color=color, lw=0.8, ls=":", zorder=2)
    if params.direction_index is not None:
        ax.axvline(params.direction_index, color=_COLORS["base"], lw=1.0, ls="--", zorder=2,
                   label=f"global direction index {params.direction_index:.2f}")
    else:
        ax.plot([], [], " ", label="direction: per layer")
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"layer (of {n_layers}); dotted: max_weight_position")
    ax.set_ylabel("ablation weight (0 = not edited)")
    ax.grid(True, color="#eeeeee", lw=0.6)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    ax.set_title(
        f"Layer weights of trial #{trial.number}: {trial.refusals}/{trial.n_bad} refusals, KL {trial.kl:.4g}",
        fontsize=11,
    )
    return _png(fig)


# --------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f4f5f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen td{background:#fdf3dc;font-weight:600}
img{max-width:100%;height:auto;border:1px solid #eee}
.facts th{width:14em}.muted{color:#888}.bad{color:#b03a2e}code{font-size:.95em}
.wide{overflow-x:auto}details{margin:.5em 0}summary{cursor:pointer;color:#444}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _page(title: str, body: str) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
        f"<p class=\"muted\">Generated {_e(now)} by heretic-dist {_e(__version__)}.</p>\n</body>\n</html>\n"
    )


def _table(headers: list[str], rows: list[list[tuple[str, bool]]], row_classes: list[str] | None = None) -> str:
    """rows of (html-escaped cell, numeric?)."""
    out = ["<table>", "<tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td class=\"n\">{c}</td>" if num else f"<td>{c}</td>"
                                          for c, num in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _fmt(value: Any, spec: str = ".3g") -> str:
    v = _num(value)
    return "–" if v is None else format(v, spec)


def _duration(seconds: Any) -> str:
    s = _num(seconds)
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _components(trials: list[Trial]) -> list[str]:
    names: list[str] = []
    for t in trials:
        for name in ((t.decoded or {}).get("components") or {}):
            if name not in names:
                names.append(name)
    return names


def _pareto_table(run: RunData, chosen: Trial | None) -> str:
    if not run.pareto:
        return "<p class=\"muted\">No complete trial yet.</p>"
    comps = _components(run.pareto)
    headers = ["trial", "refusals", "refused", "KL", "scope", "direction index"]
    for c in comps:
        headers += [f"<code>{_e(c)}</code><br>{k}" for k in
                    ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")]
    rows, classes = [], []
    for t in run.pareto:
        d = t.decoded or {}
        frac = f"{t.refusals / t.n_bad:.0%}" if t.n_bad else "–"
        row = [(f"#{t.number}", True), (f"{t.refusals}/{t.n_bad}", True), (frac, True),
               (_fmt(t.kl, ".4g"), True), (_e(d.get("direction_scope", "–")), False),
               (_fmt(d.get("direction_index"), ".2f"), True)]
        for c in comps:
            p = (d.get("components") or {}).get(c) or {}
            row += [(_fmt(p.get("max_weight"), ".3f"), True), (_fmt(p.get("max_weight_position"), ".2f"), True),
                    (_fmt(p.get("min_weight"), ".3f"), True), (_fmt(p.get("min_weight_distance"), ".2f"), True)]
        rows.append(row)
        classes.append("chosen" if chosen is not None and t.number == chosen.number else "")
    return "<div class=\"wide\">" + _table(headers, rows, classes) + "</div>"


_KEY_SETTINGS = ("model", "n_trials", "n_startup_trials", "seed", "row_normalization", "dtype", "dtypes",
                 "quantization", "max_response_length", "kl_divergence_target", "kl_divergence_scale",
                 "allow_mlp_off", "orthogonalize_direction", "winsorization_quantile")


def _facts(run: RunData) -> str:
    m, info = run.manifest, run.info
    settings = m.get("settings") or {}
    gpus = _num(info.get("gpus_per_worker"))
    worker_s = _num(info.get("worker_seconds"))
    if worker_s is None:  # without run_info: the sum of trial durations is a lower bound
        worker_s = sum(t.duration_s or 0.0 for t in run.trials) or None
    gpu_h = f"{worker_s * gpus / 3600:.2f}" if worker_s is not None and gpus else "–"
    durations = sorted(t.duration_s for t in run.complete if t.duration_s is not None)
    rows: list[tuple[str, str]] = [
        ("run id", f"<code>{_e(m.get('run_id', '–'))}</code>"),
        ("run directory", f"<code>{_e(run.uri)}</code>"),
        ("model", _e(run.model_name)),
    ]
    model = m.get("model")
    if isinstance(model, dict) and model:
        rows.append(("model identity", ", ".join(f"{_e(k)}: <code>{_e(v)}</code>" for k, v in sorted(model.items()))))
    rows += [
        ("layers / components", f"{_e(m.get('n_layers', '–'))} / "
                                f"{_e(', '.join(map(str, m.get('components') or [])) or '–')}"),
        ("base model refusals", f"{_e(run.base_refusals if run.base_refusals is not None else '–')}"
                                f" of {run.n_bad} harmful prompts"),
        ("harmless prompts (KL)", _e(m.get("n_good_prompts", "–"))),
        ("trials", f"{len(run.complete)} complete, {len(run.failed)} failed"
                   + (f", {len(run.running)} unfinished" if run.running else "")
                   + (f" (of {_e(settings['n_trials'])} requested)" if "n_trials" in settings else "")),
        ("Pareto-optimal trials", str(len(run.pareto))),
        ("workers", f"{_e(info.get('workers', '–'))} (shards per trial {_e(info.get('shards_per_trial', '–'))}, "
                    f"{_e(info.get('cpus_per_worker', '–'))} CPU / {_e(info.get('gpus_per_worker', '–'))} GPU each)"),
        ("wall time", _duration(info.get("wall_seconds"))
                      + (f" ({_e(info.get('started'))} → {_e(info.get('updated'))})" if info.get("started") else "")),
        ("worker time", f"{_duration(worker_s)} = {gpu_h} GPU-hours"
                        + ("" if info.get("worker_seconds") is not None else " (sum of trial durations)")),
        ("trial duration", f"median {_duration(durations[len(durations) // 2])}" if durations else "–"),
        ("hosts", _e(", ".join(map(str, info.get("hosts") or [])) or "–")),
    ]
    for key in _KEY_SETTINGS:
        if key in settings and key != "model":
            rows.append((f"setting <code>{_e(key)}</code>", f"<code>{_e(settings[key])}</code>"))
    prompts = m.get("prompts") or {}
    if isinstance(prompts, dict) and prompts:
        rows.append(("prompt sets", "<br>".join(
            f"{_e(name)}: {_e((p or {}).get('n', '?'))} prompts, sha256 <code>{_e(str((p or {}).get('sha256', ''))[:12])}</code>"
            for name, p in prompts.items())))
    if m.get("response_prefix"):
        rows.append(("response prefix", f"<code>{_e(m['response_prefix'])}</code>"))
    out = ["<table class=\"facts\">"] + [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows] + ["</table>"]
    if settings:
        out.append("<details><summary>all result-affecting settings</summary>")
        out.append(_table(["setting", "value"], [[(f"<code>{_e(k)}</code>", False), (f"<code>{_e(v)}</code>", False)]
                                                 for k, v in sorted(settings.items())]))
        out.append("</details>")
    return "\n".join(out)


def _failures(run: RunData) -> str:
    if not run.failed:
        return ""
    rows = [[(f"#{t.number}", True), (_e(t.row.get("attempts", "–")), True), (_e(t.fail_reason or "–"), False)]
            for t in run.failed]
    return "<details><summary>failed trials</summary>" + _table(["trial", "attempts", "reason"], rows) + "</details>"


# --------------------------------------------------------------------------------------------------
# Output


def _destination(default: RunDir, out: str | os.PathLike[str] | None, name: str) -> tuple[RunDir, str]:
    """(folder, html file name). `out` is a folder, or a path ending in .html."""
    if out is None:
        return default, name
    text = str(out)
    if text.lower().endswith((".html", ".htm")):
        if "://" in text:
            folder, _, file = text.rstrip("/").rpartition("/")
        else:
            p = Path(text).expanduser()
            folder, file = str(p.parent), p.name
        return RunDir(folder), file
    return RunDir(text), name


def _result(folder: RunDir, name: str) -> Path | str:
    if folder.is_local:
        assert folder.local_path is not None
        return folder.local_path / name
    return f"{folder.uri}/{name}"


def _stem(html_name: str) -> str:
    return re.sub(r"\.html?$", "", html_name, flags=re.I)


def write_report(
    run_uri: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, trial: int | None = None
) -> Path | str:
    """Write report.html and its PNGs into the run directory (or `out`: a folder, or a .html path).

    `trial` picks the trial whose layer weights are drawn (default: see `choose_trial`). Returns the
    Path of the HTML file, or its URI (str) when it was written to an object store.
    """
    run = load_run(run_uri)
    folder, name = _destination(RunDir(run.uri), out, REPORT)
    chosen = choose_trial(run, trial)
    stem = _stem(name)
    figures: list[tuple[str, bytes]] = [(f"{stem}-pareto.png", pareto_png(run, chosen)),
                                        (f"{stem}-history.png", history_png(run))]
    kernel_name = None
    if chosen is not None and chosen.decoded:
        kernel_name = f"{stem}-kernel.png"
        figures.append((kernel_name, kernel_png(run, chosen)))

    body = [f"<h1>heretic-dist run: {_e(run.model_name)}</h1>",
            f"<p class=\"sub\">run <code>{_e(run.manifest.get('run_id', '–'))}</code> · "
            f"{len(run.complete)} complete trials · {len(run.pareto)} Pareto-optimal · base model "
            f"{_e(run.base_refusals if run.base_refusals is not None else '–')}/{run.n_bad} refusals</p>"]
    body.append("<h2>Pareto front: refusals vs KL divergence</h2>")
    body.append(f"<p>Every complete trial; the Pareto-optimal ones (no other trial has both fewer or equal "
                f"refusals and lower or equal KL) in red, joined as a step line. The base model has KL 0 by "
                f"definition.</p><img src=\"{_e(figures[0][0])}\" alt=\"Pareto front\">")
    body.append("<h2>Optimization history</h2>")
    body.append(f"<img src=\"{_e(figures[1][0])}\" alt=\"optimization history\">")
    body.append("<h2>Pareto-optimal trials</h2>")
    if chosen is not None:
        how = "chosen" if trial is not None else (
            f"fewest refusals at KL ≤ {KL_THRESHOLD}" if chosen.kl is not None and chosen.kl <= KL_THRESHOLD
            else f"no Pareto trial has KL ≤ {KL_THRESHOLD}: the one with the lowest KL")
        body.append(f"<p>Highlighted: trial #{chosen.number} ({_e(how)}), whose layer weights are drawn below. "
                    "Weights are absolute (min_weight already multiplied by max_weight); positions and distances "
                    "are in layers.</p>")
    body.append(_pareto_table(run, chosen))
    if kernel_name is not None and chosen is not None:
        body.append(f"<h2>Layer weights of trial #{chosen.number}</h2>")
        body.append("<p>Weight of each edited component per layer (a tent around max_weight_position; 0 means the "
                    "layer is not edited).</p>")
        body.append(f"<img src=\"{_e(kernel_name)}\" alt=\"layer weights of trial {chosen.number}\">")
    body.append("<h2>Run</h2>")
    body.append(_facts(run))
    body.append(_failures(run))

    for fig_name, data in figures:
        folder.write_bytes(fig_name, data)
    folder.write_bytes(name, _page(f"heretic-dist report: {run.model_name}", "\n".join(body)).encode())
    return _result(folder, name)


# --------------------------------------------------------------------------------------------------
# Batch


def _join(base: RunDir, ref: str) -> str:
    """A run_dir entry of batch_state.json: absolute/URI as is, relative to the batch folder else."""
    if "://" in ref or ref.startswith(("/", "~")):
        return ref
    if base.is_local:
        assert base.local_path is not None
        return str(base.local_path / ref)
    return posixpath.join(base.uri, ref)


def _link(folder: RunDir, target: Path | str) -> str | None:
    """Relative link from the report folder to a model's report, when one can be formed."""
    if folder.is_local and isinstance(target, Path):
        assert folder.local_path is not None
        return Path(os.path.relpath(target, folder.local_path)).as_posix()
    if not folder.is_local and isinstance(target, str) and target.startswith(folder.uri + "/"):
        return target[len(folder.uri) + 1 :]
    return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _best_points(run: RunData) -> str:
    if not run.pareto:
        return "–"
    parts = []
    fewest = min(run.pareto, key=lambda t: (t.refusals, t.kl))
    within = [t for t in run.pareto if t.kl <= KL_THRESHOLD]
    if within:
        t = min(within, key=lambda t: (t.refusals, t.kl))
        parts.append(f"KL ≤ {KL_THRESHOLD}: {t.refusals}/{t.n_bad} at KL {t.kl:.3g} (#{t.number})")
    if not within or fewest is not t:
        parts.append(f"fewest: {fewest.refusals}/{fewest.n_bad} at KL {fewest.kl:.3g} (#{fewest.number})")
    return "<br>".join(_e(p) for p in parts)


def write_batch_report(
    batch_uri: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, per_model: bool = True
) -> Path | str:
    """Write report.html for a batch folder (batch_state.json + runs/<name>/): one row per model and a
    small Pareto front per model. With `per_model`, each model's own report is written into its run
    directory and linked. A model whose run cannot be read gets its row with the reason, not an error.
    Returns the Path of the HTML file, or its URI (str) on an object store.
    """
    batch = RunDir(str(batch_uri))
    if batch.is_local and not (batch.local_path and batch.local_path.is_dir()):
        raise UserError(f"batch directory {batch.uri} does not exist")
    if not batch.exists(BATCH_STATE):
        raise UserError(f"no {BATCH_STATE} in {batch.uri}: not a heretic-dist batch directory")
    state = batch.read_json(BATCH_STATE)
    models = state.get("models") if isinstance(state, dict) else None
    if not isinstance(models, list):
        raise UserError(f"{BATCH_STATE} in {batch.uri} has no 'models' list")
    folder, name = _destination(batch, out, REPORT)
    stem = _stem(name)

    rows, figures, used = [], [], set()
    counts: dict[str, int] = {}
    for i, entry in enumerate(models):
        entry = entry if isinstance(entry, dict) else {}
        label = str(entry.get("name") or entry.get("model") or f"model {i + 1}")
        status = str(entry.get("status") or "unknown")
        counts[status] = counts.get(status, 0) + 1
        ref = str(entry.get("run_dir") or f"runs/{label}")
        notes = [_e(entry["reason"])] if entry.get("reason") else []
        run = None
        try:
            run = load_run(_join(batch, ref))
        except UserError as exc:
            missing = "does not exist" in str(exc) or f"no {TRIALS}" in str(exc)
            if status == "done" or not missing:  # a queued/running/failed model may have no trials yet
                notes.append(f"<span class=\"muted\">{_e(exc)}</span>")
        link = None
        img = ""
        if run is not None:
            if per_model:
                try:
                    link = _link(folder, write_report(run.uri))
                except UserError as exc:
                    notes.append(f"<span class=\"muted\">report: {_e(exc)}</span>")
            fig_name = f"{stem}-front-{_safe(label)}.png"
            while fig_name in used:
                fig_name = fig_name[:-4] + "_.png"
            used.add(fig_name)
            figures.append((fig_name, small_front_png(run)))
            img = f"<img src=\"{_e(fig_name)}\" alt=\"Pareto front of {_e(label)}\" width=\"340\">"
        title = _e(label) if link is None else f"<a href=\"{_e(link)}\">{_e(label)}</a>"
        model = _e(entry.get("model") or (run.model_name if run else "–"))
        status_html = f"<span class=\"bad\">{_e(status)}</span>" if status == "failed" else _e(status)
        rows.append([
            (title, False), (model, False), (status_html + ("<br>" + "<br>".join(notes) if notes else ""), False),
            (f"{run.base_refusals}/{run.n_bad}" if run and run.base_refusals is not None else "–", True),
            (_best_points(run) if run else "–", False),
            (f"{len(run.complete)} complete<br>{len(run.failed)} failed" if run else "–", True),
            (_duration(run.info.get("wall_seconds")) if run else "–", True),
            (img, False),
        ])
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    body = [f"<h1>heretic-dist batch: {len(models)} models</h1>",
            f"<p class=\"sub\"><code>{_e(batch.uri)}</code> · {_e(summary or 'no models')}</p>",
            _table(["name", "model", "status", "base refusals", f"best points (Pareto)", "trials", "wall time",
                    "Pareto front (refusals vs KL; ★ base model)"], rows)]
    for fig_name, data in figures:
        folder.write_bytes(fig_name, data)
    folder.write_bytes(name, _page("heretic-dist batch report", "\n".join(body)).encode())
    return _result(folder, name)


__all__ = ["write_report", "write_batch_report", "load_run", "pareto_front", "choose_trial", "RunData", "Trial"]
