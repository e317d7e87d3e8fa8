#!/bin/bash
# Issue 18: `rcm data prepare` throughput at the real Wan2.1-T2V-1.3B sizes (random weights) on one GPU.
#   here, once per checkout:  bash docs/perf/pending_gpu_run_wan.sh prepare   (diffusers/accelerate wheels -> .whl/)
#   on the GPU (device tool, kind nvidia-h200, carry [".whl"], timeout_s 480):  bash docs/perf/gpu_run_prepare.sh
# Runs tests/benchmarks/bench_prepare_gpu.py mode by mode, each under its own time limit, so a slow mode keeps
# the ones before it; CSV + log under $OUT.
set -u
PY=${PY:-python3}
[ -n "${OUT:-}" ] || { echo "OUT is not set (the device tool sets it)"; exit 2; }
ls .whl/diffusers-*.whl > /dev/null || { echo "no .whl/diffusers-*.whl: run 'bash docs/perf/pending_gpu_run_wan.sh prepare' first"; exit 2; }
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
$PY -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  'diffusers', diffusers.__version__, torch.cuda.get_device_name(0))" || exit 1
W=/tmp/prep-work
mkdir -p $W
B=tests/benchmarks/bench_prepare_gpu.py
for spec in "prompts 150" "images 60" "clips 90" "synthesize 90"; do
  set -- $spec
  echo "== $1 (limit $2 s after the pipeline is built)"
  # the first mode also builds the random full-size pipeline (umT5-XXL 5.7B, VAE, 1.3B transformer) on disk
  lim=$2; [ "$1" = prompts ] && lim=$(( $2 + 150 ))
  timeout $lim $PY $B --work $W --modes $1 --csv $OUT/prepare_gpu.csv 2>&1 | grep -v "^\s*$" | tail -n 25 | tee -a $OUT/prepare_gpu.log
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee -a $OUT/prepare_gpu.log
