#!/bin/bash
# Issue 17 item 6: the rCM step of Wan2.1-T2V-1.3B at 480p x 81 frames and one Wan2.1-14B block, on one H200.
# Run on one H200 on 2026-12-05 (results: docs/perf/wan_2026-12-05_h200/, docs/perf/wan.md); the 8-GPU part not yet. Three parts:
#
#   1. here, with network access (once per checkout; the wheels are git-ignored, so a fresh checkout needs it):
#        bash docs/perf/pending_gpu_run_wan.sh prepare
#      downloads the diffusers and accelerate wheels pinned in constraints.txt into .whl/ (6.7 MB). The GPU image
#      has no diffusers and no network; it has torch 2.11, triton 3.6 and huggingface_hub 1.33 (diffusers 0.42.1
#      needs >=1.32: used as it is there; the pinned 2.4.0 would need httpx2, which the image lacks).
#   2. on the GPU, one call of the device tool (kind nvidia-h200, timeout_s 600, carry [".whl"]):
#        bash docs/perf/pending_gpu_run_wan.sh
#      installs the wheels into /tmp/site and runs, each under its own time limit (420 s in all, so that with
#      the machine's start the call stays under 9 minutes of device time; a part cut short keeps every phase it
#      finished, as the script writes its JSON and table after each):
#        A (180 s) 1.3B, fused attention, full checkpointing: forward, JVP, fwd+bwd and the rCM step
#        B (100 s) 14B: one block at 32,760 tokens and at a CP=8 rank's share, and the 14B-on-8-GPUs projection
#                  from A's counted passes
#        C  (50 s) 1.3B, math attention in the JVP (expected: out of memory; recorded, not raised)
#        D  (90 s) 1.3B, fused attention: the rCM step under selective and no checkpointing
#      Tables go to stdout and $OUT (wan_*.md), everything (JSON, logs) into $OUT/results.tar.gz.
#   3. when the 8-GPU kind is lent (nvidia-h200-x8, timeout_s 600, carry [".whl"]):
#        bash docs/perf/pending_gpu_run_wan.sh 14b-cp8
#      the real 14B rCM step on 8 GPUs with CP=8 (torchrun; nets built on meta, each rank materialising its
#      shards), then the one-GPU block measurement on GPU 0 with the projection from that run's own counted
#      passes: the measured step and its projection side by side.
#   4. issue 21, the whole 8-GPU matrix in one call (nvidia-h200-x8, timeout_s 600, carry [".whl"]):
#        bash docs/perf/pending_gpu_run_wan.sh 14b-8gpu
#      the 14B rCM step (teacher, student, EMA, fake score; fused attention) under CP=8 and CP=4 x FSDP=2, each
#      with full and selective checkpointing: four torchrun calls of tests/benchmarks/bench_wan_parallel.py (1
#      warm-up, 2 timed and 1 profiled step each; an OOM is recorded as the configuration's result) under limits
#      capped at 140 + 130 + 190 + 150 s and 540 s in all, then the table: $OUT/wan_parallel.md and .json (step
#      time, peak memory per GPU, tokens/s per GPU, MFU, all-to-all / all-gather / reduce-scatter vs compute from
#      torch.profiler) with the one-GPU projection as a row of its own. Supersedes 14b-cp8 (which measures only CP=8 with full AC).
#      CPU check (tiny net, 4 gloo ranks: CP=4 and CP=2 x FSDP=2):
#        PY=.venv/bin/python EXTRA=--tiny NPROC=4 OUT=/tmp/wan8 bash docs/perf/pending_gpu_run_wan.sh 14b-8gpu
# Smoke check of this script on a CPU (tiny configs, same parts and files): PY=.venv/bin/python EXTRA=--tiny
#   OUT=/tmp/wan bash docs/perf/pending_gpu_run_wan.sh
set -u
PY=${PY:-python3}
if [ "${1:-}" = prepare ]; then
  pins=$(grep -E '^(diffusers|accelerate)==' constraints.txt)
  mkdir -p .whl
  # pure-Python wheels; the platform flags only satisfy pip's --python-version rule (the GPU image runs 3.12)
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins || exit 1
  sha256sum .whl/*.whl
  exit 0
fi
[ -n "${OUT:-}" ] || { echo "OUT is not set (the device tool sets it)"; exit 2; }
ls .whl/diffusers-*.whl > /dev/null || { echo "no .whl/diffusers-*.whl: run 'bash $0 prepare' here first"; exit 2; }
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
$PY -c "import torch, triton, diffusers, accelerate, huggingface_hub as h; print('torch', torch.__version__,
  'triton', triton.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__,
  'huggingface_hub', h.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" \
  || exit 1
R=$OUT/r
mkdir -p "$R"
B=tests/benchmarks/bench_wan_step.py
# NVLink multicast stays off (the device notes: it can take a shared host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
run() {  # run SECONDS LOG ARGS...: one part under its own limit, its output kept whole in LOG
  local limit=$1 log=$2
  shift 2
  echo "== $*"
  timeout "$limit" $PY $B --out "$R" ${EXTRA:-} "$@" > "$R/$log" 2>&1
  echo "   exit $? ($log)"
}
if [ "${1:-}" = 14b-8gpu ]; then
  # Issue 21: the 14B rCM step on one 8-GPU host, 2 meshes x 2 checkpointing policies, one torchrun each (a
  # configuration that runs out of memory, or hangs, costs only its own limit). 540 s in all: each configuration
  # gets its cap, or less so that the ones after it keep their reserve; one that ends early (e.g. an OOM) leaves
  # its time to the next
  P=tests/benchmarks/bench_wan_parallel.py
  NPROC=${NPROC:-8}
  T0=$SECONDS
  par() {  # par CAP RESERVE LABEL CP AC: one configuration; its exit code goes next to its rank files
    local limit=$((540 - (SECONDS - T0) - $2)) port
    [ "$limit" -gt "$1" ] && limit=$1
    port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    echo "== $3: torchrun $NPROC ranks, CP=$4, AC $5 (limit $limit s)"
    # --budget-s: what is left once torchrun and the imports have started (about 15 s), for the profiled step
    timeout -k 5 "$limit" $PY -m torch.distributed.run --nproc-per-node "$NPROC" --master-addr 127.0.0.1 \
      --master-port "$port" $P --out "$R" ${EXTRA:-} --cp-degree "$4" --activation-checkpoint "$5" --steps 2 \
      --budget-s $((limit - 15)) --label "$3" > "$R/$3.log" 2>&1
    local rc=$?
    echo "$rc" > "$R/wan_par_$3.exit"
    echo "   exit $rc after $((SECONDS - T0)) s in all ($3.log)"
  }
  CP_A=$NPROC CP_B=$((NPROC / 2))  # CP over all ranks; CP over half of them x FSDP (data parallel) 2
  par 140 330 cp${CP_A}_full "$CP_A" full
  par 130 220 cp${CP_A}_selective "$CP_A" selective
  par 190 110 cp${CP_B}_fsdp2_full "$CP_B" full
  par 150 0 cp${CP_B}_fsdp2_selective "$CP_B" selective
  $PY $P --table "$R" --projection docs/perf/wan_2026-12-05_h200/wan_block_14b.json > "$R/table.log" 2>&1
  echo "   table exit $?"
  cp "$R"/wan_parallel.json "$OUT/" 2> /dev/null
elif [ "${1:-}" = 14b-cp8 ]; then
  echo "== torchrun, 8 ranks: 14B rCM step, CP=8"
  timeout 330 $PY -m torch.distributed.run --nproc-per-node 8 --master-addr 127.0.0.1 $B --out "$R" ${EXTRA:-} \
    --model 14B --cp-degree 8 --attention fused --activation-checkpoint full --phases step --steps 2 \
    --label 14b_cp8 > "$R/e_14b_cp8.log" 2>&1
  echo "   exit $? (e_14b_cp8.log)"
  CUDA_VISIBLE_DEVICES=0 run 150 f_block14b.log --block-only --reps 2 --passes-from "$R/wan_step_14b_cp8.json" \
    --label 14b_cp8_projection
else
run 180 a_fused_full.log --attention fused --activation-checkpoint full --reps 2 --steps 2 --label fused_full
run 100 b_block14b.log --block-only --reps 2 --passes-from "$R/wan_step_fused_full.json" --label 14b
run 50 c_mathjvp.log --attention math-jvp --activation-checkpoint full --phases forward,jvp,step --steps 1 \
  --label mathjvp_full
run 90 d_fused_ac.log --attention fused --activation-checkpoint selective,none --phases step --steps 1 \
  --label fused_selective_none
fi
for f in "$R"/wan_*.md; do  # wan_parallel.md has no FLOP legend: printed whole
  [ -f "$f" ] || continue
  echo "== $(basename "$f")"
  sed '/^Model FLOPs:/,$d' "$f"
  cp "$f" "$OUT/"
done
(cd "$OUT" && tar czf results.tar.gz r && rm -rf r)
