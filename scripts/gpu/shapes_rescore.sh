#!/usr/bin/env bash
# Issue 20: the shapes tables again, scored by the fixed judge (rcm_core/eval/geneval.py after commit d49186f).
# The students of the published side-by-side table were not kept, so this re-runs that recipe
# (scripts/gpu/shapes_sweep.sh with its default variants rCM / sCM / DMD: two sittings of 8.6 + 7.0 minutes,
# each student sharing the GPU with the others) and then `rcm bench shapes` with the fixed judge. Students trained
# for minutes differ from run to run (steps depend on GPU speed), so the new rows are the same recipe re-run, not
# the same students re-scored; the teacher phase re-scores the shipped teacher itself.
#
# Phases (one device call each; each under its own `timeout`, writing to $OUT as it goes):
#   PHASE=teacher  (~2 min) the shipped teacher's rows alone: rcm bench shapes --teacher-only -> $OUT/teacher/
#   PHASE=train1   (<= 9.8 min) first sitting of the side-by-side sweep (RESUME=1 MINUTES=8.6 SKIP_BENCH=1)
#   PHASE=train2   (<= 9.8 min) second sitting on the still-warm machine (RESUME=required MINUTES=7.0)
#   PHASE=bench    (<= 9 min) rcm bench shapes over the three students + teacher -> $OUT/bench/ (table.md,
#                  report.json, grid.png, images.npz for re-scoring with any judge: rcm bench shapes --rescore)
#   PHASE=all      the four in order (a machine without the 10-minute call limit)
# The runs live in $RUNS (default runs/shapes-rescore-runs, git-ignored under runs/): train2 and bench need the
# same warm machine as train1. Device tool: kind nvidia-h200, timeout_s 600, no carry needed (no diffusers).
# SMOKE=1: a CPU dry run of every phase with tiny settings (seconds of training, 12 images), e.g.
#   SMOKE=1 OUT=/tmp/rescore PY=.venv/bin/python PHASE=all bash scripts/gpu/shapes_rescore.sh
set -uo pipefail
PY=${PY:-python3}
PHASE=${PHASE:-teacher}
[ -n "${OUT:-}" ] || { echo "OUT is not set (the device tool sets it)"; exit 2; }
RUNS=${RUNS:-runs/shapes-rescore-runs}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUNS"
if [ "${SMOKE:-0}" = 1 ]; then
  NUM_SAMPLES=12; DIV=2; TEACHER_STEPS=2,1; M1=0.02; M2=0.02; BATCH=2
  VARIANTS="rCM|configs/shapes-rcm.yaml|data.pool_size=0 train.log_every=1 train.device=cpu
sCM|configs/shapes-scm.yaml|data.pool_size=0 train.log_every=1 train.device=cpu
DMD|configs/shapes-dmd.yaml|data.pool_size=0 train.log_every=1 train.device=cpu"
  T_TEACHER=300; T_TRAIN=300; T_BENCH=600
else
  NUM_SAMPLES=${NUM_SAMPLES:-1008}; DIV=${DIV:-32}; TEACHER_STEPS=50,4; M1=8.6; M2=7.0; BATCH=128
  VARIANTS=""  # the sweep's defaults: rCM, sCM, DMD (configs/shapes-{rcm,scm,dmd}.yaml)
  T_TEACHER=300; T_TRAIN=590; T_BENCH=540
  nvidia-smi -L || true
fi

phase() {  # phase NAME LIMIT CMD...: one phase under its own limit, its log kept in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   $name exit $rc after $((SECONDS - start)) s (log $OUT/$name.log)"
  tail -n 20 "$OUT/$name.log" | grep -E '^\|' || tail -n 5 "$OUT/$name.log"
  return $rc
}
sweep() {  # sweep SITTING MINUTES RESUME: one sitting of the side-by-side sweep
  local env_=(OUT="$OUT/sweep" RUNS="$RUNS" MINUTES="$2" RESUME="$3" SKIP_BENCH=1 BATCH="$BATCH")
  [ -z "$VARIANTS" ] || env_+=(VARIANTS="$VARIANTS")
  phase "$1" "$T_TRAIN" env "${env_[@]}" PATH="$(dirname "$(command -v "$PY")"):$PATH" bash scripts/gpu/shapes_sweep.sh
}

rc=0
case "$PHASE" in teacher | all)
  phase teacher "$T_TEACHER" "$PY" -m rcm_core.cli bench shapes --teacher-only --out "$OUT/teacher" \
    --num-samples "$NUM_SAMPLES" --diversity-samples "$DIV" --teacher-steps "$TEACHER_STEPS" || rc=1 ;;
esac
case "$PHASE" in train1 | all) sweep train1 "$M1" 1 || rc=1 ;; esac
case "$PHASE" in train2 | all) sweep train2 "$M2" required || rc=1 ;; esac
case "$PHASE" in bench | all)
  phase bench "$T_BENCH" "$PY" -m rcm_core.cli bench shapes --out "$OUT/bench" \
    --run rCM="$RUNS/rCM" --run sCM="$RUNS/sCM" --run DMD="$RUNS/DMD" \
    --num-samples "$NUM_SAMPLES" --diversity-samples "$DIV" --teacher-steps "$TEACHER_STEPS" || rc=1 ;;
esac
case "$PHASE" in teacher | train1 | train2 | bench | all) ;; *) echo "PHASE must be teacher|train1|train2|bench|all"; exit 2 ;; esac
exit $rc
