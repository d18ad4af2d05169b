"""The heretic-dist command line. Every user error ends as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

from .cli_options import ADDRESS_HELP, add_cluster_options
from .errors import UserError
from .display import print_evaluation, print_front, print_geometry, workers_line

if TYPE_CHECKING:
    from .config import Settings
    from .engine.types import Prompt

log = logging.getLogger("heretic_dist")

EXIT_USER_ERROR = 2


def _quiet_libraries() -> None:
    """Keep the terminal for our own messages: silence library chatter that users cannot act on."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. the one-time GGUF conversion bar
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")
    warnings.filterwarnings("ignore", message=".*kernels.*")


def _parse_set(values: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE (for example --set n_trials=20), got {item!r}")
        overrides[key.strip()] = value
    return overrides


def _settings(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Settings:
    from .config import load_settings

    overrides = _parse_set(getattr(args, "set", []))
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    return load_settings(args.config, overrides)


def load_prompt_sets(settings: Settings) -> dict[str, list[Prompt]]:
    """The four prompt sets, each checked (a missing or empty set is a UserError naming it)."""
    from .prompts import load_prompt_set

    return {
        name: load_prompt_set(getattr(settings, name), settings.system_prompt, label=name)
        for name in ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")
    }


# --- check ------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from .engine.protocol import engine_class

    settings = _settings(args, {"cluster.address": args.address})
    print(f"config: {args.config} is valid")
    sets = load_prompt_sets(settings)
    for name, prompts in sets.items():
        print(f"prompts: {name}: {len(prompts)} prompts")
    if settings.cluster.gpus_per_worker == "auto":  # an impossible plan stops here, with one line
        from .distributed.sizing import check_plan

        print(f"replicas: {check_plan(settings, args.gpus, [p for s in sets.values() for p in s])}")
    if args.no_model:
        return 0
    engine = engine_class(settings.engine)(settings)
    info = engine.info()
    print(f"model: {settings.model} loaded as {info['dtype']} on {info['device']} in {info['load_seconds']:.1f} s")
    print(f"model: {info['n_layers']} layers; components {', '.join(info['components'])}; "
          f"{info.get('modules', '?')} modules take LoRA adapters")
    from .engine.protocol import describe_edited

    for line in describe_edited(info.get("edited")):
        print(f"model: {line}")
    if info.get("unsupported") and not info.get("edited"):
        print(f"model: NOT edited (fused expert tensors): {'; '.join(info['unsupported'])}")
    print("check: ok")
    return 0


# --- evaluate ---------------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Refusals and KL of the configured model, or of another model measured against it."""
    from .engine.engine import Engine
    from .engine.scoring import kl_per_prompt
    from .engine.types import Shard

    settings = _settings(args)
    sets = load_prompt_sets(settings)
    engine = Engine(settings)
    if settings.response_prefix is None:
        engine.set_response_prefix(
            engine.detect_response_prefix(sets["good_prompts"][:100] + sets["bad_prompts"][:100]))
    prefix = engine.response_prefix
    engine.set_eval_prompts(sets["good_evaluation_prompts"], sets["bad_evaluation_prompts"])
    base = engine.run_trial(None, Shard())
    other = args.model or settings.evaluate_model
    rows = [(settings.model, base.refusals, base.bad_scored, 0.0)]
    if other:
        base_logprobs = engine.baseline(Shard())
        del engine
        other_settings = settings.model_copy(update={"model": other, "model_commit": None, "response_prefix": prefix})
        candidate = Engine(other_settings)
        candidate.set_eval_prompts(sets["good_evaluation_prompts"], sets["bad_evaluation_prompts"])
        kl = float(kl_per_prompt(base_logprobs, candidate.logprobs(sets["good_evaluation_prompts"])).mean())
        refusals = candidate.count_refusals(sets["bad_evaluation_prompts"])
        rows.append((other, refusals, len(sets["bad_evaluation_prompts"]), kl))
    print(f"response prefix: {prefix!r}")
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  refusals   KL divergence")
    for name, refusals, n, kl in rows:
        print(f"{name:<{width}}  {refusals:>3}/{n:<5}  {kl:.4f}")
    return 0


# --- run / status / export -------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .display import RunProgress
    from .distributed.driver import RunOptions, run

    cluster = {f"cluster.{k}": getattr(args, k) for k in ("address", "workers", "min_workers", "cpus_per_worker",
                                                          "gpus_per_worker", "shards_per_trial")}
    cluster["n_trials"] = args.n_trials
    settings = _settings(args, cluster)
    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
    if settings.print_residual_geometry or settings.plot_residuals:  # upstream's keys: research first
        from .research.run import ResearchOptions, research

        found = research(settings, ResearchOptions(run_dir=run_dir, geometry=settings.print_residual_geometry,
                                                   plots=settings.plot_residuals, sweep=False))
        if found.geometry:
            print_geometry(found.geometry)
        _copy_plots(run_dir, settings.residual_plot_path, found.written)
    with RunProgress() as display:
        outcome = run(settings, RunOptions(run_dir=run_dir, new_run=args.new_run, progress=display.line,
                                           on_trial=display.trial))
    print()
    print_front(outcome.pareto, outcome.info["base_refusals"], outcome.info["n_bad"], outcome.evaluation)
    print()
    if outcome.evaluation:
        print_evaluation(outcome.evaluation)
        print()
    print(f"{outcome.complete} complete, {outcome.failed} failed trials in the study; "
          f"{outcome.loads_total} model loads ({outcome.replacements} replacements); {outcome.seconds:.0f} s")
    if outcome.complete < settings.n_trials:
        # Tune stops its loop on SIGINT without raising: say so, and do not report success
        print(f"heretic-dist: stopped with {outcome.complete} of {settings.n_trials} complete trials; "
              "run the same command to resume", file=sys.stderr)
        return 1
    if outcome.pareto:
        print(f"export one: heretic-dist export {run_dir} --trial {outcome.pareto[0]['number']} --out DIR")
    return 0


def _open_run(run_uri: str):
    from .evaluation.front import open_run

    return open_run(run_uri, set_up=False)


def cmd_status(args: argparse.Namespace) -> int:
    from . import rundir as st
    from .search.front import pareto_front, trial_rows

    run, manifest, study = _open_run(args.run_dir)
    rows = trial_rows(study, manifest.get("n_bad_prompts", 0))
    counts = {state: sum(r["state"] == state for r in rows) for state in ("COMPLETE", "RUNNING", "FAIL")}
    info = st.read_run_info(run)
    n_trials = info.get("n_trials")
    print(f"run {manifest['run_id']}: model {manifest['model'].get('model', manifest['model'])}")
    print(f"trials: {counts['COMPLETE']} complete" + (f" of {n_trials}" if n_trials else "")
          + f", {counts['RUNNING']} running, {counts['FAIL']} failed")
    if "pool" in info:  # what the driver last recorded
        print(workers_line(info["pool"]))
    durations = [r["duration_s"] for r in rows if r["state"] == "COMPLETE" and r["duration_s"]]
    if durations:
        print(f"mean trial time: {sum(durations) / len(durations):.1f} s (per worker group)")
    from .evaluation.front import stored_rows
    from .evaluation.rows import evaluated_refusals

    evaluation = stored_rows(run)
    print_front(pareto_front(rows), manifest.get("base_refusals", "?"), manifest.get("n_bad_prompts", "?"), evaluation)
    base = next((r for r in evaluation if r["trial"] == -1), None)
    if base is not None:
        print(f"evaluation {base['eval_key']} ({len(evaluation) - 1} candidates): base model "
              f"{evaluated_refusals(base)} refusals; heretic-dist report {args.run_dir} shows every measure")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import rundir as st
    from .config import Settings
    from .search.space import decode_trial_params
    from .engine.engine import Engine
    from .engine.export import export_trial

    run, manifest, study = _open_run(args.run_dir)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(args.trial)
    if trial is None or trial.state.name != "COMPLETE":
        done = sorted(n for n, t in trials.items() if t.state.name == "COMPLETE")
        raise UserError(f"trial {args.trial} is not a complete trial of {args.run_dir}; "
                        f"complete trials: {', '.join(map(str, done[:30]))}{' ...' if len(done) > 30 else ''}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; export writes a folder: choose a folder path")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    settings = Settings(**manifest["settings"]).model_copy(
        update={"response_prefix": manifest["response_prefix"], "device_map": args.device_map})
    params = decode_trial_params(trial.params, manifest["n_layers"], settings.allow_mlp_off)
    engine = Engine(settings)
    engine.set_response_prefix(manifest["response_prefix"])
    directions, _, _ = st.load_directions(run)
    engine.set_directions(directions)
    record = {"number": trial.number, "params": trial.params, "decoded": params.to_dict(),
              "refusals": trial.user_attrs.get("refusals"), "n_bad_prompts": manifest.get("n_bad_prompts"),
              "base_refusals": manifest.get("base_refusals"), "kl": trial.user_attrs.get("kl"),
              "run_id": manifest["run_id"], "model": manifest["model"]}
    result = export_trial(engine, params, record, out, adapter=args.adapter, overwrite=args.overwrite)
    what = "merged model" if result.kind == "merged" else "PEFT adapter"
    print(f"exported trial {trial.number} as a {what} to {result.path} "
          f"(reloaded; max logit difference {result.max_abs_logit_diff:.1e})")
    return 0


def cmd_evaluate_front(args: argparse.Namespace) -> int:
    """Measure the front's candidates on held-out prompts with long replies and a judge."""
    from .evaluation.front import EvaluateOptions, evaluate_front

    trials = _trial_list(args.trials) if args.trials else None
    cluster = {"address": args.address, "workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
               "gpus_per_worker": args.gpus_per_worker}
    outcome = evaluate_front(EvaluateOptions(run_dir=args.run_dir, trials=trials, top=args.top, config=args.config,
                                             cluster=cluster, overrides=_parse_set(args.set),
                                             progress=lambda line: print(line, flush=True)))
    print()
    print_evaluation(outcome.rows)
    judged = outcome.judge_stats
    judge = f"{judged.get('items', 0)} replies judged"
    if judged.get("cache_hits"):
        judge += f", {judged['cache_hits']} verdicts from the cache"
    if judged.get("retries"):
        judge += f", {judged['retries']} retries"
    print(f"{len(outcome.evaluated)} measured now, {len(outcome.reused)} already in the run directory; "
          f"{judge}; {outcome.seconds:.0f} s")
    return 0


def _trial_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--trials {text!r}: give trial numbers separated by commas, e.g. --trials 12,40") from None


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_batch_report, write_report

    if args.batch:
        path = write_batch_report(args.run_dir, args.out)
    else:
        path = write_report(args.run_dir, args.out, trial=args.trial)
    print(f"report: {path}")
    return 0


# --- research -------------------------------------------------------------------------------------


def cmd_research(args: argparse.Namespace) -> int:
    """Residual geometry, PaCMAP plots and the direction sweep into RUN_DIR/research/."""
    from pathlib import Path

    from .research.run import ResearchOptions, research

    settings = _settings(args, {"cluster.address": args.address, "cluster.workers": args.workers})
    chosen = args.geometry or args.plots or args.sweep
    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
    outcome = research(settings, ResearchOptions(
        run_dir=run_dir, geometry=args.geometry or not chosen, plots=args.plots or not chosen,
        sweep=args.sweep or not chosen, seed_search=args.seed_search, progress=lambda line: print(line, flush=True)))
    if outcome.geometry:
        print_geometry(outcome.geometry)
    _copy_plots(run_dir, settings.residual_plot_path, outcome.written)
    print(f"report: {_research_report(run_dir)}")
    return 0


def _copy_plots(run_dir: str, folder: str | None, written: list[str]) -> None:
    if not folder:
        return
    from pathlib import Path

    from . import rundir as st

    run, out = st.RunDir(run_dir), Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name in written:
        if name.endswith((".png", ".gif")):
            (out / Path(name).name).write_bytes(run.read_bytes(name))


def _research_report(run_dir: str) -> Any:
    """report.html with its research section when the run has trials; research/report.html otherwise."""
    from . import rundir as st
    from .report import write_report
    from .report.html import write_research_report

    if st.RunDir(run_dir).exists(st.TRIALS):
        return write_report(run_dir)
    return write_research_report(run_dir)


# --- batch ----------------------------------------------------------------------------------------


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import BatchOptions, run_batch

    return run_batch(BatchOptions(manifest=args.manifest, batch_dir=args.batch_dir,
                                  parallel_models=args.parallel_models, address=args.address,
                                  retry_failed=args.retry_failed, say=lambda line: print(line, flush=True)))


def cmd_batch_status(args: argparse.Namespace) -> int:
    from .batch import print_status

    print_status(args.batch_dir)
    return 0


# --- entry point ------------------------------------------------------------------------------


def _add_result_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """batch, batch-status, status, export, evaluate-front, report: the commands over run directories."""
    p = add("batch", cmd_batch, "run or resume the search for many models from one manifest, on one cluster")
    p.add_argument("manifest", help="batch manifest TOML: [defaults] and [[models]] (see configs/batch-example.toml)")
    p.add_argument("--batch-dir", help="batch directory: a path, s3:// or gs:// (default batches/MANIFEST-NAME)")
    p.add_argument("--parallel-models", type=int, default=1, metavar="M",
                   help="models run at once, each on its own workers (default 1)")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--retry-failed", action="store_true", help="run failed models again")

    p = add("batch-status", cmd_batch_status, "per-model status and best points of a batch")
    p.add_argument("batch_dir", help="batch directory")

    p = add("status", cmd_status, "progress and Pareto front of a running or finished run")
    p.add_argument("run_dir", help="run directory")

    p = add("export", cmd_export, "save a trial as a merged model or a PEFT adapter")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--trial", type=int, required=True, help="trial number (see status)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--adapter", action="store_true", help="save a PEFT adapter instead of a merged model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--device-map", default="cpu", help="where to rebuild the model (default cpu)")

    p = add("evaluate-front", cmd_evaluate_front,
            "measure the front's candidates: held-out prompts, long replies, a judge, over-refusal, damage")
    p.add_argument("run_dir", help="run directory")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--trials", help="evaluate these trials, e.g. 12,40 (default: the Pareto front)")
    choice.add_argument("--top", type=int, help="evaluate the K front trials nearest the best point")
    p.add_argument("--config", help="evaluation config TOML (see configs/evaluation.toml), or a run config "
                                    "with an [evaluation] table")
    add_cluster_options(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting that changes no result, e.g. --set batch_size=8 (repeatable)")

    p = add("report", cmd_report, "write report.html (Pareto front, history, kernel) and PNGs")
    p.add_argument("run_dir", help="run directory (or batch directory with --batch)")
    p.add_argument("--out", help="folder or .html path (default: inside the run directory)")
    p.add_argument("--trial", type=int, help="trial whose layer kernel is drawn (default: a Pareto trial)")
    p.add_argument("--batch", action="store_true", help="RUN_DIR is a batch directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heretic-dist",
        description="Remove refusal behaviour from chat models by directional ablation, searched on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="TOML config file (see configs/default.toml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set n_trials=20 (repeatable)")

    p = add("check", cmd_check, "validate a config, its prompt sets and the model load")
    with_config(p)
    p.add_argument("--no-model", action="store_true", help="skip loading the model")
    p.add_argument("--gpus", type=int, help='gpus_per_worker = "auto": plan for a node of N GPUs (default: this one)')
    p.add_argument("--address", help='gpus_per_worker = "auto": plan for this running Ray cluster')

    p = add("evaluate", cmd_evaluate, "refusals and KL of the model, or of another model against it")
    with_config(p)
    p.add_argument("--model", help="another model (id, folder, .gguf) to score against the configured one")

    p = add("run", cmd_run, "run or resume the distributed search")
    with_config(p)
    p.add_argument("--run-dir", help="run directory: a path, file://, s3:// or gs:// (default runs/CONFIG-NAME)")
    add_cluster_options(p, elastic=True)
    p.add_argument("--shards-per-trial", type=int, help="workers per trial (prompt sharding)")
    p.add_argument("--n-trials", type=int, help="complete trials the study should reach")
    p.add_argument("--new-run", action="store_true",
                   help="the run directory holds a run with other settings: archive it and start fresh")

    p = add("research", cmd_research, "residual geometry, PaCMAP plots and the per-layer direction sweep")
    with_config(p)
    p.add_argument("--run-dir", help="run directory (default runs/CONFIG-NAME); results go to research/ in it")
    p.add_argument("--geometry", action="store_true", help="the geometry table per layer (numpy/torch only)")
    p.add_argument("--plots", action="store_true", help="PaCMAP plots per layer and the animation (research extra)")
    p.add_argument("--sweep", action="store_true", help="refusals and KL of each layer's direction alone")
    p.add_argument("--seed-search", type=int, default=0, metavar="N",
                   help="enqueue the N best sweep trials as the next trials of the run's search")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--workers", type=int, help="model workers (each loads the model once)")

    _add_result_commands(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    from .display import filter_ray_errors

    filter_ray_errors()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s" if args.verbose else "%(message)s")
    for noisy in ("transformers", "accelerate", "peft", "datasets", "huggingface_hub", "ray", "filelock",
                  "urllib3", "httpx", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        code = args.func(args)
    except UserError as error:
        print(f"heretic-dist: error: {error}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("heretic-dist: interrupted; run the same command again to resume", file=sys.stderr)
        code = 130
    return code



if __name__ == "__main__":
    from heretic_dist.__main__ import main as entry_point

    sys.exit(entry_point())
