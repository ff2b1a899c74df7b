#!/usr/bin/env bash
# The one command run on the GPU machine (device tool): GPU tests + benchmarks, results under $OUT.
#
#   scripts/gpu_check.sh [smoke] [qtests] [h2] [fuse] [stages] [stagetable] [base] [ab] [async] [bench8b] [quick] [full] [exl2]
#                        [attn] [gptq8b] [bench70b] [ember70b] [bpw] [batch] [pdl] [profile] [gprofile] [sweep] [prefillgemm] [overlap] [fp8]
#                        [gemvfixed] [gemvdecode] [pprofile] [qgemm] [cluster] [readfloor] [tests] [testsfirst]
#   (default: tests bench8b exl2). Run it under `timeout N` to fit a device call: timeout signals the whole
#   process group, and on TERM the script stops what it started and still packs $OUT for the return trip.
# smoke: the engine / model / attention GPU tests first; qtests: the one-row, mixed-width and epilogue
#   qmatmul GPU tests; h2: those and an A/B of the packed-half decode (EMBER_H2=0/1); fuse: 8B decode with
#   the fused decode layer off / on twice (EMBER_FUSE=0/1); stages: 8B decode for each one-row matmul variant
#   in GEMV_ARMS (stagetable: also the batch-1 qmatmul table of each); async: 8B decode with the pipelined
#   streaming loop off / on twice (EMBER_ASYNC_DECODE=0/1); tests: the whole -m gpu suite, last; testsfirst: the
#   suite first, while ExLlamaV2's extension builds, then a wait for the build, so no timed run shares the CPU with it.
# base: 8B decode of an earlier tree unpacked into .base/ (with its commit in .base/REV; carry it) against this
#   one, BASE_ARMS "tree/wide stages" alternating, then BASE_BPW widths on both (the same-call baseline
#   of a kernel change). ab: one 8B decode row per AB_ARMS entry (VAR=value[,VAR=value], at AB_BPW).
# bench8b: copy bandwidth and the 8B runs the acceptance names (4.0 bpw at 512 and 2048 tokens, the GPTQ
#   folder ExLlamaV2 runs); quick: the batch-1 qmatmul table (--quick; qtable: the whole table);
#   full: also a 6- and a 16-bit head, 2.5-6.0 bpw, the GPTQ folder at 2048, batch 8 and 32, the profile;
#   batch: only the batch 8 and 32 rows.
#   exl2: ExLlamaV2 on the same GPTQ folder, right after ember's 8B runs (its extension builds in the
#   background from the start; its batch-1 loop is CPU-bound, so nothing else runs beside it).
# attn: batch-1 decode attention configs and the rope-fused op against rope_store_kv + attention; bpw: 2.5 / 3.0 / 5.0 / 6.0 bpw and 4.0 with a 6-bit head;
#   pdl: each EMBER_PDL mode (kernels/pdl.py); profile: per-kernel GPU time and prefill host overhead
#   (scripts/profile_decode.py); gprofile: the graph-replayed step's kernel timeline (scripts/profile_graph.py),
#   once per PROFILE_ARMS entry (VAR=value[,VAR=value]); sweep: batch-1 qmatmul launch configs (SWEEP_WIDTHS, SWEEP_SHAPES,
#   SWEEP_ARGS; SWEEP_ENV=VAR=value[,VAR=value] sets switches for it, e.g. EMBER_CLUSTER=1); prefillgemm: prefill-sized matmuls; overlap: prefill matmuls with the dequant kernel on a
#   second stream (scripts/bench_prefill_overlap.py, OVERLAP_ARGS, once per OVERLAP_ENVS entry);
#   ember70b: bench70b without ExLlamaV2 (B70_BPW: the widths, default "4.0 2.5"); fp8: the bench8b rows with
#   --fp8-prefill (the prompt's matmuls on fp8 tensor cores); gemvfixed: the batch-1 GEMV's fixed cost per launch
#   and streaming rate, once per arm of FIXED_ARGS (scripts/probe_gemv_fixed.py); quick / qtable run their
#   table once per QUICK_ARMS entry (alone, or after bench8b's bandwidth; QUICK_ARGS: more bench_qmatmul.py arguments); gemvdecode: each matmul's time inside the decode step, per shape and width
#   (scripts/gemv_in_decode.py, GEMVDEC_WIDTHS); pprofile: one prefill's GPU time by kernel, the synthetic
#   and the act-order layout (scripts/profile_prefill.py, PPROFILE_ARMS); qgemm: the fused dequantize-GEMM's
#   tile configs on prompt-sized matmuls against dequantize + cuBLAS (scripts/sweep_qgemm.py, QGEMM_ARGS);
#   cluster: clusters of CTAs summing through distributed shared memory against the split-K atomics and counter
#   (scripts/probe_cluster_launch.py, CLUSTER_ARGS); readfloor: a plain streaming read, a copy and gpt-fast's int4
#   kernel on the bytes of the large 8B matrices, beside ember's batch-1 kernel (scripts/probe_read_floor.py).
#   qtests takes QTEST_K (a pytest -k) and QTEST_TIMEOUT; QUICK_TIMEOUT / AB_TIMEOUT limit each quick / ab arm (s),
#   so that an arm that hangs (a new kernel path) does not take the call's other arms with it.
#   (`core` and `noqm` are accepted for the commands of earlier rounds: core = without full, noqm = no table;
#   nogptq: bench8b without ember's run of the GPTQ folder.)
#
# pytest runs without -q here: pyproject's addopts already give one, and -qq drops the final "N passed" line.
# Needs, carried in the ignored .whl/ folder: gguf-0.19.0 (tests), pytest-xdist + execnet (optional, tests), and for `exl2`/`bench70b`: exllamav2-0.3.2,
# rich, pygments, markdown-it-py, mdurl (see bench/baselines/README.md). Python/torch/triton: the machine's own.
set -uo pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${*:-tests bench8b exl2}
has() { [[ " $parts " == *" $1 "* ]]; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
log() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }
pack() {  # the device tool returns a handful of files: everything but the summary and the rows in one archive
  (cd "$OUT" && [ "$(ls | wc -l)" -gt 6 ] && tar czf /tmp/results.tgz --exclude summary.txt --exclude bench.jsonl . \
    && find . -type f ! -name summary.txt ! -name bench.jsonl -delete && mv /tmp/results.tgz .) || true
}
stop() { log "stopped"; pkill -TERM -P $$; [ -n "${BUILD:-}" ] && pkill -TERM -P "$BUILD"; pack; exit 124; }
trap stop TERM INT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

if has exl2 || has bench70b; then  # build ExLlamaV2's extension in the background (CPU) while the GPU works
  (TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=14 python3 -c "import exllamav2.ext" > "$OUT/exl2_build.log" 2>&1; echo done >> "$OUT/exl2_build.log") &
  BUILD=$!
fi
if has bench8b || has exl2; then
  [ -d /tmp/l3gptq ] || python3 bench/baselines/make_gptq_random.py llama3-8b /tmp/l3gptq
fi

run_tests() {
  log "GPU tests"
  # the suite is bound by Triton's JIT compiles on the host: spread it over TEST_WORKERS processes (pytest-xdist,
  # carried in .whl/) when it is there; one GPU holds them all (small shapes)
  xd=; python3 -c "import xdist" 2>/dev/null && xd="-n ${TEST_WORKERS:-8}"
  timeout ${TEST_TIMEOUT:-900} python3 -m pytest -m gpu -p no:cacheprovider $xd --durations=12 ${TEST_PATHS:-tests} 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -22
}
if has testsfirst; then  # the GPU tests while ExLlamaV2's extension builds, then nothing timed runs beside the build
  run_tests
  if [ -n "${BUILD:-}" ]; then log "waiting for the ExLlamaV2 build"; wait $BUILD; BUILD=; tail -2 "$OUT/exl2_build.log"; fi
fi
if has smoke; then  # the GPU tests of the newest paths first, so benchmarks never run on a broken build
  log "GPU smoke tests"
  timeout ${SMOKE_TIMEOUT:-300} python3 -m pytest -m gpu -p no:cacheprovider tests/engine tests/test_gpu_model.py \
    tests/kernels/test_attention.py 2>&1 | tee "$OUT/gpu_smoke.log" | tail -6
fi

bench() {  # ember bench ... -> one JSON line appended to bench.jsonl
  python3 -m ember.cli bench --json -q "$@" 2>>"$OUT/bench_err.log" | tail -1 | tee -a "$OUT/bench.jsonl"
}
ab8b() {  # ab8b TAG FILE [VAR=value ...]: the 8B decode row of an A/B arm, prefixed with TAG, into $OUT/FILE
  local tag=$1 file=$2; shift 2
  env "$@" timeout ${AB_TIMEOUT:-600} python3 -m ember.cli bench --json -q --synthetic llama3-8b --bpw ${AB_BPW:-4.0} --head-bits 8 \
    --prompt-len 512 --gen-len ${AB_GEN:-128} ${AB_SEQ:+--max-seq-len $AB_SEQ} ${AB_BATCH:+--batch $AB_BATCH} \
    ${AB_ACT:+--act-order} \
    2>>"$OUT/bench_err.log" | tail -1 \
    | sed "s|^|$tag |" | tee -a "$OUT/$file"
}
abarms() {  # abarms FILE ARM...: ab8b of each arm, VAR=value[,VAR=value] (a BPW=b entry sets the arm's bpw,
  # SEQ=n its --max-seq-len, ACT=1 the converter's act-order layout (--act-order); AB_BATCH / AB_GEN, when set,
  # every arm's --batch / --gen-len)
  local file=$1 arm b q a; shift
  for arm in "$@"; do
    b=$(sed -n 's/.*BPW=\([0-9.]*\).*/\1/p' <<< "$arm")
    q=$(sed -n 's/.*SEQ=\([0-9]*\).*/\1/p' <<< "$arm")
    a=$(sed -n 's/.*ACT=\(1\).*/\1/p' <<< "$arm")
    AB_BPW=${b:-${AB_BPW:-4.0}} AB_SEQ=$q AB_ACT=$a ab8b "arm=$arm" "$file" ${arm//,/ }
  done
}
if has h2 || has qtests; then  # the quantized-matmul GPU tests of the one-row path and mixed widths
  log "qmatmul GPU tests (one-row and mixed)"
  timeout "${QTEST_TIMEOUT:-300}" python3 -m pytest -m gpu -p no:cacheprovider \
    -k "${QTEST_K:-m1 or mixed or graph or epilogue}" tests/kernels/test_qmatmul.py 2>&1 | tee "$OUT/gpu_qmatmul.log" | tail -4
fi
if has gemvfixed; then  # batch-1 GEMV: fixed cost per launch and streaming rate, per arm (scripts/probe_gemv_fixed.py)
  log "batch-1 GEMV fixed cost (${FIXED_ARGS:-default arms})"
  python3 scripts/probe_gemv_fixed.py ${FIXED_ARGS:-} 2>&1 | tee "$OUT/gemv_fixed.txt" | grep -E "fixed|28672|Error"
fi
if has readfloor; then  # what a plain read, a copy and gpt-fast's int4 kernel reach on one matrix's bytes (context for 75%)
  log "read floor (scripts/probe_read_floor.py)"
  timeout 240 python3 scripts/probe_read_floor.py 2>&1 | tee "$OUT/read_floor.txt" | grep -vi warn
fi
if has cluster; then  # thread-block clusters for a Triton 3.6 kernel: a DSMEM sum against the shipped split-K reduction
  log "cluster reduction probe (scripts/probe_cluster_launch.py ${CLUSTER_ARGS:-})"
  timeout 150 python3 scripts/probe_cluster_launch.py ${CLUSTER_ARGS:-} 2>&1 | tee "$OUT/cluster.txt" | tail -14
fi
if has gemvdecode; then  # batch-1 matmul bandwidth inside the graph-replayed decode step, per shape and width
  log "batch-1 matmuls in the decode step (${GEMVDEC_WIDTHS:-2,3,4,5,6,8} bits)"
  python3 scripts/gemv_in_decode.py --widths ${GEMVDEC_WIDTHS:-2,3,4,5,6,8} 2>&1 | grep -v Warn | tee "$OUT/gemv_in_decode.txt"
fi
qtables() {  # the batch-1 qmatmul table (qtable: every batch), once per QUICK_ARMS entry (VAR=value[,...]):
  # $OUT/qmatmul.txt for the default arm, qmatmul_VAR_value.txt for the others
  local arm e f
  for arm in ${QUICK_ARMS:-default}; do
    e=; f="$OUT/qmatmul.txt"
    [ "$arm" = default ] || { e=${arm//,/ }; f="$OUT/qmatmul_${arm//[=,\/:]/_}.txt"; }
    log "qmatmul, arm $arm"
    env $e timeout ${QUICK_TIMEOUT:-600} python3 scripts/bench_qmatmul.py $(has qtable || echo --quick) ${QUICK_ARGS:-} 2>&1 \
      | tail -60 > "$f"
    grep -E "^ *(14336|4096 x 28672)" "$f"
  done
}
if (has quick || has qtable) && ! has bench8b; then qtables; fi  # the table alone (bench8b runs it after bandwidth)
if has h2; then  # packed-half decode (kernels/qmatmul_h2.py): A/B against the fp32 decode
  log "8B decode, EMBER_H2=0 (fp32 decode) / 1 (packed halves)"
  abarms h2.txt EMBER_H2=0 EMBER_H2=1
  for bpw in 2.5 3.0; do bench --synthetic llama3-8b --bpw $bpw --head-bits 8 --prompt-len 512 --gen-len 128; done
  log "qmatmul batch 1, EMBER_H2=0 / 1"
  for m in 0 1; do EMBER_H2=$m python3 scripts/bench_qmatmul.py --quick > "$OUT/qmatmul_h2_$m.txt" 2>&1; tail -14 "$OUT/qmatmul_h2_$m.txt"; done
fi
if has fuse; then  # the fused decode layer (models/llama.py, kernels/epilogue.py): A/B in one call
  log "8B decode, EMBER_FUSE=0 (separate norm / SiLU / rope / merge kernels) / 1 (fused)"
  abarms fuse.txt EMBER_FUSE=0 EMBER_FUSE=1 EMBER_FUSE=0 EMBER_FUSE=1
fi
if has stages; then  # one-row matmul variants (qmatmul.py, qmatmul_kernels._loop_fma): A/B in one call
  # arms: loop stages / programs per SM / stages of the wide outputs only, "-" = the launch tables'
  # (EMBER_GEMV_STAGES, _PER_SM, _WIDE_STAGES); the default arms compare the wide matrices pipelined 3 deep
  arms() { IFS=/ read -r st ps ws <<< "$1"; [ "$st" = - ] && st=; [ "$ps" = - ] && ps=; [ "${ws:--}" = - ] && ws=; }
  log "8B decode by one-row matmul variant (${GEMV_ARMS:=-/-/- -/-/3 -/-/- -/-/3})"
  for arm in $GEMV_ARMS; do
    arms "$arm"
    ab8b "arm=$arm" stages.txt EMBER_GEMV_STAGES=$st EMBER_GEMV_PER_SM=$ps EMBER_GEMV_WIDE_STAGES=$ws
  done
  if has stagetable; then
    for arm in $GEMV_ARMS; do
      arms "$arm"; f="$OUT/qmatmul_arm_${arm//\//_}.txt"; [ -f "$f" ] && continue
      EMBER_GEMV_STAGES=$st EMBER_GEMV_PER_SM=$ps EMBER_GEMV_WIDE_STAGES=$ws python3 scripts/bench_qmatmul.py --quick > "$f" 2>&1
    done
  fi
fi
if has base && [ -d .base ]; then  # this tree against an earlier one (git archive REV | tar -x -C .base, carried)
  # arms "tree/wide stages", both trees with the pipelined decode
  log "8B decode: .base ($(cat .base/REV 2>/dev/null)) against this tree (${BASE_ARMS:=base/3 new/3 base/3 new/3})"
  for arm in $BASE_ARMS; do
    IFS=/ read -r tree ws <<< "$arm"
    if [ "$tree" = base ]; then (cd .base && export PYTHONPATH=/tmp/site:$PWD && ab8b "arm=$arm" base.txt \
      EMBER_GEMV_WIDE_STAGES=$ws EMBER_ASYNC_DECODE=1)
    else ab8b "arm=$arm" base.txt EMBER_GEMV_WIDE_STAGES=$ws EMBER_ASYNC_DECODE=1; fi
  done
  for bpw in ${BASE_BPW:-}; do  # other widths, both trees (the base with the wide matrices pipelined too)
    (cd .base && export PYTHONPATH=/tmp/site:$PWD && AB_BPW=$bpw ab8b "bpw=$bpw base" base.txt \
      EMBER_GEMV_WIDE_STAGES=3 EMBER_ASYNC_DECODE=1)
    AB_BPW=$bpw ab8b "bpw=$bpw new" base.txt
  done
fi
if has ab; then  # AB_ARMS: space-separated arms, each VAR=value[,VAR=value]: one 8B decode row each (BPW=b: bpw)
  log "8B decode A/B (${AB_ARMS:?set AB_ARMS}) at ${AB_BPW:-4.0} bpw"
  abarms ab.txt $AB_ARMS
fi
if has async; then  # the pipelined streaming decode (engine/runner.py greedy_tokens): A/B in one call
  log "8B decode, EMBER_ASYNC_DECODE=0 (step, then read) / 1 (next step queued before the read)"
  abarms async.txt EMBER_ASYNC_DECODE=0 EMBER_ASYNC_DECODE=1 EMBER_ASYNC_DECODE=0 EMBER_ASYNC_DECODE=1
fi
if has bench8b; then
  log "bandwidth"; python3 bench/baselines/bandwidth.py | tee "$OUT/bandwidth.txt"
  if (has quick || has qtable) && ! has noqm; then qtables; fi
  log "ember llama3-8b"
  bench --synthetic llama3-8b --bpw 4.0 --head-bits 8 --prompt-len 512 --gen-len 128
  bench --synthetic llama3-8b --bpw 4.0 --head-bits 8 --prompt-len 2048 --gen-len 128
  has nogptq || bench --model /tmp/l3gptq --prompt-len 512 --gen-len 128
fi
if has fp8; then  # the same 8B rows with the prompt's matmuls on fp8 tensor cores (kernels/qmatmul_fp8.py)
  log "ember llama3-8b, --fp8-prefill"
  for pl in 512 2048; do bench --synthetic llama3-8b --bpw 4.0 --head-bits 8 --prompt-len $pl --gen-len 128 --fp8-prefill; done
  has nogptq || bench --model /tmp/l3gptq --prompt-len 512 --gen-len 128 --fp8-prefill
fi
if has exl2; then
  [ -n "${BUILD:-}" ] && wait $BUILD; log "exllamav2 llama3-8b GPTQ"; tail -3 "$OUT/exl2_build.log"
  python3 bench/baselines/bench_exl2.py /tmp/l3gptq 512 128 2>&1 | grep -E "exl2" | tee "$OUT/exl2_8b_512.txt"
  python3 bench/baselines/bench_exl2.py /tmp/l3gptq 2048 128 2>&1 | grep -E "exl2" | tee "$OUT/exl2_8b_2048.txt"
fi
if has bench8b && has full; then
  log "ember llama3-8b, more"
  for hb in 6 16; do bench --synthetic llama3-8b --bpw 4.0 --head-bits $hb --prompt-len 512 --gen-len 128; done
  for bpw in 2.5 3.0 5.0 6.0; do bench --synthetic llama3-8b --bpw $bpw --head-bits 8 --prompt-len 512 --gen-len 128; done
  bench --model /tmp/l3gptq --prompt-len 2048 --gen-len 128
  log "profile"; python3 scripts/profile_decode.py llama3-8b 4.0 > "$OUT/profile.txt" 2>&1; tail -34 "$OUT/profile.txt"
fi
if has batch || (has bench8b && has full); then  # batched decode (several sequences a step)
  log "ember llama3-8b, batch 8 and 32"
  for b in 8 32; do bench --synthetic llama3-8b --bpw 4.0 --batch $b --prompt-len 512 --gen-len 64; done
fi
if has pdl; then
  log "PDL modes (EMBER_PDL=0 off, 1 wait at start, 2 first weight tile before the wait)"
  abarms pdl.txt EMBER_PDL=0 EMBER_PDL=1 EMBER_PDL=2
fi
if has profile; then
  log "profile"; python3 scripts/profile_decode.py llama3-8b 4.0 > "$OUT/profile.txt" 2>&1; tail -60 "$OUT/profile.txt"
fi
if has gprofile; then  # the decode step as the engine replays it (graph, PDL): scripts/profile_graph.py, per arm
  for arm in ${PROFILE_ARMS:-default}; do
    log "graph timeline, arm $arm"; f="$OUT/profile_graph_${arm//[=,]/_}.txt"
    a=$(sed -n 's/.*ACT=\(1\).*/\1/p' <<< "$arm"); [ "$arm" = default ] && arm=
    env ${arm//,/ } python3 scripts/profile_graph.py llama3-8b ${AB_BPW:-4.0} 8 512 ${a:+act} > "$f" 2>&1
    grep -E "kernels a step|layers add|^ *[0-9]+ +[0-9.]+ +[-0-9.]+ +[-0-9.]+  " "$f" | head -24
  done
fi
if has pprofile; then  # one eager prefill's GPU time by kernel (scripts/profile_prefill.py), per PPROFILE_ARMS entry
  for arm in ${PPROFILE_ARMS:-plain act}; do  # plain: the synthetic layout; act: the converter's (--act-order);
    for n in ${PPROFILE_LENS:-512}; do  # graph: the engine's CUDA-graph prefill, with its wall and replay times
      log "prefill kernels, $arm, $n tokens"
      python3 scripts/profile_prefill.py llama3-8b ${AB_BPW:-4.0} $n $arm 2>&1 | grep -v Warn \
        | tee "$OUT/profile_prefill_${arm}_$n.txt" | head -24
    done
  done
fi
if has sweep; then
  log "qmatmul sweep${SWEEP_ENV:+ ($SWEEP_ENV)}"
  sweep_env=${SWEEP_ENV:-}
  env ${sweep_env//,/ } python3 scripts/sweep_qmatmul.py --widths ${SWEEP_WIDTHS:-4} \
    --shapes ${SWEEP_SHAPES:-4096x6144,4096x4096,14336x4096} \
    ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep.txt" | tail -12
fi
if has overlap; then  # prefill matmuls: dequantize the next weight on a second stream beside cuBLAS
  log "prefill matmuls: serial dequant + cuBLAS vs dequantize-ahead on a second stream"
  for arm in ${OVERLAP_ENVS:-default}; do  # each run's environment, VAR=value[,VAR=value]
    e=; [ "$arm" = default ] || e=${arm//,/ }
    env $e python3 scripts/bench_prefill_overlap.py ${OVERLAP_ARGS:-} 2>&1 | grep -v Warning | sed "s|^|$arm |" \
      | tee -a "$OUT/prefill_overlap.txt" | tail -40
  done
fi
if has qgemm; then  # the fused dequantize-GEMM's tile configs against dequantize + cuBLAS (scripts/sweep_qgemm.py)
  log "prompt-sized 4-bit matmuls: qgemm configs, dequant + cuBLAS, cuBLAS alone"
  python3 scripts/sweep_qgemm.py ${QGEMM_ARGS:-} 2>&1 | tee "$OUT/sweep_qgemm.txt" | grep -v '^{' | tail -14
fi
if has prefillgemm; then
  log "prefill-sized matmuls: dequant + cuBLAS vs the fused dequant-GEMM"
  python3 scripts/sweep_prefill_gemm.py ${PREFILL_SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep_prefill.txt" | grep -v skip | tail -12
fi
if has gptq8b; then  # ember on the very GPTQ checkpoint ExLlamaV2 runs
  [ -d /tmp/l3gptq ] || python3 bench/baselines/make_gptq_random.py llama3-8b /tmp/l3gptq
  log "ember llama3-8b GPTQ folder"
  bench --model /tmp/l3gptq --prompt-len 512 --gen-len 128
fi
if has bench70b || has ember70b; then
  log "ember llama2-70b"
  for bpw in ${B70_BPW:-4.0 2.5}; do bench --synthetic llama2-70b --bpw $bpw --head-bits 8 --prompt-len 512 --gen-len 64; done
fi
if has bench70b; then
  rm -rf /tmp/l3gptq; python3 bench/baselines/make_gptq_random.py llama2-70b /tmp/l70gptq
  wait $BUILD; log "exllamav2 llama2-70b GPTQ"
  python3 bench/baselines/bench_exl2.py /tmp/l70gptq 512 64 2>&1 | grep -E "exl2" | tee "$OUT/exl2_70b.txt"
fi
if has bpw; then
  log "ember llama3-8b by bpw"
  for bpw in 2.5 3.0 5.0 6.0; do bench --synthetic llama3-8b --bpw $bpw --head-bits 8 --prompt-len 512 --gen-len 128; done
  bench --synthetic llama3-8b --bpw 4.0 --head-bits 6 --prompt-len 512 --gen-len 128
fi
if has attn; then
  log "decode attention at batch 1 (splits / block)"
  python3 scripts/bench_attention.py decode_short decode_rope > "$OUT/attention.txt" 2>&1
  python3 -c "import json; d = json.load(open('$OUT/attention.json')); [print(r) for k in ('decode_short', 'decode_rope') for r in d[k]]" 2>&1 | tail -20
fi
if has tests && ! has testsfirst; then run_tests; fi
log "done"
pack
