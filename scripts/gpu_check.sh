#!/usr/bin/env bash
# Check a CUDA machine in one go, offline (tiny models built on the spot, nothing downloaded):
#   bash scripts/gpu_check.sh OUT [CONFIGS]
# 1. every chapter at the smoke profile on the CPU and on the GPU, and the two runs' verdicts
#    compared claim by claim (OUT/compare.txt, from python -m ge_utils compare);
# 2. with CONFIGS, the folders `python -m benchmarks.random_init CONFIGS` writes (a config and a
#    tokenizer each, no weights): the fast statistics against one forward+backward at batch 32
#    (16 pairs), random weights, on the SmolLM2 architecture (and brute force), on a ~1B Llama
#    and on a Mixtral and a GPT-OSS of SmolLM2's shape (8 experts, 2 per token; and brute force)
#    (OUT/bench-*.txt).
# Logs and results go to OUT; the exit status is compare's (1: a verdict differs). DEVICE=cpu runs
# the same on the CPU (a dry run of this script); JOBS (default 2) chapters run at once; PYTHON
# (default python3) is the interpreter.
set -euo pipefail
out=$(realpath -m "${1:?usage: bash scripts/gpu_check.sh OUT [CONFIGS]}")
configs=${2:+$(realpath "$2")}
device=${DEVICE:-cuda}
jobs=${JOBS:-2}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
# the checkout's packages, also where they are not installed (a machine with its own PyTorch)
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JUPYTER_PREFER_ENV_PATH=1 PYTHONUNBUFFERED=1
"$py" - "$device" <<'PY'
import sys

import torch

from ge_utils.models import resolve_device

try:
    dev = resolve_device(sys.argv[1])
except (RuntimeError, ValueError) as exc:
    sys.exit(f"error: {exc}")
name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "the CPU"
print(f"torch {torch.__version__}, device {dev} ({name})")
PY
if [ "$device" != cpu ] && "$py" -c "import triton" 2>/dev/null \
  && ! command -v "${CC:-cc}" >/dev/null && ! command -v gcc >/dev/null; then
  echo "warning: Triton is installed but no C compiler was found: TRL's CUDA log-prob kernels" \
    "cannot be compiled (use_on_your_run will fail)" | tee "$out/warnings.txt" >&2
fi
# the second run's folders are named by its device; "-again" on a dry run, so that compare
# reads two separate runs there too
second=$device
if [ "$device" = cpu ]; then second=cpu-again; fi
for label in cpu "$second"; do
  start=$(date +%s)
  "$py" -m ge_utils run --profile smoke -p device "${label%-again}" --jobs "$jobs" \
    --no-progress --out-dir "$out/chapters-$label" --results-dir "$out/results-$label" 2>&1 \
    | grep -v "running over TCP" | tee "$out/run-$label.txt"
  echo "smoke on ${label%-again}: $(($(date +%s) - start)) s" | tee -a "$out/run-$label.txt"
done
status=0
"$py" -m ge_utils compare "$out/results-cpu" "$out/results-$second" | tee "$out/compare.txt" \
  || status=$?
if [ -n "$configs" ]; then
  for shape in smollm2-135m llama-1b mixtral-smollm2 gpt-oss-smollm2; do
    case $shape in
      smollm2-135m) methods=floor,fast,fast_grouped,brute ;;
      llama-1b) methods=floor,fast,fast_grouped ;;
      *) methods=floor,fast,brute ;;
    esac
    "$py" -m benchmarks.bench_fast_gradients --device "$device" --random-init "$configs/$shape" \
      --pairs 16 --repeat 3 --methods "$methods" 2>&1 | tee "$out/bench-$shape.txt"
  done
fi
exit "$status"
