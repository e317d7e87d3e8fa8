#!/usr/bin/env bash
# Issue 20: the moving-shapes text-to-video benchmark on one GPU, in phases; each part runs under its own `timeout`
# and writes to $OUT as it goes. One device-tool call per phase: kind nvidia-h200, timeout_s 600, carry [".whl"]
# (the diffusers + accelerate wheels: run `bash docs/perf/pending_gpu_run_wan.sh prepare` here once first).
#
#   bash scripts/gpu/moving_shapes.sh teacher
#       trains the Wan2.1-architecture teacher for TRAIN_SECONDS (default 420) on a GPU-side pool of 150k clips,
#       then sweeps CFG (SCALES, default 2,3,4.5) over the evaluation prompts and records the best as the default
#       sampler. Back in $OUT: moving_shapes_teacher/ (config.json, diffusion_pytorch_model.safetensors,
#       moving_shapes.json, README.md: the folder to commit as rcm_core/assets/moving_shapes_teacher/),
#       teacher.log, teacher_samples.png/.gif/.txt (8 prompts, frames left to right).
#       INIT=<teacher folder> continues training from it (a second sitting, on a pool drawn with seed 1; BATCH
#       sets the batch, default 256), when one sitting's teacher scores too low.
#   bash scripts/gpu/moving_shapes.sh distill
#       needs the teacher folder at TEACHER (default rcm_core/assets/moving_shapes_teacher, where the teacher
#       phase's folder is committed). Writes COUNT (50,000) train clips as rcm-latents-v1 shards with the teacher's
#       text encoder, then trains four students CONCURRENTLY on the one GPU, each for MINUTES (4.5) under its own
#       timeout through `rcm distill` (the diffusers task, fused JVP kernel): rCM seed 0 and seed 1, sCM-only and
#       DMD-only (configs/moving-shapes-{rcm,scm,dmd}-gpu.yaml, CFG = the teacher's default), each ending with
#       the task's own evaluation; then `rcm bench moving-shapes` over the teacher and the four runs if this
#       checkout has it. Run folders (checkpoints: large) stay in RUNS (a new /tmp/ms-runs.*); back in $OUT:
#       distill.md (each run's last lines and evaluation), runs.tar.gz (logs, configs, evaluation reports and
#       grids), bench.tar.gz and the bench's own *.md / *.json / *.png / *.gif (at most 4) when it ran.
#
# The teacher's metadata records the git commit: the GPU copy of the tree has no .git, so pass
# RCM_GIT_COMMIT=<hash> in the command. CPU dry run of the same parts and files with tiny settings:
#   SMOKE=1 OUT=/tmp/ms bash scripts/gpu/moving_shapes.sh teacher
#   SMOKE=1 OUT=/tmp/ms-d TEACHER=/tmp/ms/moving_shapes_teacher bash scripts/gpu/moving_shapes.sh distill
set -u
PHASE=${1:-}
case "$PHASE" in teacher | distill) ;; *) echo "usage: $0 teacher|distill" >&2; exit 2 ;; esac
[ -n "${OUT:-}" ] || { echo "OUT is not set (the device tool sets it)" >&2; exit 2; }
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  export PYTHONPATH=$PWD
else
  PY=${PY:-python3}
  ls .whl/diffusers-*.whl > /dev/null 2>&1 \
    || { echo "no .whl/diffusers-*.whl: run 'bash docs/perf/pending_gpu_run_wan.sh prepare' here first" >&2; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
# NVLink multicast stays off (the device notes: it can take a shared host's GPUs out of service)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ "${SMOKE:-0}" != 1 ]; then  # what ran where, for the log (a smoke run skips the extra interpreter start)
  $PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', flush=True)" || exit 1
fi

if [ "$PHASE" = teacher ]; then
  T=$OUT/moving_shapes_teacher
  if [ "${SMOKE:-0}" = 1 ]; then
    TRAIN_SECONDS=${TRAIN_SECONDS:-5}
    SCALES=${SCALES:-1.5,3}
    SWEEP_ARGS="--max-prompts 24"
    SETS="--set num_layers=1 --set num_attention_heads=2 --set attention_head_dim=16 --set ffn_dim=32
      --set freq_dim=32 --set text_dim=16 --set steps=6 --set batch_size=4 --set log_every=2 --set pool_size=64
      --set sample_steps=2"
  else
    TRAIN_SECONDS=${TRAIN_SECONDS:-420}
    SCALES=${SCALES:-2,3,4.5}
    SWEEP_ARGS=""
    SETS="--set batch_size=${BATCH:-256} --set steps=1000000 --set pool_size=150000 --set pool_workers=14
      --set log_every=200"
  fi
  # a second sitting continues from a teacher folder (the first sitting's, committed or carried) on fresh clips
  [ -z "${INIT:-}" ] || SETS="$SETS --set init=$INIT --set seed=${INIT_SEED:-1}"
  echo "== teacher: train for ${TRAIN_SECONDS}s -> $T"
  # shellcheck disable=SC2086  # SETS is a list of arguments
  timeout $((TRAIN_SECONDS + 120)) $PY -m rcm_core.cli teacher train --preset moving-shapes --out "$T" --no-eval \
    --set max_seconds="$TRAIN_SECONDS" $SETS ${EXTRA:-} > "$OUT/teacher.log" 2>&1
  echo "   exit $? (teacher.log)"
  tail -n 3 "$OUT/teacher.log"
  [ -f "$T/config.json" ] || { echo "no teacher was saved" >&2; exit 1; }
  echo "== teacher: CFG sweep ($SCALES) over the evaluation prompts"
  # what is left of the device call's 600 s (a sweep cut short keeps the training's default guidance, 3)
  left=${SWEEP_SECONDS:-$((${BUDGET_SECONDS:-590} - SECONDS))}
  # shellcheck disable=SC2086  # SWEEP_ARGS is a list of arguments
  timeout "$left" $PY scripts/gpu/moving_shapes_sweep.py --teacher "$T" --scales "$SCALES" \
    --strip "$OUT/teacher_samples.png" $SWEEP_ARGS 2>&1 | tee -a "$OUT/teacher.log" | tail -n 8
  ls -l "$T"
  exit 0
fi

# ------------------------------------------------------------------------------------------------ distill
TEACHER=${TEACHER:-rcm_core/assets/moving_shapes_teacher}
[ -f "$TEACHER/moving_shapes.json" ] \
  || { echo "no moving-shapes teacher at $TEACHER (commit the teacher phase's folder there, or set TEACHER)" >&2; exit 2; }
RUNS=${RUNS:-$(mktemp -d /tmp/ms-runs.XXXXXX)}
DATA=$RUNS/data-train
mkdir -p "$RUNS"
# the shards must carry the teacher's own text encoder (same L, D and seed) and the student must use its CFG
read -r W L D S <<< "$($PY -c "import json, sys; m = json.load(open(sys.argv[1])); e = m['text_encoder']
print(m['default_sampler']['guidance_scale'], e['tokens'], e['dim'], e['seed'])" "$TEACHER/moving_shapes.json")"
if [ "${SMOKE:-0}" = 1 ]; then
  COUNT=${COUNT:-64}
  MINUTES=${MINUTES:-0.02}
  SMOKESETS="--set train.device=cpu --set train.batch_size=2 --set train.steps=2 --set train.log_every=1
    --set eval.num_samples=10 --set eval.teacher_steps=[2]"
  BENCH_EXTRA=${BENCH_EXTRA:-"--num-samples 12 --diversity-samples 4 --teacher-steps 2"}
else
  COUNT=${COUNT:-50000}
  MINUTES=${MINUTES:-4.5}
  SMOKESETS=""
fi
echo "== distill: $COUNT train clips (text L=$L D=$D seed $S) -> $DATA"
timeout 150 $PY -m rcm_core.cli data moving-shapes --out "$DATA" --count "$COUNT" --workers "${WORKERS:-14}" \
  --text-tokens "$L" --text-dim "$D" --text-seed "$S" 2>&1 | tail -n 1
[ -f "$DATA/manifest.json" ] || { echo "the dataset was not written" >&2; exit 1; }
VARIANTS="rCM-s0|configs/moving-shapes-rcm-gpu.yaml|train.seed=0
rCM-s1|configs/moving-shapes-rcm-gpu.yaml|train.seed=1
sCM|configs/moving-shapes-scm-gpu.yaml|train.seed=0
DMD|configs/moving-shapes-dmd-gpu.yaml|train.seed=0"
LIMIT=$(awk -v m="$MINUTES" 'BEGIN { printf "%d", m * 60 + 150 }')  # training + start-up, checkpoint, evaluation
echo "== distill: 4 students side by side, ${MINUTES} min of training each (timeout ${LIMIT}s), CFG $W"
pids=()
labels=()
while IFS='|' read -r label config overrides; do
  # shellcheck disable=SC2086  # SMOKESETS is a list of arguments
  OMP_NUM_THREADS=4 timeout "$LIMIT" $PY -m rcm_core.cli distill "$config" --no-resume \
    --set teacher.path="$TEACHER" --set teacher.guidance_scale="$W" --set data.uri="$DATA" \
    --set train.max_minutes="$MINUTES" --set train.output_dir="$RUNS/$label" --set "$overrides" $SMOKESETS \
    > "$RUNS/$label.log" 2>&1 &
  pids+=($!)
  labels+=("$label")
done <<< "$VARIANTS"
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
{
  echo "# moving-shapes distillation, $(date -u '+%Y-%m-%d %H:%M UTC'), teacher $TEACHER (CFG $W), ${MINUTES} min each"
  for l in "${labels[@]}"; do
    echo
    echo "## $l"
    echo '```'
    grep -E '^\[distill\] (step|done)' "$RUNS/$l.log" | tail -n 2
    sed -n '/^model /,$p' "$RUNS/$l.log"
    echo '```'
  done
} > "$OUT/distill.md"
cat "$OUT/distill.md"
# the evaluation inputs/outputs (eval/samples.safetensors: noise, ~10 MB a run) stay behind: 16 MiB a file comes back
(cd "$RUNS" && tar czf "$OUT/runs.tar.gz" --exclude="*.safetensors" ./*.log ./*/config.json ./*/eval 2> /dev/null)
[ "$fail" = 0 ] || echo "a distillation run failed or ran out of time (see its log in runs.tar.gz)" >&2
if $PY -m rcm_core.cli bench moving-shapes --help > /dev/null 2>&1; then
  left=$((${BUDGET_SECONDS:-585} - SECONDS))
  echo "== bench: rcm bench moving-shapes (${left}s left)"
  runs=()
  # the two rCM seeds share the name "rCM": the bench averages runs of one name and reports their spread
  for l in "${labels[@]}"; do runs+=(--run "${l%-s[0-9]}=$RUNS/$l"); done
  # shellcheck disable=SC2086  # BENCH_EXTRA is a list of arguments
  timeout "$left" $PY -m rcm_core.cli bench moving-shapes --teacher "$TEACHER" "${runs[@]}" --out "$RUNS/bench" \
    ${BENCH_EXTRA:-} > "$RUNS/bench.log" 2>&1
  echo "   exit $? (bench.log)"
  tail -n 30 "$RUNS/bench.log"
  cp "$RUNS/bench.log" "$RUNS/bench/" 2> /dev/null
  (cd "$RUNS" && tar czf "$OUT/bench.tar.gz" --exclude="*.png" --exclude="*.gif" bench)  # images: copied below
  n=0
  for f in "$RUNS"/bench/*.md "$RUNS"/bench/*.json "$RUNS"/bench/*.png "$RUNS"/bench/*.gif; do
    [ -f "$f" ] && [ "$n" -lt 4 ] || continue
    cp "$f" "$OUT/" && n=$((n + 1))
  done
else
  echo "== bench: 'rcm bench moving-shapes' is not in this checkout; skipped (runs in $RUNS)"
fi
exit "$fail"
