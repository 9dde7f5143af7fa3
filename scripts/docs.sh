#!/usr/bin/env bash
# Builds the documentation site (Sphinx + MyST) into docs/_build/html; open docs/_build/html/index.html.
#   bash scripts/docs.sh              warnings are errors (-W), every cross-reference must resolve (-n)
#   bash scripts/docs.sh -b linkcheck extra sphinx-build arguments pass through
# Installs the pinned tools of requirements-docs.txt into .venv first when any is missing
# (bash scripts/setup.sh docs).
set -euo pipefail
cd "$(dirname "$0")/.."
have_pins() {
  [ -x .venv/bin/python ] && .venv/bin/python - requirements-docs.txt <<'PY'
import sys
from importlib import metadata

for line in open(sys.argv[1]):
  pin = line.split("#")[0].strip()
  if pin:
    name, version = pin.split("==")
    try:
      if metadata.version(name) != version:
        sys.exit(1)
    except metadata.PackageNotFoundError:
      sys.exit(1)
PY
}
if ! have_pins; then
  bash scripts/setup.sh docs
fi
# -E: a fresh environment, so docstrings edited since the last build are read again.
exec .venv/bin/python -m sphinx -b html -E -W --keep-going -n -q docs docs/_build/html "$@"
