"""What a batch has done: one summary row per model, batch_summary.parquet, and the batch-status table.

The Pareto front and the best point come from `heretic_dist.search.front`, the one definition every
command uses, so `batch-status` suggests the same trial as `status` and the report.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from dataclasses import dataclass
from typing import IO, Any, Callable, TypeVar

from .. import rundir as st
from ..display import print_table, table_text
from ..errors import UserError
from ..search.front import KL_THRESHOLD, Point, best_point, pareto_front
from .plan import STATE, STATUSES, read_state, run_uri

SUMMARY = "batch_summary.parquet"

F = TypeVar("F", bound=Callable[..., Any])


def drops_filesystems(func: F) -> F:
    """Collect reference cycles before returning, so no pyarrow S3FileSystem outlives the call: with
    pyarrow 26, one still alive at interpreter exit after a Parquet read aborts the process
    ("terminate called without an active exception", exit 134) after all the work is done."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        finally:
            gc.collect()

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Summary rows


def _summary_point(point: dict[str, Any]) -> Point:
    """A summary's Pareto point {trial, refusals, kl} as search.front's (refusals, KL, number)."""
    return point["refusals"], point["kl"], point["trial"]


def best_summary_point(pareto: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The point to suggest among a summary row's Pareto points (search.front's best-point rule)."""
    return best_point(pareto or [], point=_summary_point)


def model_summary(batch: st.RunDir, entry: dict[str, Any]) -> dict[str, Any]:
    """One batch_summary row, from the model's run directory (whatever it holds so far)."""
    row: dict[str, Any] = {"name": entry["name"], "model": entry.get("model"), "status": entry.get("status"),
                           "reason": entry.get("reason"), "base_refusals": None, "n_bad": None,
                           "n_trials": None, "complete_trials": None, "failed_trials": None, "pareto": [],
                           "wall_seconds": float(entry.get("wall_seconds") or 0.0), "gpu_hours": None,
                           "run_dir": entry.get("run_dir")}
    try:
        run = st.RunDir(run_uri(batch, str(entry.get("run_dir") or f"runs/{entry['name']}")))
        if run.exists(st.MANIFEST):
            manifest = run.read_json(st.MANIFEST)
            row["base_refusals"] = manifest.get("base_refusals")
            row["n_bad"] = manifest.get("n_bad_prompts")
        if run.exists(st.TRIALS):
            rows = run.read_parquet(st.TRIALS)
            row["complete_trials"] = sum(r.get("state") == "COMPLETE" for r in rows)
            row["failed_trials"] = sum(r.get("state") == "FAIL" for r in rows)
            row["pareto"] = [{"trial": r["number"], "refusals": r["refusals"], "kl": r["kl"]}
                             for r in pareto_front(rows)]
        info = st.read_run_info(run)
        if info:
            row["n_trials"] = info.get("n_trials")
            row["gpu_hours"] = (float(info.get("worker_seconds") or 0.0) * float(info.get("gpus_per_worker") or 0.0)
                                * float(info.get("tensor_parallel") or 1) / 3600)
    except (UserError, OSError, ValueError) as error:  # a summary never stops the batch
        row["summary_error"] = str(error).splitlines()[0] if str(error) else type(error).__name__
    return row


def _summary_schema() -> Any:
    import pyarrow as pa

    point = pa.struct([("trial", pa.int64()), ("refusals", pa.int64()), ("kl", pa.float64())])
    return pa.schema([("name", pa.string()), ("model", pa.string()), ("status", pa.string()),
                      ("reason", pa.string()), ("base_refusals", pa.int64()), ("n_bad", pa.int64()),
                      ("n_trials", pa.int64()), ("complete_trials", pa.int64()), ("failed_trials", pa.int64()),
                      ("pareto", pa.list_(point)), ("wall_seconds", pa.float64()), ("gpu_hours", pa.float64()),
                      ("run_dir", pa.string()), ("summary_error", pa.string())])


def write_summary(batch: st.RunDir, rows: list[dict[str, Any]]) -> None:
    """batch_summary.parquet with real columns (pareto is a list of {trial, refusals, kl} structs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_summary_schema())
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    batch.write_bytes(SUMMARY, sink.getvalue().to_pybytes())


def read_summary(batch: st.RunDir) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(batch.read_bytes(SUMMARY))).to_pylist()


# --------------------------------------------------------------------------------------------------
# batch-status


@dataclass
class BatchStatus:
    """The batch-status table: one row per model, each model's Pareto front, a closing line with the counts."""

    columns: list[str]
    rows: list[list[str]]
    fronts: list[str]  # "<name> front: #3 4/20 at KL 0.0123, #7 ...", for models with a front
    footer: str

    def text_after_table(self) -> str:
        return "\n" + "".join(line + "\n" for line in self.fronts) + self.footer


COLUMNS = ["model", "status", "base", f"best (KL<={KL_THRESHOLD:g} or lowest KL)", "trials", "wall", "reason"]


@drops_filesystems
def batch_status(batch_dir: str) -> BatchStatus:
    """The state of a batch, from batch_state.json and batch_summary.parquet (models without a summary
    row yet, and running ones, are read from their run directories)."""
    batch = st.RunDir(batch_dir)
    batch.check_access(write=False)
    if batch.is_local and not (batch.local_path and batch.local_path.is_dir()):
        raise UserError(f"batch directory {batch.uri} does not exist")
    state = read_state(batch)
    if state is None:
        raise UserError(f"no {STATE} in {batch.uri}: not a heretic-dist batch directory")
    summary: dict[str, dict[str, Any]] = {}
    if batch.exists(SUMMARY):
        with contextlib.suppress(UserError, OSError, ValueError):
            summary = {r["name"]: r for r in read_summary(batch)}
    rows: list[list[str]] = []
    fronts: list[str] = []
    counts: dict[str, int] = {}
    for entry in state["models"]:
        status = str(entry.get("status"))
        counts[status] = counts.get(status, 0) + 1
        row = summary.get(entry["name"])
        if row is None or status == "running":
            row = model_summary(batch, entry)
        rows.append(_status_cells(entry, status, row))
        if row.get("pareto"):
            points = ", ".join(_point_text(p, row.get("n_bad")) for p in row["pareto"])
            fronts.append(f"{entry['name']} front: {points}")
    footer = (f"{batch.uri}: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts.get(s))
              + f"; updated {state.get('updated', '?')}")
    return BatchStatus(list(COLUMNS), rows, fronts, footer)


def _point_text(point: dict[str, Any], n_bad: Any) -> str:
    return f"#{point['trial']} {point['refusals']}/{n_bad} at KL {point['kl']:.4f}"


def _status_cells(entry: dict[str, Any], status: str, row: dict[str, Any]) -> list[str]:
    n_bad = row.get("n_bad")
    base = f"{row['base_refusals']}/{n_bad}" if row.get("base_refusals") is not None else "-"
    best = best_summary_point(row.get("pareto"))
    best_text = f"{best['refusals']}/{n_bad} at KL {best['kl']:.4f} (#{best['trial']})" if best else "-"
    trials = "-"
    if row.get("complete_trials") is not None:
        failed = row.get("failed_trials")
        trials = f"{row['complete_trials']}" + (f" (+{failed} failed)" if failed else "")
    return [entry["name"], status, base, best_text, trials, format_duration(entry.get("wall_seconds")),
            str(entry.get("reason") or "")]


def status_table(batch_dir: str) -> str:
    """The batch-status table as plain aligned text (logs, tests, pipes)."""
    status = batch_status(batch_dir)
    return table_text(None, status.columns, status.rows) + "\n" + status.text_after_table()


def print_status(batch_dir: str, stream: IO[str] | None = None) -> None:
    """The batch-status table on `stream`: a rich table on a terminal, `status_table`'s text otherwise."""
    status = batch_status(batch_dir)
    print_table(None, status.columns, status.rows, stream=stream)
    print(status.text_after_table(), file=stream, flush=True)


def format_duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
