#!/usr/bin/env bash
# Usage: bash scripts/extend_smollm2.sh [RUN_DIR] [extra bench_finetune_smollm2.py options, e.g. --max-steps 40]
#
# The whole "extend -> fine-tune -> save -> evaluate -> card -> push" flow on the real SmolLM2-135M-Instruct (offline
# GGUF), 8k -> 16k with YaRN x2, on this machine's CPUs:
#   1. training text: Python's docs without the evaluation window (benchmarks/bench_finetune_smollm2.py, stage data)
#   2. before: the patched model, unpatched references, passkey at 16k (stage before)
#   3. fine-tune: hf-rope-ext finetune --config smollm2_16k_pose_yarn (PoSE 2048-token windows spanning 16k, LoRA +
#      embeddings + norms), merged and saved with its extended config (stage train; killed? run this script again)
#   4. after: the saved model measured the same way (stage after)
#   5. the model card with the training summary and the before/after figures, then `push --dry-run`
# Results: benchmarks/results/smollm2_finetune_16k.json (`--report-only` prints the table). Every stage is resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/smollm2-16k-finetune}"
shift || true
[ -x .venv/bin/python ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python benchmarks/bench_finetune_smollm2.py --run "$RUN" "$@"
.venv/bin/hf-rope-ext card "$RUN/model" --training "$RUN/model/training_summary.json" \
    --results "$RUN/card_rows.json" --plots "$RUN/model/loss.png" --base-model HuggingFaceTB/SmolLM2-135M-Instruct \
    --repo-id "${HF_USER:-me}/SmolLM2-135M-Instruct-yarn-16k"
.venv/bin/hf-rope-ext push "$RUN/model" "${HF_USER:-me}/SmolLM2-135M-Instruct-yarn-16k" --dry-run
