"""Export size of a Wan2.1-T2V-1.3B-config student (issue 18): the diffusers task's write_student over a state dict
of the real 1.3B shapes (zeros: size does not depend on values), float32 and bfloat16, default 5GB shards.

    PYTHONPATH=. python tests/benchmarks/bench_export_size.py [--dtype bfloat16|float32|both]

Prints one line per dtype: parameters, bytes of transformer/ (weights + index + config), number of shards, seconds.
Peak memory: the state dict itself (2.8 GB bf16, 5.7 GB fp32), no copy (diffusers_module assigns the tensors).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rcm_core.tasks import get_task
from rcm_core.teachers import FAMILIES

WAN_1_3B = dict(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
    _class_name="WanTransformer3DModel",
    patch_size=[1, 2, 2],
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)


def state_of_shapes(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zeros with the 1.3B model's keys and shapes (built on meta: no init cost)."""
    from accelerate import init_empty_weights

    cls = FAMILIES["wan2.1"].diffusers_class()
    with init_empty_weights():
        model = cls.from_config({k: v for k, v in WAN_1_3B.items() if not k.startswith("_")})
    return {k: torch.zeros(v.shape, dtype=dtype) for k, v in model.state_dict().items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=["bfloat16", "float32", "both"], default="bfloat16")
    args = p.parse_args()
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    meta = {"family": "wan2.1", "config": WAN_1_3B}
    for name in dtypes:
        # the job's master weights are float32; bf16 zeros here save memory, with the modules the export keeps in
        # float32 made float32 first, as write_student would leave them
        state = state_of_shapes(torch.float32 if name == "float32" else torch.bfloat16)
        keep = set(FAMILIES["wan2.1"].diffusers_class()._keep_in_fp32_modules or ())
        if name == "bfloat16":
            state = {k: v.float() if keep & set(k.split(".")) else v for k, v in state.items()}
        info = {
            "task": "diffusers",
            "data": {"dataset": "teacher-synthetic", "latent_shape": [16, 21, 60, 104]},
            "guidance_scale": 5.0,
            "eval": {"student_mid_times": [1.5, 1.4, 1.0], "student_steps": [1, 2, 4], "seed": 1000},
            "dtype": name,
        }
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            get_task("diffusers").write_student(Path(tmp), state, info, meta)
            seconds = time.perf_counter() - start
            folder = Path(tmp) / "transformer"
            size = sum(f.stat().st_size for f in folder.iterdir())
            shards = len(list(folder.glob("*.safetensors")))
        params = sum(v.numel() for v in state.values())
        gb = f"{size / 1e9:.3f} GB"
        print(f"{name}: {params:,} parameters, transformer/ {size:,} bytes ({gb}), {shards} shard(s), {seconds:.1f} s")
        del state


if __name__ == "__main__":
    main()
