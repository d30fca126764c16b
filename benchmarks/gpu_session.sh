#!/usr/bin/env bash
# The GPU figures of the closing notes, in one call on a 2-GPU machine (see benchmarks/README.md).
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/lb-out}; mkdir -p "$OUT"
run() { echo "### $*"; timeout 900 "$@" 2>&1 | tee -a "$OUT/log" | grep -E "^FIGURES|Error|error:|Traceback" ; }
run torchrun --nproc_per_node=1 conversion.py --shapes llama3.2-1b --tp 1
run torchrun --nproc_per_node=2 conversion.py --shapes llama3.2-1b --tp 2 --check-logits
run torchrun --nproc_per_node=2 conversion.py --shapes llama3.2-1b --pp 2
for layout in "--tp 2" "--pp 2" "--tp 1"; do
  run torchrun --nproc_per_node=2 train_throughput.py --shapes llama-100m $layout --steps 300
done
