"""The run directory: a local folder or an object-store prefix (s3://, gs://) through pyarrow.fs.

Everything the driver keeps across restarts lives here (see DESIGN.md, "The run, end to end"):
manifest.json, directions.safetensors + directions.sha256, study.journal, trials.parquet,
pareto.parquet, run_info.json, a lock and tune/. The rules this package enforces:

- Every write is atomic: readers and restarted drivers see the old file or the new one (rundir.py).
- Storage problems (unreachable endpoint, missing bucket, no credentials, permission denied, an
  unsupported scheme) become one-line UserErrors that never contain secret values (storage_errors.py).
- Optuna's JournalStorage needs a local file; remote run dirs keep a local cache of the journal,
  pulled on start and pushed after each trial; the remote copy is the truth (rundir.py).
- One driver per run directory; a remote lock that cannot be renewed stops the run (lock.py).

Modules: layout (file names), filesystem (URIs, S3/GCS), storage_errors, rundir (class RunDir),
parquet (rows ↔ Parquet), records (manifest, run_info, directions), lock (RunLock).
"""

from .filesystem import cache_key, cache_root, s3_used
from .layout import (
    DIRECTIONS,
    DIRECTIONS_SHA,
    EVALUATION,
    EVALUATION_BASE,
    EVALUATION_REPLIES,
    JOURNAL,
    JUDGEMENTS,
    LOCK,
    MANIFEST,
    PARETO,
    RUN_INFO,
    TRIALS,
    TUNE,
)
from .lock import RunLock, interrupt_main_thread
from .records import (
    load_directions,
    manifest_diff,
    manifest_hash,
    read_manifest,
    read_run_info,
    save_directions,
    write_run_info,
)
from .rundir import RunDir

__all__ = [
    "DIRECTIONS", "DIRECTIONS_SHA", "EVALUATION", "EVALUATION_BASE", "EVALUATION_REPLIES", "JOURNAL", "JUDGEMENTS", "LOCK", "MANIFEST",
    "PARETO", "RUN_INFO", "TRIALS", "TUNE",
    "RunDir", "RunLock", "cache_key", "cache_root", "interrupt_main_thread", "load_directions",
    "manifest_diff", "manifest_hash", "read_manifest", "read_run_info", "s3_used", "save_directions",
    "write_run_info",
]
