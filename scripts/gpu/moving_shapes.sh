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
#   bash scripts/gpu/moving_shapes.sh distill
#       (see the distill section below)
#
# CPU dry run of the same parts and files with tiny settings: SMOKE=1 OUT=/tmp/ms bash scripts/gpu/moving_shapes.sh teacher
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
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', flush=True)" || exit 1

if [ "$PHASE" = teacher ]; then
  T=$OUT/moving_shapes_teacher
  if [ "${SMOKE:-0}" = 1 ]; then
    TRAIN_SECONDS=${TRAIN_SECONDS:-5}
    SCALES=${SCALES:-1.5,3}
    SETS="--set num_layers=1 --set num_attention_heads=2 --set attention_head_dim=16 --set ffn_dim=32
      --set freq_dim=32 --set text_dim=16 --set steps=6 --set batch_size=4 --set log_every=2 --set pool_size=64
      --set sample_steps=2"
  else
    TRAIN_SECONDS=${TRAIN_SECONDS:-420}
    SCALES=${SCALES:-2,3,4.5}
    SETS="--set batch_size=256 --set steps=1000000 --set pool_size=150000 --set pool_workers=14 --set log_every=200"
  fi
  echo "== teacher: train for ${TRAIN_SECONDS}s -> $T"
  # shellcheck disable=SC2086  # SETS is a list of arguments
  timeout $((TRAIN_SECONDS + 120)) $PY -m rcm_core.cli teacher train --preset moving-shapes --out "$T" --no-eval \
    --set max_seconds="$TRAIN_SECONDS" $SETS ${EXTRA:-} > "$OUT/teacher.log" 2>&1
  echo "   exit $? (teacher.log)"
  tail -n 3 "$OUT/teacher.log"
  [ -f "$T/config.json" ] || { echo "no teacher was saved" >&2; exit 1; }
  echo "== teacher: CFG sweep ($SCALES) over the evaluation prompts"
  timeout "${SWEEP_SECONDS:-100}" $PY scripts/gpu/moving_shapes_sweep.py --teacher "$T" --scales "$SCALES" \
    --strip "$OUT/teacher_samples.png" 2>&1 | tee -a "$OUT/teacher.log" | tail -n 8
  ls -l "$T"
  exit 0
fi
