"""Names of the files in a run directory (DESIGN.md, "The run, end to end")."""

MANIFEST = "manifest.json"  # what the run is; its hash is the run id
DIRECTIONS = "directions.safetensors"  # refusal directions, computed once per run
DIRECTIONS_SHA = "directions.sha256"  # sha256sum -c format, proves a resume reuses the same directions
JOURNAL = "study.journal"  # the Optuna study (JournalStorage), the source of truth
TRIALS = "trials.parquet"  # one row per trial
PARETO = "pareto.parquet"  # the rows of trials.parquet on the Pareto front
RUN_INFO = "run_info.json"  # wall time, workers, loads, hosts: summed over the driver's sessions
LOCK = ".lock"  # flock file (local) or owner file with a heartbeat (object stores)
TUNE = "tune"  # Ray Tune experiment state (a folder)
EVALUATION = "evaluation.parquet"  # evaluate-front: one row per (evaluation config, candidate)
EVALUATION_BASE = "evaluation/base.parquet"  # the unedited model's row per evaluation config
EVALUATION_REPLIES = "evaluation/replies.parquet"  # the judged replies behind those rows
JUDGEMENTS = "evaluation/judgements.jsonl"  # the judges' verdicts, cached so a resume does not pay twice
