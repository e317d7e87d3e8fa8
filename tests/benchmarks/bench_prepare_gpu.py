"""`rcm data prepare` throughput at the real Wan2.1-T2V-1.3B sizes on a GPU (a script, not collected by pytest).

No weights can be downloaded here, so this builds a pipeline directory of the published sizes with RANDOM weights
(timing only): umT5-XXL encoder config (24 layers, d_model 4096, 64 heads of 64, d_ff 10240, gated-GELU, vocab
256384), the Wan2.1 VAE (AutoencoderKLWan's default config), the Wan2.1-T2V-1.3B transformer; the tokenizer is the
tests' tiny one (compute does not depend on the vocabulary: every prompt is padded to 512 tokens). It then runs
the real code path (rcm_core.data.prepare.prepare_dataset) in bf16: prompts only, 480x832 images, 81-frame
480x832 clips (frame folders), and teacher synthesis of (16, 21, 60, 104) latents with a few Euler steps
(per-step time x 50 steps = the default sampler's cost per sample).

    PYTHONPATH=$PWD python tests/benchmarks/bench_prepare_gpu.py --csv out.csv

Run on one H200 on 2026-12-05 by `bash docs/perf/gpu_run_prepare.sh` (diffusers wheel carried, the image's
transformers 5.17): results in docs/data_prepare.md ("Throughput") and docs/perf/prepare_2026-12-05_h200/.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128)  # fmt: skip
WAN_1P3B = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
                num_attention_heads=12, ffn_dim=8960, num_layers=30)  # fmt: skip


def build_pipeline(path: Path) -> Path:
    import json

    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from tests.teachers.pipeline_tiny import tiny_tokenizer

    t0 = time.perf_counter()
    tiny_tokenizer().save_pretrained(str(path / "tokenizer"))
    with torch.device("cuda"):
        UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(torch.bfloat16).save_pretrained(str(path / "text_encoder"))
        AutoencoderKLWan().save_pretrained(str(path / "vae"))
        WanTransformer3DModel(**WAN_1P3B).save_pretrained(str(path / "transformer"))
    torch.cuda.empty_cache()
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(path / "scheduler"))
    index = {
        "_class_name": "WanPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (path / "model_index.json").write_text(json.dumps(index))
    print(f"[bench] built the random full-size pipeline in {time.perf_counter() - t0:.0f}s", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--synthesize", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modes", default="prompts,images,clips,synthesize")
    ap.add_argument("--csv")
    ap.add_argument("--work", help="work directory (default: a new temporary one); a built pipeline there is reused")
    args = ap.parse_args()

    from PIL import Image

    from rcm_core.data.prepare import PrepareConfig, prepare_dataset

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-prepare-gpu-"))
    pipeline = work / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        build_pipeline(pipeline)
    words = "a cat dog on the mat red blue big small runs jumps under sky".split()
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(words, size=rng.integers(10, 120))) for _ in range(args.prompts)]
    for name, n in (("prompts", args.prompts), ("images", args.images), ("clips", args.clips),
                    ("synthesize", args.synthesize)):  # fmt: skip
        (work / f"{name}.txt").write_text("\n".join(prompts[:n]) + "\n")
    (work / "img").mkdir(exist_ok=True)
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 256, (480, 832, 3), dtype=np.uint8)).save(work / "img" / f"{i}.png")
    (work / "images-media.txt").write_text("\n".join(f"img/{i}.png" for i in range(args.images)) + "\n")
    for c in range(args.clips):
        (work / f"clip{c}").mkdir(exist_ok=True)
        for f in range(81):
            Image.fromarray(rng.integers(0, 256, (480, 832, 3), dtype=np.uint8)).save(
                work / f"clip{c}" / f"{f:03d}.png"
            )
    (work / "clips-media.txt").write_text("\n".join(f"clip{c}" for c in range(args.clips)) + "\n")

    common = dict(pipeline=str(pipeline), dtype="bfloat16", device="cuda")
    configs = {
        "prompts": PrepareConfig(
            prompts=str(work / "prompts.txt"), out=str(work / f"o1-{time.time_ns()}"), batch_size=32, **common
        ),
        "images": PrepareConfig(
            prompts=str(work / "images.txt"),
            out=str(work / f"o2-{time.time_ns()}"),
            batch_size=8,
            media=str(work / "images-media.txt"),
            size=(480, 832),
            **common,
        ),  # fmt: skip
        "clips": PrepareConfig(
            prompts=str(work / "clips.txt"),
            out=str(work / f"o3-{time.time_ns()}"),
            batch_size=1,
            media=str(work / "clips-media.txt"),
            size=(480, 832),
            **common,
        ),  # fmt: skip
        "synthesize": PrepareConfig(
            prompts=str(work / "synthesize.txt"),
            out=str(work / f"o4-{time.time_ns()}"),
            synthesize=True,
            latent_shape=(16, 21, 60, 104),
            steps=args.steps,
            batch_size=1,
            **common,
        ),  # fmt: skip
    }
    gpu = torch.cuda.get_device_name()
    for name in args.modes.split(","):
        start = time.perf_counter()
        s = prepare_dataset(configs[name], progress=lambda line: print(line, flush=True))
        wall = time.perf_counter() - start
        lat = s["latents_per_s"]
        extra = ""
        if name == "synthesize" and lat:
            per_step = 1 / lat / args.steps
            extra = f"  {per_step:.2f} s per Euler step (CFG, batch 1) -> {50 * per_step:.0f} s per 50-step sample"
        print(
            f"[bench] {name:10s} n={s['count']:4d}  text {s['prompts_per_s']:8.2f} prompts/s  "
            f"latents {lat or 0:8.3f}/s  wall {wall:.1f}s (incl. loading){extra}  {gpu}",
            flush=True,
        )
        if args.csv:
            with open(args.csv, "a", newline="") as f:
                csv.writer(f).writerow([time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), gpu, name, s["count"],
                                        s["prompts_per_s"], lat, wall, args.steps])  # fmt: skip


if __name__ == "__main__":
    main()
