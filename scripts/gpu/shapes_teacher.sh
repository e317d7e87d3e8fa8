#!/usr/bin/env bash
# Trains the built-in shapes teacher on one GPU (the shipped weights came from this script), evaluates it at
# several guidance scales and leaves everything under OUT (default runs/gpu). Usage: bash scripts/gpu/shapes_teacher.sh
set -euo pipefail
OUT=${OUT:-runs/gpu}; MINUTES=${MINUTES:-7}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L || true
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
python3 -m rcm_core.cli teacher train --preset shapes --out "$OUT/shapes.safetensors" \
  --set batch_size=256 --set steps=200000 --set pool_size=500000 --set pool_workers=14 \
  --set max_minutes="$MINUTES" --set log_every=500 --set eval_samples_per_prompt=16 ${EXTRA:-} 2>&1 | tee "$OUT/teacher.log"
python3 - "$OUT/shapes.safetensors" <<'PY' 2>&1 | tee "$OUT/guidance_sweep.log"
import sys, json, torch
from pathlib import Path
from rcm_core.shapes_teacher import load_shapes_teacher, evaluate_shapes
net, meta = load_shapes_teacher(Path(sys.argv[1]))
net = net.cuda()
print("training", json.dumps(meta["training"]))
from rcm_core.data.shapes import all_prompts, held_out_prompts
for name, prompts in (("all", all_prompts()), ("held_out", held_out_prompts())):
    for w in (1.5, 2.0, 3.0, 4.5):
        s = evaluate_shapes(net, samples_per_prompt=8, num_steps=50, guidance_scale=w, seed=1, prompts=prompts)
        print(f"{name} w={w}: " + " ".join(f"{k}={v:.3f}" for k, v in s.items()), flush=True)
PY
# files coming back from the device machine are limited to 16 MiB each: split, rejoin with cat
if [ -n "${SPLIT:-}" ]; then split -b 15m "$OUT/shapes.safetensors" "$OUT/shapes.safetensors.part-" && rm "$OUT/shapes.safetensors"; fi
