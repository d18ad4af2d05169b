"""report.html for a run and for a batch: Jinja2 templates (templates/, autoescaped) over RunData.

The Python side decides what is shown (which trial, which numbers, formatted); the templates decide
the markup. Pages reference their PNGs by relative path and load nothing from the network (no
scripts, no remote fonts, no CSS files), so a report folder can be copied anywhere.
"""

from __future__ import annotations

import datetime as _dt
import os
import posixpath
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from heretic_dist import __version__
from heretic_dist.engine.protocol import describe_edited
from heretic_dist.errors import UserError
from heretic_dist.report import figures
from heretic_dist.report.data import RunData, Trial, choose_trial, finite, load_run
from heretic_dist.rundir import TRIALS, RunDir
from heretic_dist.search.front import KL_THRESHOLD

BATCH_STATE = "batch_state.json"
REPORT = "report.html"
# Per-component columns of the front table and their number formats (weights vs layer positions).
COMPONENT_COLUMNS = {"max_weight": ".3f", "max_weight_position": ".2f", "min_weight": ".3f",
                     "min_weight_distance": ".2f"}
# Settings shown in the facts table; the rest is under "all result-affecting settings".
KEY_SETTINGS = ("n_startup_trials", "seed", "row_normalization", "dtype", "dtypes", "quantization",
                "max_response_length", "kl_divergence_target", "kl_divergence_scale", "allow_mlp_off",
                "orthogonalize_direction", "winsorization_quantile")


def fmt(value: Any, spec: str = ".3g") -> str:
    v = finite(value)
    return "–" if v is None else format(v, spec)


def duration(seconds: Any) -> str:
    s = finite(seconds)
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def dash(value: Any) -> Any:
    return "–" if value is None or value == "" else value


@lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("heretic_dist.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2")),
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the test run, not the page
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(fmt=fmt, duration=duration, dash=dash)
    env.globals.update(KL_THRESHOLD=KL_THRESHOLD, version=__version__)
    return env


def _render(template: str, **context: Any) -> bytes:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return _templates().get_template(template).render(generated=now, **context).encode()


# --------------------------------------------------------------------------------------------------
# Run report


@dataclass
class FrontRow:
    """One Pareto trial as table cells."""

    trial: Trial
    chosen: bool
    refused: str
    components: list[list[str]]  # per component: COMPONENT_COLUMNS, formatted


def _front_rows(run: RunData, components: list[str], chosen: Trial | None) -> list[FrontRow]:
    rows = []
    for t in run.pareto:
        params = (t.decoded or {}).get("components") or {}
        rows.append(FrontRow(
            trial=t,
            chosen=chosen is not None and t.number == chosen.number,
            refused=f"{t.refusals / t.n_bad:.0%}" if t.n_bad else "–",
            components=[[fmt((params.get(c) or {}).get(key), spec) for key, spec in COMPONENT_COLUMNS.items()]
                        for c in components],
        ))
    return rows


def _component_names(trials: list[Trial]) -> list[str]:
    names: list[str] = []
    for t in trials:
        for name in ((t.decoded or {}).get("components") or {}):
            if name not in names:
                names.append(name)
    return names


def _work(run: RunData) -> dict[str, Any]:
    """Worker time and GPU-hours; without run_info the sum of trial durations is a lower bound."""
    info = run.info
    seconds = finite(info.get("worker_seconds"))
    measured = seconds is not None
    if seconds is None:
        seconds = sum(t.duration_s or 0.0 for t in run.trials) or None
    gpus = finite(info.get("gpus_per_worker"))
    gpus = gpus * (finite(info.get("tensor_parallel")) or 1.0) if gpus else gpus  # per replica
    durations = sorted(t.duration_s for t in run.complete if t.duration_s is not None)
    return {
        "worker_seconds": seconds,
        "measured": measured,
        "gpu_hours": seconds * gpus / 3600 if seconds is not None and gpus else None,
        "median_trial_s": durations[len(durations) // 2] if durations else None,
    }


def _chosen_how(chosen: Trial | None, picked: bool) -> str:
    if chosen is None:
        return ""
    if picked:
        return "chosen"
    if chosen.kl is not None and chosen.kl <= KL_THRESHOLD:
        return f"fewest refusals at KL ≤ {KL_THRESHOLD}"
    return f"no Pareto trial has KL ≤ {KL_THRESHOLD}: the one with the lowest KL"


def write_report(
    run_uri: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, trial: int | None = None
) -> Path | str:
    """Write report.html and its PNGs into the run directory (or `out`: a folder, or a .html path).

    `trial` picks the trial whose layer weights are drawn (default: the run's best point). Returns the
    Path of the HTML file, or its URI (str) when it was written to an object store.
    """
    run = load_run(run_uri)
    folder, name = _destination(RunDir(run.uri), out, REPORT)
    chosen = choose_trial(run, trial)
    stem = _stem(name)
    pngs = {"pareto": f"{stem}-pareto.png", "history": f"{stem}-history.png"}
    data = {"pareto": figures.pareto_png(run, chosen), "history": figures.history_png(run)}
    if chosen is not None and chosen.decoded:
        pngs["kernel"] = f"{stem}-kernel.png"
        data["kernel"] = figures.kernel_png(run, chosen)
    evaluation, evaluation_png = evaluation_context(RunDir(run.uri), f"{stem}-evaluation.png")
    if evaluation_png is not None:
        pngs["evaluation"] = evaluation["png"]
        data["evaluation"] = evaluation_png
    components = _component_names(run.pareto)
    settings = run.manifest.get("settings") or {}
    page = _render(
        "run.html.j2", run=run, m=run.manifest, info=run.info, settings=settings, pngs=pngs,
        chosen=chosen, chosen_how=_chosen_how(chosen, trial is not None), components=components,
        component_columns=list(COMPONENT_COLUMNS), front_rows=_front_rows(run, components, chosen), work=_work(run),
        key_settings=[(k, settings[k]) for k in KEY_SETTINGS if k in settings],
        edited_lines=describe_edited(run.manifest.get("edited")),
        research=research_context(RunDir(run.uri), folder), evaluation=evaluation,
    )
    for key, png in data.items():
        folder.write_bytes(pngs[key], png)
    folder.write_bytes(name, page)
    return _result(folder, name)


def evaluation_context(run: RunDir, png: str) -> tuple[dict[str, Any] | None, bytes | None]:
    """What the evaluation section shows, and its PNG; (None, None) when the run has no evaluation."""
    from heretic_dist.evaluation.front import stored_rows
    from heretic_dist.evaluation.rows import table_cells

    rows = stored_rows(run)
    if not rows:
        return None, None
    headers, cells = table_cells(rows)
    first = rows[0]
    context = {"headers": headers, "cells": cells, "judge": first.get("judge"), "key": first.get("eval_key"),
               "max_response_length": first.get("max_response_length"), "kl_tokens": first.get("kl_tokens"),
               "held_out": bool(first.get("harmful_held_out")), "png": png}
    return context, figures.evaluation_png(rows)


# --------------------------------------------------------------------------------------------------
# Research section (research/ in the run directory)

RESEARCH = "research"


def research_context(run: RunDir, folder: RunDir) -> dict[str, Any] | None:
    """What the research section shows; None when the run directory has no research results."""
    from heretic_dist.research.geometry import COLUMNS

    names = {"geometry": f"{RESEARCH}/geometry.parquet", "sweep": f"{RESEARCH}/sweep.parquet"}
    pngs = {"geometry_png": f"{RESEARCH}/geometry.png", "sweep_png": f"{RESEARCH}/sweep.png",
            "animation": f"{RESEARCH}/animation.gif"}
    if not any(run.exists(n) for n in (*names.values(), pngs["animation"])):
        return None
    base = "" if folder.uri == run.uri else f"{run.uri.rstrip('/')}/"  # links work when written beside research/
    out: dict[str, Any] = {"columns": list(COLUMNS)}
    for key, name in names.items():
        out[key] = run.read_parquet(name) if run.exists(name) else []
    for key, name in pngs.items():
        out[key] = base + name if run.exists(name) else None
    out["layers"] = [base + f"{RESEARCH}/layer_{r:03d}.png" for r in range(len(out["geometry"]))
                     if run.exists(f"{RESEARCH}/layer_{r:03d}.png")]
    return out


def write_research_report(run_uri: str | os.PathLike[str]) -> Path | str:
    """research/report.html on its own, for a run directory that has research results but no trials."""
    run = RunDir(str(run_uri))
    folder = RunDir(f"{run.uri.rstrip('/')}/{RESEARCH}") if "://" in run.uri else RunDir(str(Path(str(run_uri)) / RESEARCH))
    context = research_context(run, run)
    if context is None:
        raise UserError(f"{run.uri} has no research results (run heretic-dist research)")
    for key in ("geometry_png", "sweep_png", "animation"):  # the page sits inside research/
        if context[key]:
            context[key] = context[key].split("/", 1)[1]
    context["layers"] = [p.split("/", 1)[1] for p in context["layers"]]
    manifest = run.read_json("manifest.json") if run.exists("manifest.json") else {}
    model = (manifest.get("model") or {}).get("model", "") if isinstance(manifest.get("model"), dict) else ""
    page = _render("research.html.j2", research=context, model=model or run.uri, uri=run.uri)
    folder.write_bytes("report.html", page)
    return _result(folder, "report.html")


# --------------------------------------------------------------------------------------------------
# Batch report


@dataclass
class BatchRow:
    """One model of a batch as table cells; `run` is None when its run directory cannot be read."""

    label: str
    model: str
    status: str
    run: RunData | None = None
    link: str | None = None
    png: str | None = None
    reason: str | None = None  # the batch's own reason (why a model failed)
    problems: list[str] = field(default_factory=list)  # what the report could not read or write
    best: list[str] = field(default_factory=list)


def best_points(run: RunData) -> list[str]:
    """The best point (search/front.py's rule), and the fewest-refusals point when it differs."""
    best = run.best
    if best is None:
        return []
    kind = f"KL ≤ {KL_THRESHOLD}" if best.kl <= KL_THRESHOLD else f"none at KL ≤ {KL_THRESHOLD}, lowest KL"
    lines = [f"{kind}: {best.refusals}/{best.n_bad} at KL {best.kl:.3g} (#{best.number})"]
    fewest = run.pareto[0]  # the front is sorted by refusals
    if fewest is not best:
        lines.append(f"fewest: {fewest.refusals}/{fewest.n_bad} at KL {fewest.kl:.3g} (#{fewest.number})")
    return lines


def _batch_row(batch: RunDir, folder: RunDir, index: int, entry: Any, per_model: bool) -> BatchRow:
    entry = entry if isinstance(entry, dict) else {}
    label = str(entry.get("name") or entry.get("model") or f"model {index + 1}")
    row = BatchRow(label=label, model=str(entry.get("model") or "–"), status=str(entry.get("status") or "unknown"),
                   reason=str(entry["reason"]) if entry.get("reason") else None)
    try:
        row.run = load_run(_join(batch, str(entry.get("run_dir") or f"runs/{label}")))
    except UserError as exc:
        missing = "does not exist" in str(exc) or f"no {TRIALS}" in str(exc)
        if row.status == "done" or not missing:  # a queued/running/failed model may have no trials yet
            row.problems.append(str(exc))
        return row
    if not entry.get("model"):
        row.model = row.run.model_name
    row.best = best_points(row.run)
    if per_model:
        try:
            row.link = _link(folder, write_report(row.run.uri))
        except UserError as exc:
            row.problems.append(f"report: {exc}")
    return row


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
    rows = [_batch_row(batch, folder, i, entry, per_model) for i, entry in enumerate(models)]
    pngs: dict[str, bytes] = {}
    for row in rows:
        if row.run is not None:
            row.png = f"{_stem(name)}-front-{_safe(row.label)}.png"
            while row.png in pngs:  # two labels that sanitize alike
                row.png = row.png[:-4] + "_.png"
            pngs[row.png] = figures.small_front_png(row.run)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    page = _render("batch.html.j2", batch=batch, rows=rows, summary=summary)
    for png_name, png in pngs.items():
        folder.write_bytes(png_name, png)
    folder.write_bytes(name, page)
    return _result(folder, name)


# --------------------------------------------------------------------------------------------------
# Where files go, and links between them


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
