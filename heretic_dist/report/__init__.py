"""HTML reports of a run (and of a batch of runs), readable offline.

`write_report(run_uri)` reads the files the driver leaves in a run directory (manifest.json,
run_info.json, trials.parquet) and writes `report.html` plus its PNG figures beside it:

- `report-pareto.png`   raw refusals vs KL divergence: every complete trial, the Pareto front as a
                         step line, the base model (KL = 0) marked;
- `report-history.png`  refusals, KL and the running Pareto-front size over trial numbers;
- `report-kernel.png`   the per-layer ablation weights of one chosen Pareto trial.

`write_batch_report(batch_uri)` writes one page for a batch of models (batch_state.json): a row
per model with its status, base refusals, best points, trial counts and wall time, a small front
per model, and a link to each model's own report (written too unless `per_model=False`).

Modules: `data` (the run directory read into RunData), `figures` (matplotlib PNGs), `html` (Jinja2
templates in templates/). The front and the best point are those of `heretic_dist.search.front`.
Nothing here imports torch or Ray.
"""

from heretic_dist.report.data import RunData, Trial, choose_trial, load_run, pareto_front
from heretic_dist.report.html import write_batch_report, write_report

__all__ = ["write_report", "write_batch_report", "load_run", "pareto_front", "choose_trial", "RunData", "Trial"]
