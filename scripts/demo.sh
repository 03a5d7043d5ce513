#!/usr/bin/env bash
# The README's main command: set-up (idempotent: venv, offline model and text, op library), then
# float vs. absmax RTN, RTN+PiSO, GPTQ, GPTQ⊙PiSO and Qronos⊙PiSO at 3 bits per channel on the
# offline SmolLM2-135M and held-out World English Bible text. Extra arguments go to the demo
# (e.g. --bits 4, --group-size 32, --recipes rtn-absmax,rtn-piso, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m torch_piso demo "$@"
