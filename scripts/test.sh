#!/usr/bin/env bash
# Usage: bash scripts/test.sh [pytest args]
# Sets up .venv (scripts/setup.sh) and runs the default test suite (slow tests excluded; add `-m slow` for those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
