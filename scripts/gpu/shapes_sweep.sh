#!/usr/bin/env bash
# Several shapes distillations side by side on one GPU, then one `rcm bench shapes` over all of them.
#   VARIANTS: one "label|config|overrides" per line (overrides: space-separated KEY=VALUE for --set)
#   MINUTES (training time each), BATCH, OUT, RUNS, NUM_SAMPLES, BENCH_EXTRA (e.g. --student-mid-times 1.3,1.0,0.6)
#   RESUME=1: continue each run from its latest checkpoint (a schedule longer than one sitting), and with
#   RESUME=required stop before starting anything if a run has no complete checkpoint; SKIP_BENCH=1: train only
#   (a later sitting benchmarks).
# Every run uses the GPU schedule's common settings below; a variant's overrides come last and win.
set -euo pipefail
set -f  # overrides are split on spaces, never globbed ([1.1,0.8] is a bracket pattern)
OUT=${OUT:-runs/gpu-sweep}; MINUTES=${MINUTES:-6}; RUNS=${RUNS:-runs/gpu-sweep-runs}; BATCH=${BATCH:-128}
RESUME=${RESUME:-0}; SKIP_BENCH=${SKIP_BENCH:-0}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L || true
VARIANTS=${VARIANTS:-"rCM|configs/shapes-rcm.yaml|
sCM|configs/shapes-scm.yaml|
DMD|configs/shapes-dmd.yaml|"}

# Check every variant before starting any, so a refusal leaves nothing running.
if [ "$RESUME" = required ]; then
  while IFS='|' read -r label _ _; do
    [ -n "$label" ] || continue
    if ! compgen -G "$RUNS/$label/checkpoints/step-*/manifest.json" > /dev/null; then
      echo "[sweep] RESUME=required but $RUNS/$label has no complete checkpoint" >&2; exit 3
    fi
  done <<< "$VARIANTS"
fi

pids=(); labels=(); dirs=()
stop_all() { [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2> /dev/null || true; }
trap 'stop_all; exit 130' INT TERM
while IFS='|' read -r label config overrides; do
  [ -n "$label" ] || continue
  dir="$RUNS/$label"; sets=(); resume=(--no-resume)
  [ "$RESUME" = 0 ] || resume=()
  for kv in $overrides; do sets+=(--set "$kv"); done
  python3 -m rcm_core.cli distill "$config" "${resume[@]}" --no-eval \
    --set train.steps=100000 --set train.max_minutes="$MINUTES" --set train.batch_size="$BATCH" \
    --set train.log_every=100 --set train.checkpoint_every=0 --set loss.tangent_warmup_steps=200 \
    --set data.pool_size=200000 --set train.output_dir="$dir" "${sets[@]}" >> "$OUT/distill-$label.log" 2>&1 &
  pids+=($!); labels+=("$label"); dirs+=("$dir")
  echo "[sweep] started $label: $config $overrides"
done <<< "$VARIANTS"
fail=0; for p in "${pids[@]}"; do wait "$p" || fail=1; done
for l in "${labels[@]}"; do echo "== $l"; tail -n 3 "$OUT/distill-$l.log"; done
[ "$fail" = 0 ] || { echo "a distillation run failed" >&2; exit 1; }
[ "$SKIP_BENCH" = 1 ] && exit 0
runs=(); for i in "${!labels[@]}"; do runs+=(--run "${labels[$i]}=${dirs[$i]}"); done
python3 -m rcm_core.cli bench shapes "${runs[@]}" \
  --out "$OUT" --num-samples "${NUM_SAMPLES:-1008}" ${BENCH_EXTRA:-} 2>&1 | tee "$OUT/bench.log"
