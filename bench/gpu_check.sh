#!/usr/bin/env bash
# One command for a machine with a GPU: build, test, sanitize and benchmark the CUDA kernels.
#
#   bench/gpu_check.sh [OUT_DIR]      (default: ./gpu_check-<date>)
#
# Needs torch (a CUDA build) and nvcc preinstalled; no network and no pip: the package is
# imported from this checkout through PYTHONPATH, and the extension is built into OUT_DIR.
# Steps, each logged to OUT_DIR/<step>.log, with rc and seconds in OUT_DIR/summary.txt:
#   env        nvidia-smi, torch, nvcc, compute-sanitizer versions
#   build      the extension for the visible GPU (TORCH_CUDA_ARCH_LIST honoured), timed
#   test_cuda  pytest tests/test_cuda.py tests/test_norm_cuda.py and the Megatron-style RNG
#              tracker fork test of tests/test_dropout.py (junit XML beside it)
#   memcheck   compute-sanitizer --tool memcheck over bench/gpu_variants.py (every variant)
#   racecheck  compute-sanitizer --tool racecheck over the same script
#   norm_memcheck, norm_racecheck  the same tools over tests/test_norm_cuda.py (fp32 and bf16 cases)
#   bench      python bench/run.py --quick --device cuda (results in OUT_DIR/bench)
# The sanitizer steps are skipped, and say so, where compute-sanitizer is absent.
# Each step has a time limit, cut to what is left of a 7.5-minute budget (a step with no time
# left is skipped and counts as failed), so the whole finishes within 8 minutes.
# Exit status: 0 when every step that ran passed.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="$OUT/torch_extensions"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null || true)
failed=0
DEADLINE=$((SECONDS + 450))

# step NAME LIMIT_S COMMAND...: run it from the repository root, logged and timed.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    echo "$name: skipped (no time left)" | tee -a "$OUT/summary.txt"
    failed=1
    return
  fi
  local start=$SECONDS
  echo "== $name (limit ${limit} s): $*"
  (cd "$REPO" && timeout "$limit" "$@") >"$OUT/$name.log" 2>&1
  local rc=$?
  local line="$name: rc=$rc, $((SECONDS - start)) s"
  [ "$rc" -eq 124 ] && line="$line (timed out)"
  echo "$line" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || failed=1
}

: >"$OUT/summary.txt"
{
  date
  nvidia-smi || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version || nvcc --version || true
  echo "compute-sanitizer: ${SANITIZER:-absent}"
  git -C "$REPO" log -1 --oneline || true
} >"$OUT/env.log" 2>&1

step build 150 "$PY" -c "
import time
t = time.perf_counter()
from fused_dropout import _loader
path = _loader.load()
print(f'built in {time.perf_counter() - t:.1f} s: {path}')
assert _loader.built_with_cuda(), 'the extension was built without its CUDA kernels'
"
step test_cuda 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_norm_cuda.py \
  tests/test_dropout.py::test_ops_follow_a_megatron_style_rng_tracker_fork \
  --junitxml="$OUT/test_cuda.xml"
if [ -n "$SANITIZER" ]; then
  for tool in memcheck racecheck; do
    step "$tool" 75 "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" bench/gpu_variants.py
  done
  for tool in memcheck racecheck; do
    step "norm_$tool" 60 "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" -m pytest -q -x \
      -p no:cacheprovider tests/test_norm_cuda.py -k "float32 or bfloat16"
  done
else
  echo "memcheck, racecheck: skipped (compute-sanitizer not found)" | tee -a "$OUT/summary.txt"
fi
step bench 180 "$PY" bench/run.py --quick --device cuda --out "$OUT/bench"

echo "all output in $OUT"
cat "$OUT/summary.txt"
exit "$failed"
