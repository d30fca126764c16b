#!/usr/bin/env bash
# HFCheckpoint stall and Llama-3-8B-shaped conversion, one H200 (see benchmarks/README.md).
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/lb-out}; mkdir -p "$OUT"
run() { echo "### $*"; timeout 900 "$@" > "$OUT/last.log" 2>&1; grep -E "^FIGURES|Error|error:" "$OUT/last.log" | tee -a "$OUT/figures.log"; }
run torchrun --nproc_per_node=1 hf_checkpoint_stall.py --shapes llama3-8b --saves 2
rm -rf /tmp/lb-bench/hf-checkpoint-stall
run torchrun --nproc_per_node=1 conversion.py --shapes llama3-8b --tp 1
run torchrun --nproc_per_node=1 conversion.py --shapes llama3.2-1b --tp 1
