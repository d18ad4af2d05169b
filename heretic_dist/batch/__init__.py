"""Batch: many models from one manifest, on one Ray cluster, one `heretic-dist run` child per model.

A manifest (TOML) holds `[defaults]` (any settings keys, tables included) and `[[models]]` entries,
each with a `name` (a safe folder name; derived from `model` when left out), a `model` and any
per-model overrides (flat keys, dotted keys or tables; tables are merged key by key over the
defaults). Everything is validated up front with the config machinery, before anything is written.

The batch directory (local path, s3:// or gs://, through storage.RunDir):

    batch_state.json        what each model is doing: queued | running | done | failed (+ reason),
                            written atomically on every change; the source of truth for resume
    batch_summary.parquet   one row per model: base refusals, trials, raw Pareto points, time, GPU-hours
    batch.log               the batch's own lines (state changes)
    configs/<name>.toml     the resolved settings each model ran with (Settings.to_toml())
    logs/<name>.log         each child's output (remote batch dirs: written locally, uploaded per model)
    runs/<name>/            each model's run directory (the driver's, so `status`/`export`/`report` work)

Execution: the batch process starts (or joins) ONE Ray cluster and runs
`python -m heretic_dist --child PID run configs/<name>.toml --run-dir runs/<name> --address <cluster>`
for each model (`--child` makes the child die with the batch), one after another or up to
`--parallel-models` at once; each child's workers are Ray actors with their own CPU/GPU reservations,
so parallel children use disjoint worker groups. A child that fails marks its model failed and the
batch goes on. Running the same command again skips done models, resumes the running one (its run
directory resumes its study) and retries queued ones; failed ones only with `--retry-failed`.

- plan.py    the manifest (ModelSpec, Manifest, load_manifest), check_fit, batch_state.json, the plan
- runner.py  run_batch: the cluster, the child processes, signals, logs
- status.py  summary rows, batch_summary.parquet, the batch-status table
"""

from .plan import STATE, STATUSES, Manifest, ModelSpec, check_fit, derive_name, load_manifest, read_state, run_uri
from .runner import BATCH_LOG, EXIT_FAILED, BatchOptions, run_batch
from .status import (SUMMARY, BatchStatus, batch_status, model_summary, print_status, read_summary, status_table,
                     write_summary)

__all__ = [
    "BATCH_LOG",
    "EXIT_FAILED",
    "STATE",
    "STATUSES",
    "SUMMARY",
    "BatchOptions",
    "BatchStatus",
    "Manifest",
    "ModelSpec",
    "batch_status",
    "check_fit",
    "derive_name",
    "load_manifest",
    "model_summary",
    "print_status",
    "read_state",
    "read_summary",
    "run_batch",
    "run_uri",
    "status_table",
    "write_summary",
]
