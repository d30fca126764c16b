#!/usr/bin/env bash
# Third GPU session (one H200): memory peaks, import profile, second-save investigation, and
# MegatronBridgeStrategy vs a plain Megatron-Core loop. Usage: bash benchmarks/gpu_session3.sh PART...
# with PART in: stall, convert1b, convert8b, train. TP=2 parts need 2 GPUs (TP=2 in the name).
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/lb-out}; mkdir -p "$OUT"
run() { echo "### $*" | tee -a "$OUT/figures.log"; timeout 900 "$@" > "$OUT/last.log" 2>&1; grep -E "^FIGURES|Error|error:" "$OUT/last.log" | tee -a "$OUT/figures.log"; }
GPUS=$(nvidia-smi -L | wc -l)
for part in "$@"; do
  case $part in
    stall) run torchrun --nproc_per_node=1 hf_checkpoint_stall.py --shapes llama3-8b --saves 3 --staging staged --raw-repeats 3
           rm -rf /tmp/lb-bench/hf-checkpoint-stall ;;
    convert1b) run torchrun --nproc_per_node=1 conversion.py --shapes llama3.2-1b --tp 1 --profile --save-repeats 3
               grep -A45 "Ordered by" "$OUT/last.log" > "$OUT/import_profile_1b.txt" ;;
    convert8b) run torchrun --nproc_per_node=1 conversion.py --shapes llama3-8b --tp 1 --save-repeats 2
               [ "$GPUS" -ge 2 ] && run torchrun --nproc_per_node=2 conversion.py --shapes llama3-8b --tp 2 ;;
    train) TP=$([ "$GPUS" -ge 2 ] && echo 2 || echo 1)
           for mode in strategy mcore strategy mcore; do
             run torchrun --nproc_per_node=$TP train_vs_mcore.py --shapes llama3.2-1b --tp $TP --mode $mode --steps 40 --warmup 10
           done ;;
  esac
done
