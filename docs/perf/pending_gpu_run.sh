#!/bin/bash
# Not yet run (no GPU was lent after the baseline call, 2026-12-04). Run from the repo root on one H200:
#   bash docs/perf/pending_gpu_run.sh   (OUT=dir for results; about 7 minutes)
# the step table under three checkpointing policies, loss traces (compare with rcm_step_2026-12-04_baseline.json
# "losses"), GPU tests of the changed attention / DiT paths
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-runs/perf}
R=$OUT/r; mkdir -p $R
B=tests/benchmarks/bench_rcm_step.py
run() { echo "== $*"; timeout ${T:-200} python3 "$@" 2>&1 | grep -v "Warning\|warn(" ; }
T=120 run $B --out $R --dits "" --loss-steps 20 --label loss_new_full > $R/loss.log
RCM_ATTN_FUSED_JVP=0 T=120 run $B --out $R --dits "" --loss-steps 20 --label loss_new_full_nofusedjvp >> $R/loss.log
T=120 run $B --out $R --dits "" --loss-steps 20 --activation-checkpoint selective --label loss_new_selective >> $R/loss.log
grep losses $R/loss.log
for ac in selective full none; do
  T=200 run $B --out $R --dits 0.41B,1.42B --reps 3 --steps 2 --activation-checkpoint $ac --label $ac $( [ $ac = full ] && echo --profile ) > $R/step_$ac.log
  grep -A4 "^| DiT" $R/step_$ac.log; grep -i "error\|Traceback" $R/step_$ac.log | head -5
done
timeout 150 python3 -m pytest -q -x tests/kernels/test_dit_fused.py tests/kernels/test_attention_jvp.py -k "func_jvp or forward_ad or nested or dit or large" -p no:cacheprovider > $R/gpu_tests.log 2>&1; tail -3 $R/gpu_tests.log
cd $OUT && tar czf results.tar.gz r && rm -rf r
