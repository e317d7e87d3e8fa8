#!/usr/bin/env bash
# The shapes benchmark's GPU schedule: rCM, sCM-only and DMD-only students of the shipped teacher, trained side
# by side on one GPU for MINUTES each, then `rcm bench shapes` (table, report, grid) into OUT.
set -euo pipefail
OUT=${OUT:-runs/gpu-distill}; MINUTES=${MINUTES:-6}; RUNS=${RUNS:-runs/gpu-students}
mkdir -p "$OUT" "$RUNS"; pids=()
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L || true
METHODS=${METHODS:-rcm scm dmd}
for m in $METHODS; do
  python3 -m rcm_core.cli distill "configs/shapes-$m.yaml" --no-resume --no-eval \
    --set train.steps=100000 --set train.max_minutes="$MINUTES" --set train.batch_size=64 \
    --set train.log_every=100 --set train.checkpoint_every=0 --set loss.tangent_warmup_steps=200 \
    --set data.pool_size=200000 \
    --set train.output_dir="$RUNS/$m" ${EXTRA:-} > "$OUT/distill-$m.log" 2>&1 &
  pids+=($!)
done
fail=0; for p in "${pids[@]}"; do wait "$p" || fail=1; done
tail -n 12 "$OUT"/distill-*.log
[ "$fail" = 0 ] || { echo "a distillation run failed" >&2; exit 1; }
declare -A LABEL=([rcm]=rCM [scm]=sCM [dmd]=DMD); runs=()
for m in $METHODS; do runs+=(--run "${LABEL[$m]}=$RUNS/$m"); done
python3 -m rcm_core.cli bench shapes "${runs[@]}" \
  --out "$OUT" --num-samples "${NUM_SAMPLES:-1008}" ${BENCH_EXTRA:-} 2>&1 | tee "$OUT/bench.log"
