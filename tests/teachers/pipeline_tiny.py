"""Tiny random diffusers pipeline directories (Wan2.1, Cosmos-Predict2) with real transformers text encoders.

Everything is built offline in the test: a T5 tokenizer over a small Unigram vocabulary (words plus single letters,
so any lowercase text tokenizes), a random `UMT5EncoderModel` / `T5EncoderModel`, a random `AutoencoderKLWan`
(z_dim 4, spatial factor 8, temporal factor 4, as Wan2.1's) with non-trivial latents_mean/std, and the tiny
transformers of wan_tiny / cosmos_tiny. Wan's directory is written by `WanPipeline.save_pretrained` (the layout
a user has); Cosmos2's pipeline cannot be constructed without its guardrail package, so its model_index.json is
written in the same layout by hand.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

WORDS = "a cat dog on the mat red blue big small runs jumps under sky &amp; sees".split()
IMAGE_SIZE = (32, 64)  # (H, W) pixels -> latent (4, 1, 4, 8): fits the tiny Wan's patch (1, 2, 2) and RoPE


def tiny_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ",.!?'"]
    return T5TokenizerFast(vocab=pieces, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def tiny_text_encoder(cls_name: str, dim: int, vocab: int, seed: int = 0):
    import transformers

    config_cls = transformers.UMT5Config if cls_name == "UMT5EncoderModel" else transformers.T5Config
    config = config_cls(
        vocab_size=vocab, d_model=dim, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return getattr(transformers, cls_name)(config).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],  # as Wan2.1's: spatial 8, temporal 4
            latents_mean=[0.1, -0.2, 0.3, -0.4],
            latents_std=[1.5, 0.5, 2.0, 0.8],
        )
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return vae.eval()


def save_wan_pipeline(path: str | Path, seed: int = 0) -> Path:
    """WanPipeline.save_pretrained of tiny random components: tokenizer/, text_encoder/ (UMT5), vae/,
    transformer/ (tests.teachers.wan_tiny), scheduler/, model_index.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from tests.teachers.wan_tiny import build_wan_tiny

    tok = tiny_tokenizer()
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=tiny_text_encoder("UMT5EncoderModel", 24, len(tok), seed),
        vae=tiny_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=build_wan_tiny(seed=seed),
    )
    pipe.save_pretrained(str(path))
    return Path(path)


def save_cosmos_pipeline(path: str | Path, seed: int = 0) -> Path:
    """A Cosmos2TextToImagePipeline directory (T5EncoderModel of width 8, tests.teachers.cosmos_tiny transformer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tests.teachers.cosmos_tiny import build_tiny_cosmos

    path = Path(path)
    tok = tiny_tokenizer()
    tok.save_pretrained(str(path / "tokenizer"))
    tiny_text_encoder("T5EncoderModel", 8, len(tok), seed).save_pretrained(str(path / "text_encoder"))
    tiny_vae(seed).save_pretrained(str(path / "vae"))
    build_tiny_cosmos(seed).save_pretrained(str(path / "transformer"))
    FlowMatchEulerDiscreteScheduler().save_pretrained(str(path / "scheduler"))
    index = {
        "_class_name": "Cosmos2TextToImagePipeline",
        "_diffusers_version": "0.42.1",
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CosmosTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
