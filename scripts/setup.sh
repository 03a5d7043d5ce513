#!/usr/bin/env bash
# Idempotent set-up on a fresh machine of this kind: a Python 3.12 virtual environment (.venv) with
# the pinned torch==2.11.0 and the project's dependencies, the offline model and text, and the
# compiled op library (C++ and, when torch has CUDA and nvcc exists, CUDA kernels).
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  if [ -n "${PISO_PYTHON:-}" ]; then echo "$PISO_PYTHON"; return; fi
  for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$c"; return
    fi
  done
  echo "no Python >= 3.10 found" >&2; exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(pick_python)" -m venv .venv
fi
PY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! $PY -c 'import torch, transformers, safetensors, gguf, accelerate, numpy, tqdm, yaml, pytest, ninja; assert torch.__version__.startswith("2.11.0")' 2>/dev/null; then
  echo "== installing Python dependencies (torch==2.11.0, transformers, ...)"
  $PY -m pip install -q --upgrade pip
  $PY -m pip install -q -r requirements.txt
fi
bash scripts/offline_assets.sh

echo "== building the op library (torch_piso._C)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
$PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -vE "^\s*$|DEPRECATION|setuptools" || true
$PY -c 'import torch_piso, torch; print("torch_piso built; CUDA kernels:", torch_piso.has_cuda_kernels())'
