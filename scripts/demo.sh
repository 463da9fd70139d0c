#!/usr/bin/env bash
# Usage: bash scripts/demo.sh [args]
# The main job on a fresh machine: set up .venv, then extend the real SmolLM2-135M past its 8k context and measure it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/hf-rope-ext demo "$@"
