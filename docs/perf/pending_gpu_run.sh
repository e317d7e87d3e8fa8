#!/bin/bash
# Issue 19: the GPU measurement of this branch's changes, written and NOT yet run (no GPU was lent after the
# baseline call on 2026-12-04). From the repo root on one H200 (about 9 minutes; results tarred into $OUT):
#   OUT=runs/perf bash docs/perf/pending_gpu_run.sh
# 1. loss traces, 20 rCM steps (0.41B width, 4,096 tokens), to compare with "losses" in
#    rcm_step_2026-12-04_baseline.json: RCM_ATTN_FUSED_JVP=0 should be bitwise equal to the baseline (Linear,
#    block split, modulate are bitwise on the CPU); the fused JVP kernel and fused adaLN within bf16 rounding;
#    selective checkpointing bitwise equal to full;
# 2. the step table under none / full / selective checkpointing, and with the compiled fused adaLN;
# 3. GPU tests of the changed attention, DiT and adaLN paths.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-runs/perf}
R=$OUT/r
mkdir -p "$R"
B=tests/benchmarks/bench_rcm_step.py
run() { echo "== $*"; timeout "${T:-200}" python3 "$@" 2>&1 | grep -v "Warning\|warn(" ; }
T=120 run $B --out "$R" --dits "" --loss-steps 20 --label loss_full > "$R/loss.log"
RCM_ATTN_FUSED_JVP=0 T=120 run $B --out "$R" --dits "" --loss-steps 20 --label loss_full_unfusedjvp >> "$R/loss.log"
T=120 run $B --out "$R" --dits "" --loss-steps 20 --activation-checkpoint selective --label loss_selective >> "$R/loss.log"
RCM_FUSED_ADALN=compile T=150 run $B --out "$R" --dits "" --loss-steps 20 --label loss_full_adaln >> "$R/loss.log"
grep losses "$R/loss.log"
for ac in selective full none; do
  extra=""
  [ $ac = full ] && extra=--profile
  T=200 run $B --out "$R" --dits 0.41B,1.42B --reps 3 --steps 2 --activation-checkpoint $ac --label $ac $extra \
    > "$R/step_$ac.log"
  grep -A4 "^| DiT" "$R/step_$ac.log"
done
RCM_FUSED_ADALN=compile T=200 run $B --out "$R" --dits 1.42B --reps 3 --steps 2 --activation-checkpoint selective \
  --label selective_adaln --profile > "$R/step_selective_adaln.log"
grep -A4 "^| DiT" "$R/step_selective_adaln.log"
timeout 200 python3 -m pytest -q -x tests/kernels/test_dit_fused.py tests/unit/test_adaln.py tests/unit/test_linear.py \
  tests/kernels/test_attention_jvp.py -k "func_jvp or forward_ad or nested or dit or large or adaln or linear" \
  -p no:cacheprovider > "$R/gpu_tests.log" 2>&1
tail -3 "$R/gpu_tests.log"
cd "$OUT" && tar czf results.tar.gz r && rm -rf r
