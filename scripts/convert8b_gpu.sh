#!/usr/bin/env bash
# Time `ember convert` on a random Llama-3-8B-shaped model (all 32 layers) on the GPU machine.
#   OUT=out bash scripts/convert8b_gpu.sh [BPW]
# The tokenizer comes from .gpu_assets/tiny-smol (scripts/make_gpu_assets.py; carry .gpu_assets), so no GGUF
# has to travel; the bundled calibration texts are used as for any model.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
W=${WORK:-/tmp/convert8b}; mkdir -p "$W"
BPW=${1:-4.0}
export PYTHONPATH=${PYTHONPATH:-}:$PWD PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/convert8b.txt"; }
log "start on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
t0=$(date +%s)
python3 scripts/make_random_hf.py "$W/l3" --layers 32 --tokenizer-from .gpu_assets/tiny-smol 2>&1 | tail -1 | tee -a "$OUT/convert8b.txt"
log "random fp16 model written in $(( $(date +%s) - t0 )) s ($(du -sh "$W/l3" | cut -f1))"
t0=$(date +%s)
( time python3 -m ember.cli convert "$W/l3" "$W/l3-q" --bpw "$BPW" ) > "$OUT/convert8b_log.txt" 2>&1
rc=$?
log "convert rc=$rc in $(( $(date +%s) - t0 )) s"
tr '\r' '\n' < "$OUT/convert8b_log.txt" | grep -vE "it/s\]|s/it\]|layer/s\]|s/layer\]|tensor/s\]" | tail -50 | tee -a "$OUT/convert8b.txt"
cp "$W/l3-q/ember_quant.json" "$OUT/l3_manifest.json" 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv,noheader | tee -a "$OUT/convert8b.txt"
