"""The GPU check's CPU self-check (gpu_check_steps.py `dry`), run by `scripts/gpu_check.sh --dry-run`.

It hides every installed distribution that is neither on the GPU image nor in the wheel list
(gpu_check_wheels.py), the way a missing package is missing: `import` fails and
`importlib.util.find_spec` answers None. Then it runs the same step functions the GPU run uses, on a
tiny random model on CPU for a few tokens, and lists which distributions the path imported. A module
the path needs that the GPU image would lack fails here, with its name.
"""

from __future__ import annotations

import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path

from gpu_check_wheels import PRESENT_ON_IMAGE, WHEELS, allowed_dists, check_folder, normalize, requirements

REPO = Path(__file__).resolve().parents[1]
PROJECT = "heretic-dist"  # the repository itself travels


def _hide(hidden: set[str]) -> None:
    """Make the hidden names absent (top-level names, and `top.sub` inside a namespace package): `import`
    fails, and importlib.util.find_spec (transformers' availability checks) answers None. Each real
    meta-path finder is wrapped to answer None for them."""

    class Hiding:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in hidden or ".".join(name.split(".")[:2]) in hidden:
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None

        def find_distributions(self, *args, **kwargs):  # importlib.metadata asks the finders too
            find = getattr(self.inner, "find_distributions", None)
            return find(*args, **kwargs) if find else iter(())

        def invalidate_caches(self):
            if hasattr(self.inner, "invalidate_caches"):
                self.inner.invalidate_caches()

    sys.meta_path[:] = [Hiding(f) for f in sys.meta_path]


def with_dependencies(names: set[str]) -> set[str]:
    """`names` and, transitively, the installed distributions they require (extras left out): the
    local versions of the image's packages may need other helpers than the image's versions do, and
    those come with the image's own versions there."""
    from packaging.requirements import Requirement

    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalize(req.name))
    return seen


def allowed_here() -> set[str]:
    """What the 1-GPU steps may import: the image's packages (with what their local versions require),
    the wheel list less the T = 2 wheels, the project."""
    allowed = allowed_dists() | {PROJECT} | with_dependencies(set(PRESENT_ON_IMAGE))
    return allowed - {normalize(w.dist) for w in WHEELS if w.tp_only}


def install_hider(allowed: set[str]) -> list[str]:
    """Hide the top-level modules of every installed distribution outside `allowed`, and inside a
    namespace package shared with an allowed one (`google`: protobuf) the subpackages of the others
    (google.auth, google.api_core: what ray[default]'s opencensus brings)."""
    by_module = importlib.metadata.packages_distributions()
    hidden = set()
    for module, dists in by_module.items():
        if module in sys.modules or module in sys.stdlib_module_names:
            continue
        if not {normalize(d) for d in dists} & allowed:
            hidden.add(module)
    _, subpackages = namespace_files(shared_top_levels(by_module))
    hidden |= {sub for sub, dists in subpackages.items()
               if sub.partition(".")[0] not in hidden and sub not in sys.modules and not dists & allowed}
    _hide(hidden)
    return sorted(hidden)


def shared_top_levels(by_module: dict[str, list[str]]) -> dict[str, set[str]]:
    """Top-level names that several distributions install into, with those distributions: namespace
    packages (`google`: protobuf, google-auth, googleapis-common-protos, ...; `opentelemetry`)."""
    shared = {top: {normalize(d) for d in dists} for top, dists in by_module.items()}
    return {top: dists for top, dists in shared.items() if len(dists) > 1}


def namespace_files(shared: dict[str, set[str]]) -> tuple[dict[str, str], dict[str, set[str]]]:
    """For the names in `shared`, from the distributions' file lists: resolved file -> its distribution,
    and `top.sub` -> the distributions that install it. The name `google` says nothing about who
    installed a module imported from it: google.protobuf is protobuf's, google.auth google-auth's."""
    wanted = set().union(*shared.values()) if shared else set()
    files: dict[str, str] = {}
    subpackages: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        name = normalize(dist.metadata["Name"] or "")
        if name not in wanted:
            continue
        for file in dist.files or ():
            parts = file.parts
            if len(parts) < 2 or name not in shared.get(parts[0], ()):
                continue
            files[str(Path(dist.locate_file(file)).resolve())] = name
            sub = parts[1].split(".")[0]
            if sub not in ("", "__init__", "__pycache__"):
                subpackages.setdefault(f"{parts[0]}.{sub}", set()).add(name)
    return files, subpackages


def _shared_owners(module, files: dict[str, str], dists: set[str]) -> set[str]:
    """The distribution of a module under a shared top-level name, by its file; none for the namespace
    itself (no file, nothing installed it); all of `dists` for a file that no file list names."""
    file = getattr(module, "__file__", None)
    if not file:
        return set()
    owner = files.get(str(Path(file).resolve()))
    return {owner} if owner else dists


def imported_distributions() -> dict[str, list[str]]:
    """The distributions behind the top-level modules imported so far (inside a namespace package, by
    each imported module's file); modules of none: 'stdlib', 'repository' (heretic_dist, scripts,
    tests) or 'unknown'."""
    by_module = importlib.metadata.packages_distributions()
    shared = shared_top_levels(by_module)
    files, _ = namespace_files(shared)
    found: dict[str, set[str]] = {}
    for name, module in list(sys.modules.items()):
        if module is None:
            continue
        top = name.partition(".")[0]
        if top in shared:
            for d in _shared_owners(module, files, shared[top]):
                found.setdefault(d, set()).add(".".join(name.split(".")[:2]))
            continue
        if "." in name:
            continue
        dists = by_module.get(name)
        if dists:
            for d in dists:
                found.setdefault(normalize(d), set()).add(name)
            continue
        file = getattr(module, "__file__", None) or ""
        owner = _site_packages_owner(file, by_module)
        if owner:  # an extension module registered under a short name (scipy's Cython helpers, ...)
            found.setdefault(normalize(owner), set()).add(name)
            continue
        kind = ("stdlib" if name in sys.stdlib_module_names or name in sys.builtin_module_names
                else "no file" if not file  # built-in or made at run time (cython_runtime, ...)
                else "repository" if Path(file).resolve().is_relative_to(REPO)
                else "stdlib" if file.startswith(sys.base_prefix) and "site-packages" not in file
                else "unknown")
        found.setdefault(kind, set()).add(name)
    return {k: sorted(v) for k, v in sorted(found.items())}


def _site_packages_owner(file: str, by_module: dict[str, list[str]]) -> str | None:
    """The distribution whose folder in site-packages holds `file` ("heretic-dist" for the editable
    install's finder module), or None."""
    parts = Path(file).parts
    if "site-packages" not in parts:
        return None
    top = parts[parts.index("site-packages") + 1] if len(parts) > parts.index("site-packages") + 1 else ""
    if top.startswith("__editable__") and "heretic_dist" in top:
        return "heretic-dist"
    dists = by_module.get(top.split(".")[0].removesuffix(".py"))
    return dists[0] if dists else None


def dry(args: dict) -> dict:
    """The CPU check: shapes on the meta device, then build + trials (bf16 and NF4) on a tiny model."""
    allowed = allowed_here()
    hidden = install_hider(allowed)
    from gpu_check_steps import SHAPES, build, meta_parameters, trials

    start = time.perf_counter()
    counts = {shape: {"params": meta_parameters(shape), "expected": SHAPES[shape]["params"]}
              for shape in ("qwen2.5-0.5b", "llama-3.1-8b")}
    times = {"meta_s": time.perf_counter() - start}
    with tempfile.TemporaryDirectory(prefix="gpu-check-dry-") as tmp:
        folder = Path(tmp) / "tiny"
        built = build({"shape": "tiny", "folder": str(folder), "device": "cpu", "tokenizer": args.get("tokenizer")})
        common = {"folder": str(folder), "tokens": 3, "n_good": 4, "n_bad": 4, "trials": 1,
                  "prompts": args.get("prompts")}
        runs = {"bf16": trials({**common, "dtype": "bfloat16"})}
        try:
            runs["nf4"] = trials({**common, "dtype": "bfloat16", "quantization": "bnb_4bit"})
        except Exception as error:  # reported, and the check fails on it
            runs["nf4"] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    used = imported_distributions()
    wheels = {normalize(w.dist) for w in WHEELS}
    times["total_s"] = time.perf_counter() - start
    return {"meta_params": counts, "build": built, "runs": runs, "times": times,
            "hidden_modules": len(hidden), "hidden_sample": [m for m in hidden if m in
                                                             ("ray", "optuna", "gguf", "deepspeed")],
            "imported": used, "wheels_used": sorted(wheels & set(used)),
            "not_allowed": sorted(set(used) - allowed - {"stdlib", "repository", "no file"})}


# --- the parent side: `gpu_check.sh --dry-run` -------------------------------------------------

FAKE_DEVICE = {"name": "CPU (dry run: made-up bandwidth)", "count": 0, "memory_bytes": 0, "torch": "?",
               "cuda": None, "transformers": "?", "bandwidth_Bps": 1e11, "bf16_flops": 1e12}


def _check_arguments() -> tuple[bool, list[str]]:
    import contextlib
    import io

    from gpu_check import STEP_NAMES, parse_args

    a = parse_args(["--wheels", "W", "--trials", "2", "--only", "device,bf16-0.5b", "--json", "x.json", "--record"])
    ok = (a.wheels == Path("W") and a.trials == 2 and a.only == ["device", "bf16-0.5b"] and a.record
          and a.json == Path("x.json") and a.n_good == 100 and a.n_bad == 100 and a.tokens == 100)
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            parse_args(["--only", "no-such-step"])
            ok = False
        except SystemExit as stop:
            ok &= stop.code != 0
    return ok, [f"options parse; defaults 100+100 prompts, 100 tokens; steps: {', '.join(STEP_NAMES)}"]


def _check_plan() -> tuple[bool, list[str]]:
    from gpu_check import HARD_LIMIT_S, PLAN, parse_args

    budget = parse_args([]).budget_s
    ok = budget < HARD_LIMIT_S and all(s.min_s <= s.budget_s for s in PLAN) and PLAN[0].name == "device"
    lines = [f"overall budget {budget:.0f} s inside the {HARD_LIMIT_S} s limit (wheel installation included); "
             "a step starts only with its minimum left, and is stopped at min(its limit, time left)"]
    lines += [f"{s.name:17s} limit {s.budget_s:3d} s, needs {s.min_s:3d} s left"
              + (f", after {', '.join(s.needs)}" if s.needs else "") for s in PLAN]
    return ok, lines


def _check_wheels(folder: Path | None) -> tuple[bool, list[str]]:
    lines = [f"{len(WHEELS)} wheels; pip is asked for: {' '.join(requirements(1))} (1 GPU), "
             f"{' '.join(requirements(2))} (2 GPUs)"]
    lines += [f"{w.dist}=={w.version}: {w.why}" for w in WHEELS]
    if folder is None:
        return True, lines + ["no wheel folder given: sizes not checked "
                              "(scripts/gpu_check.sh --collect-wheels DIR collects them)"]
    ok, found = check_folder(folder, gpus=1)
    return ok, lines + [f"in {folder}:"] + found


def _check_engine_path(args) -> tuple[bool, list[str]]:
    import gpu_check_proc as proc
    import gpu_check_report as report

    with tempfile.TemporaryDirectory(prefix="gpu-check-dry-") as workdir:
        out = proc.run_child("dry", {"tokenizer": _str(args.tokenizer), "prompts": _str(args.prompts)}, 150,
                             single_gpu=False, capture=True, workdir=Path(workdir))
    if out["status"] != "ok":
        tail = [line for line in out.get("output", "").splitlines() if line.strip()][-8:]
        return False, [f"the CPU step {out['status']}: {out['note']}", *tail]
    r = out["result"]
    lines, ok = [], True
    for shape, c in r["meta_params"].items():
        near = abs(c["params"] - c["expected"]) <= 0.01 * c["expected"]
        ok &= near
        lines.append(f"{shape} shape on the meta device: {c['params'] / 1e9:.3f}B parameters "
                     f"(expected {c['expected'] / 1e9:.3f}B){'' if near else ' MISMATCH'}")
    for name, run in r["runs"].items():
        if "error" in run:
            ok = False
            lines.append(f"tiny {name} on CPU: {run['error']}")
            continue
        text, lim = report.trial_lines(f"tiny {name} on CPU", run, FAKE_DEVICE)
        ok &= lim["full_length"]
        lines += text
    section = report.section({"args": {"n_good": 4, "n_bad": 4, "tokens": 3}, "device": FAKE_DEVICE,
                              "steps": {n: {"status": "ok", "limits": report.limits(x, FAKE_DEVICE)}
                                        for n, x in r["runs"].items() if "error" not in x}}, "dry", "now")
    ok &= section.count("\n| ") >= 2
    ok &= not r["not_allowed"] and not r["imported"].get("unknown") and {"ray", "optuna"} <= set(r["hidden_sample"])
    lines.append(f"imports: wheel list used {', '.join(r['wheels_used'])}; outside image + wheels: "
                 f"{r['not_allowed'] or 'none'}; unknown: {r['imported'].get('unknown') or 'none'}; "
                 f"{r['hidden_modules']} modules hidden, among them {', '.join(r['hidden_sample'])}")
    return ok, [f"the GPU steps' functions ran on a tiny model in {r['times']['total_s']:.1f} s", *lines]


def _str(path) -> str | None:
    return None if path is None else str(path)


def _check_two_workers() -> tuple[bool, list[str]]:
    import gpu_check_proc as proc

    with tempfile.TemporaryDirectory(prefix="gpu-check-dry-") as workdir:
        out = proc.two_workers({"stub": True, "trials": 3, "stub_s": 0.05}, 30, Path(workdir), capture=True)
    if out["status"] != "ok":
        return False, [f"stub workers {out['status']}: {out['note']}"]
    agg = out["aggregate"]
    ok = agg["trials"] == 6 and agg["start_skew_s"] < 1.0
    return ok, [f"two stub worker processes behind the start barrier: {agg['trials']} trials, start skew "
                f"{agg['start_skew_s']:.3f} s, {agg['trials_per_min']:.0f} trials/min aggregate"]


def _check_tensor_parallel() -> tuple[bool, list[str]]:
    import importlib.util
    import shlex

    import gpu_check_proc as proc
    from gpu_check_steps import make_settings

    settings = make_settings({"folder": "model", "tokens": 100, "tensor_parallel": 2})
    command = proc.step_command("trials", {"tensor_parallel": 2, "...": "..."}, Path("result.json"),
                                proc.deepspeed_launcher())
    parallel = importlib.util.find_spec("heretic_dist.engine.parallel") is not None
    return settings.cluster.tensor_parallel == 2, [
        "skipped here (no GPU); on 2 GPUs: " + shlex.join(command),
        f"Engine(settings) with cluster.tensor_parallel = 2 joins the group itself "
        f"(heretic_dist/engine/parallel.py {'present' if parallel else 'NOT present yet: the step will fail there'})"]


def _outcome(check) -> tuple[bool, list[str]]:
    try:
        return check()
    except Exception as error:  # a broken check is a failed check, with its reason
        return False, [f"{type(error).__name__}: {error}"]


def dry_run(args) -> int:
    from concurrent.futures import ThreadPoolExecutor

    start = time.monotonic()
    checks = [("arguments", _check_arguments), ("step plan", _check_plan),
              ("wheels", lambda: _check_wheels(args.wheels)), ("engine path on CPU", lambda: _check_engine_path(args)),
              ("two workers", _check_two_workers), ("T = 2", _check_tensor_parallel)]
    with ThreadPoolExecutor(max_workers=1) as pool:  # the slow CPU step runs while the others do
        slow = pool.submit(_outcome, checks[3][1])
        outcomes = {name: _outcome(check) for name, check in checks if name != checks[3][0]}
        outcomes[checks[3][0]] = slow.result()
    failed = 0
    for name, _ in checks:
        ok, lines = outcomes[name]
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {lines[0]}")
        for line in lines[1:]:
            print(f"       {line}")
    verdict = "all checks passed" if not failed else f"{failed} checks FAILED"
    print(f"gpu_check --dry-run: {verdict} in {time.monotonic() - start:.1f} s")
    return 1 if failed else 0
