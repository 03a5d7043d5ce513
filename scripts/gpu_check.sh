#!/usr/bin/env bash
# The GPU checks, in one call on a lent GPU machine (the `device` tool; see README "GPU"):
# extension (the carried build if it loads with CUDA kernels, else built there), every CUDA test,
# then the GPU benchmarks. Logs go to $OUT (default /tmp/piso_gpu). Uses the machine's python3/torch.
#   bash scripts/gpu_check.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-/tmp/piso_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/env.txt"
nproc | tee -a "$OUT/env.txt"

if ! $PY -c "import torch_piso, sys; sys.exit(0 if torch_piso.has_cuda_kernels() else 1)" 2>"$OUT/import.log"; then
  stamp "carried build unusable ($(tail -1 "$OUT/import.log")): building here"
  rm -f torch_piso/_C*.so
  if ! $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; exit 1
  fi
fi
stamp "extension ready"

if [ "$what" != bench ]; then
  stamp "CUDA tests"
  # A per-test limit where the machine has pytest-timeout (not a project dependency).
  TO=""; $PY -c "import pytest_timeout" 2>/dev/null && TO="--timeout 300"
  $PY -m pytest -q -ra -p no:cacheprovider --continue-on-collection-errors $TO tests -k "cuda or nccl" 2>&1 | tee "$OUT/tests.log" | tail -40
fi

if [ "$what" != tests ]; then
  B="timeout 240 env PYTHONPATH=. $PY"
  stamp "bench_piso_speed"
  $B benchmarks/bench_piso_speed.py --devices cuda --sizes 1024 4096 --bits 2 3 4 2>&1 | tee "$OUT/bench_piso.log"
  stamp "bench_piso_speed, per-event count kernel (PISO_CUDA_EVENT_U=counts)"
  PISO_CUDA_EVENT_U=counts $B benchmarks/bench_piso_speed.py --devices cuda --sizes 1024 4096 --bits 2 4 --repeats 1 2>&1 | tee "$OUT/bench_piso_counts.log"
  stamp "bench_gptq"
  $B benchmarks/bench_gptq.py --devices cuda --sizes 4096x4096,4096x11008 2>&1 | tee "$OUT/bench_gptq.log"
  stamp "bench_hessian"
  $B benchmarks/bench_hessian.py --devices cuda 2>&1 | tee "$OUT/bench_hessian.log"
  stamp "bench_qlinear"
  $B benchmarks/bench_qlinear.py --device cuda --dtype bfloat16 --dim 4096 --tokens 1 16 512 2>&1 | tee "$OUT/bench_qlinear.log"
fi
stamp "done"
grep -E "passed|failed" "$OUT/tests.log" 2>/dev/null | tail -2
