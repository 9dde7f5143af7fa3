#!/usr/bin/env bash
# Sets up .venv with the test, PEFT-parity and docs extras, builds the documentation site (its
# warnings are errors), then runs the whole test suite offline.
#   bash scripts/test.sh              everything
#   bash scripts/test.sh -k dora      extra pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev parity docs
bash scripts/docs.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests -q -n 2 --durations=15 "$@"
