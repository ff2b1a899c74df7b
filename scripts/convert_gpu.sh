#!/usr/bin/env bash
# `ember convert` on the GPU machine: quality and speed numbers of docs/dev/converter-notes.md.
#   OUT=out/convert bash scripts/convert_gpu.sh
# 1. the bundled SmolLM2-135M GGUF converted at each of $BPWS with one shared job folder (one measurement,
#    then allocate + quantize + write per target), each timed;
# 2. every conversion scored against the GGUF in float16 (ember.bench.eval.evaluate_many: KL, top-1, ppl on
#    the held-out Alice text, ctx 2048, $WINDOWS windows);
# 3. a random Llama-3-8B-shaped model of $L3_LAYERS layers (scripts/make_random_hf.py) converted at 4.0 bpw:
#    per-stage times, to extrapolate to 32 layers.
# Needs gguf: carry the wheel and put it on PYTHONPATH first (see docs/dev/converter-notes.md).
set -u
OUT=${OUT:-out/convert}
W=${WORK:-/tmp/convert}
BPWS=${BPWS:-"2.5 3.0 4.0 5.0 6.0"}
WINDOWS=${WINDOWS:-16}
L3_LAYERS=${L3_LAYERS:-4}
PY=${PY:-python3}
export PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$OUT" "$W"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt" >&2; }
secs() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

GGUF=$($PY -c "from ember.io.bundled import bundled_model_path as b; print(b())")
log "start on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)"
MODELS=""
for b in $BPWS; do
  t0=$(date +%s%N)
  $PY -m ember.cli convert "$GGUF" "$W/smol-$b" --bpw "$b" --job-dir "$W/smol-job" >> "$OUT/log.txt" 2>&1 \
    || log "FAILED: convert $b"
  log "smollm2 $b bpw: $(secs "$t0") ms"
  cp "$W/smol-$b/ember_quant.json" "$OUT/smol-$b.json" 2>/dev/null
  MODELS="$MODELS $W/smol-$b"
done

log "scoring"
$PY - "$GGUF" "$WINDOWS" "$OUT" $MODELS >> "$OUT/log.txt" 2>&1 <<'EOF' || log "FAILED: scoring"
import dataclasses, json, sys
from ember.bench.eval import evaluate_many
from ember.config import EngineConfig
from ember.quant.data import heldout_text_file
ref, windows, out, models = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
res = evaluate_many([ref] + models, heldout_text_file().read_text(encoding="utf-8"), 2048, windows, ref,
                    EngineConfig(device="cuda"))
rows = [{"model": m, **dataclasses.asdict(r)} for m, r in zip(["fp16"] + models, res)]
json.dump(rows, open(f"{out}/scores.json", "w"), indent=1)
for r in rows:
    print(f"{r['model']}: bpw {r['bpw']} KL {r['kld']} top-1 {r['top1']} ppl {r['ppl']:.4f}")
EOF

log "random Llama-3-8B shape, $L3_LAYERS layers"
t0=$(date +%s%N)
$PY scripts/make_random_hf.py "$W/l3" --layers "$L3_LAYERS" >> "$OUT/log.txt" 2>&1 || log "FAILED: make_random_hf"
log "l3 written: $(secs "$t0") ms"
t0=$(date +%s%N)
$PY -m ember.cli convert "$W/l3" "$W/l3-q4" --bpw 4.0 >> "$OUT/log.txt" 2>&1 || log "FAILED: convert l3"
log "l3 convert: $(secs "$t0") ms"
cp "$W/l3-q4/ember_quant.json" "$OUT/l3-q4.json" 2>/dev/null
grep -h "time:" "$OUT/log.txt" | tail -n 20
log "done"
