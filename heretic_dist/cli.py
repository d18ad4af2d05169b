"""The heretic-dist command line. Every user error ends as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

from .errors import UserError

log = logging.getLogger("heretic_dist")

EXIT_USER_ERROR = 2


def _quiet_libraries() -> None:
    """Keep the terminal for our own messages: silence library chatter that users cannot act on."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
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


def _settings(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    from .config import load_settings

    overrides = _parse_set(getattr(args, "set", []))
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    return load_settings(args.config, overrides)


def load_prompt_sets(settings) -> dict[str, list]:
    """The four prompt sets, each checked (a missing or empty set is a UserError naming it)."""
    from .prompts import load_prompt_set

    return {
        name: load_prompt_set(getattr(settings, name), settings.system_prompt, label=name)
        for name in ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")
    }


# --- check ------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from .engine.engine import Engine

    settings = _settings(args)
    print(f"config: {args.config} is valid")
    sets = load_prompt_sets(settings)
    for name, prompts in sets.items():
        print(f"prompts: {name}: {len(prompts)} prompts")
    if args.no_model:
        return 0
    engine = Engine(settings)
    info = engine.info()
    print(f"model: {settings.model} loaded as {info['dtype']} on {info['device']} in {info['load_seconds']:.1f} s")
    print(f"model: {info['n_layers']} layers; components {', '.join(info['components'])}; "
          f"{info['modules']} modules take LoRA adapters")
    if info["unsupported"]:
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


# --- entry point ------------------------------------------------------------------------------


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

    p = add("evaluate", cmd_evaluate, "refusals and KL of the model, or of another model against it")
    with_config(p)
    p.add_argument("--model", help="another model (id, folder, .gguf) to score against the configured one")

    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s" if args.verbose else "%(message)s")
    for noisy in ("transformers", "accelerate", "peft", "datasets", "huggingface_hub", "ray", "filelock",
                  "urllib3", "httpx", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except UserError as error:
        print(f"heretic-dist: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("heretic-dist: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
