#!/usr/bin/env bash
# GPU check of heretic-dist's engine, in process (no Ray): seconds per trial in bf16 and NF4 next to the
# memory-bandwidth limit, two workers sharing one GPU, T = 2 tensor parallel with 2 GPUs. Under 8 minutes.
#
#   scripts/gpu_check.sh [--wheels DIR] [--json FILE] [--record] [--only STEPS] [...]   on a GPU machine
#   scripts/gpu_check.sh --dry-run [--wheels DIR]      checks its own steps on CPU (no GPU), exit 0 if they hold
#   scripts/gpu_check.sh --collect-wheels DIR          on a machine with pip access: wheels, tokenizer, prompts
#
# --wheels DIR: `pip install --no-index --find-links DIR` of what the GPU image lacks (pydantic, bitsandbytes;
# deepspeed with 2 GPUs), then DIR/tokenizer and DIR/prompts are used. Other options: python3
# scripts/gpu_check.py --help. PYTHON picks the interpreter (default python3).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT" || exit 2

mode=run wheels="" collect="" pass=()
while (($#)); do
  case "$1" in
    --dry-run) mode=dry ;;
    --collect-wheels)
      [[ $# -ge 2 ]] || { echo "gpu_check: --collect-wheels needs a folder" >&2; exit 2; }
      mode=collect collect="$2"; shift ;;
    --wheels)
      [[ $# -ge 2 ]] || { echo "gpu_check: --wheels needs a folder" >&2; exit 2; }
      wheels="$2"; pass+=(--wheels "$2"); shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) pass+=("$1") ;;
  esac
  shift
done

case "$mode" in
  collect) exec "$PY" scripts/gpu_check_wheels.py collect "$collect" ;;
  dry) exec "$PY" scripts/gpu_check.py --dry-run "${pass[@]}" ;;
esac

# The real run: a CUDA GPU first, or one clear line.
probe=$("$PY" - 2>/dev/null <<'EOF'
import sys
try:
    import torch
except Exception as error:
    print(f"torch cannot be imported ({type(error).__name__}: {error})")
    sys.exit(1)
if not torch.cuda.is_available():
    print(f"no CUDA GPU visible (torch {torch.__version__}: torch.cuda.is_available() is False)")
    sys.exit(1)
print(torch.cuda.device_count())
EOF
)
if [[ $? -ne 0 || ! $probe =~ ^[0-9]+$ ]]; then
  echo "gpu_check: ${probe:-the GPU probe failed}; 'scripts/gpu_check.sh --dry-run' checks the steps without one" >&2
  exit 3
fi

if [[ -n $wheels ]]; then
  [[ -d $wheels ]] || { echo "gpu_check: wheel folder $wheels does not exist" >&2; exit 2; }
  reqs=$("$PY" scripts/gpu_check_wheels.py requirements --gpus "$probe") || exit 2
  echo "gpu_check: pip install --no-index --find-links $wheels $reqs"
  # shellcheck disable=SC2086  # $reqs is a list of requirement words
  "$PY" -m pip install -q --no-index --find-links "$wheels" $reqs || {
    echo "gpu_check: installing the wheels from $wheels failed (pip's message above)" >&2; exit 2; }
fi

# Everything, the installation above included, ends within 480 s.
left=$((465 - SECONDS))
exec timeout -k 10 $((left + 10)) "$PY" scripts/gpu_check.py --budget-s "$left" "${pass[@]}"
