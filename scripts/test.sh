#!/usr/bin/env bash
# Every test: set-up (idempotent), pytest, then the C++ library + GoogleTest via CMake/ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python

echo "== pytest"
$PY -m pytest -q -ra tests

echo "== GoogleTest (CMake + ctest)"
cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
cmake --build build-cmake -j"${MAX_JOBS:-2}" >/dev/null
ctest --test-dir build-cmake --output-on-failure
