"""The text conditioning of the moving-shapes task: a frozen, deterministic "text encoder" for its grammar.

No pretrained text encoder can be downloaded here, and the grammar is small, so each caption word gets a fixed
random vector (standard normal, from a seeded numpy Generator over the sorted vocabulary) and each position a
sinusoidal vector (Vaswani et al. 2017, sec. 3.5); token i of a caption = word vector + position vector i. The
output has the format a diffusers text encoder gives the `diffusers` task and rcm-latents-v1 datasets carry:
tokens (L, D) float32 with the padding rows zero and a mask (L,) True on real tokens. The null / negative
prompt (classifier-free guidance's unconditional branch) is the empty caption: all L rows zero, mask all False,
exactly `TeacherSyntheticData.null_cond` of the diffusers task.

Word order is kept by the positions, so "a red circle and a green square" and "a green circle and a red
square" differ (attribute binding needs that). The table is a pure function of (tokens, dim, seed) and the
grammar's vocabulary; `spec()` records those and a SHA-256 of the table, and `from_spec` rebuilds the encoder
and refuses one whose table differs (e.g. after the grammar's vocabulary changed).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from rcm_core.data import moving_shapes

ENCODER_NAME = "rcm-moving-shapes-frozen-words"
ENCODER_VERSION = 1
DEFAULT_TOKENS = 16  # the longest caption of the grammar has 13 words
DEFAULT_DIM = 64


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Every word of every caption of the grammar, sorted."""
    return tuple(sorted({w for p in moving_shapes.all_prompts() for w in p.caption().split()}))


def sinusoidal_positions(tokens: int, dim: int) -> np.ndarray:
    """(tokens, dim) float32: sin in the even columns, cos in the odd ones, wavelengths 2 pi .. 10^4 2 pi."""
    pos = np.arange(tokens, dtype=np.float64)[:, None]
    freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = np.zeros((tokens, dim), dtype=np.float64)
    out[:, 0::2] = np.sin(pos * freq)
    out[:, 1::2] = np.cos(pos * freq)[:, : dim // 2]
    return out.astype(np.float32)


class FrozenTextEncoder:
    """captions -> (tokens (B, L, D) float32, lengths (B,) int32); see the module docstring."""

    def __init__(self, *, tokens: int = DEFAULT_TOKENS, dim: int = DEFAULT_DIM, seed: int = 0):
        longest = max(len(p.caption().split()) for p in moving_shapes.all_prompts())
        if tokens < longest:
            raise ValueError(f"tokens must be >= {longest} (the longest caption's words), got {tokens}")
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even integer >= 2, got {dim}")
        self.tokens, self.dim, self.seed = int(tokens), int(dim), int(seed)
        self.vocab = {w: i for i, w in enumerate(vocabulary())}
        self.table = np.random.default_rng(self.seed).standard_normal((len(self.vocab), self.dim)).astype(np.float32)
        self.positions = sinusoidal_positions(self.tokens, self.dim)

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (B, L, D) float32 (padding rows zero) and real-token counts (B,) int32.

        Raises ValueError naming the caption for a word outside the grammar's vocabulary or a caption longer
        than L words; "" is the null prompt (length 0).
        """
        out = np.zeros((len(captions), self.tokens, self.dim), dtype=np.float32)
        lengths = np.zeros(len(captions), dtype=np.int32)
        for i, caption in enumerate(captions):
            words = str(caption).lower().split()
            if len(words) > self.tokens:
                raise ValueError(
                    f"caption {str(caption)[:120]!r} has {len(words)} words, the encoder takes {self.tokens}"
                )
            unknown = [w for w in words if w not in self.vocab]
            if unknown:
                raise ValueError(f"caption {str(caption)[:120]!r}: {unknown[0]!r} is not a word of the grammar")
            ids = [self.vocab[w] for w in words]
            out[i, : len(ids)] = self.table[ids] + self.positions[: len(ids)]
            lengths[i] = len(ids)
        return out, lengths

    def cond(self, captions: list[str], device=None) -> dict:
        """{"tokens": (B, L, D) float32, "mask": (B, L) bool} torch tensors: the diffusers task's condition."""
        import torch

        emb, lengths = self.encode(captions)
        mask = np.arange(self.tokens)[None, :] < lengths[:, None]
        return {"tokens": torch.from_numpy(emb).to(device), "mask": torch.from_numpy(mask).to(device)}

    def null_cond(self, batch_size: int, device=None) -> dict:
        """The unconditional branch: zero tokens, mask all False (the empty caption)."""
        return self.cond([""] * batch_size, device=device)

    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update("\n".join(self.vocab).encode())
        h.update(self.table.tobytes())
        h.update(self.positions.tobytes())
        return h.hexdigest()

    def spec(self) -> dict:
        """What identifies the encoder (a dataset manifest's `encoder`, a teacher's metadata)."""
        return {
            "name": ENCODER_NAME,
            "version": ENCODER_VERSION,
            "class": f"{__name__}.FrozenTextEncoder",
            "tokens": self.tokens,
            "dim": self.dim,
            "seed": self.seed,
            "vocab_size": len(self.vocab),
            "renderer": moving_shapes.RENDERER_VERSION,
            "sha256": self.sha256(),
            "how": "token i = fixed N(0, 1) word vector (numpy default_rng(seed) over the sorted vocabulary) + "
            "sinusoidal position i; padding and the null prompt are zero rows with mask False",
        }

    @classmethod
    def from_spec(cls, spec: dict) -> FrozenTextEncoder:
        """The encoder a spec describes; ValueError when the spec is not this encoder's or its table differs."""
        if not isinstance(spec, dict) or spec.get("name") != ENCODER_NAME:
            raise ValueError(f"text encoder spec: name must be {ENCODER_NAME!r}")
        if spec.get("version") != ENCODER_VERSION:
            raise ValueError(f"text encoder spec: version {spec.get('version')!r}, this code makes {ENCODER_VERSION}")
        try:
            enc = cls(tokens=int(spec["tokens"]), dim=int(spec["dim"]), seed=int(spec["seed"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"text encoder spec: missing or bad field ({exc})") from None
        if spec.get("sha256") != enc.sha256():
            raise ValueError("text encoder spec: sha256 differs from this code's table (grammar or encoder changed)")
        return enc


__all__ = ["DEFAULT_DIM", "DEFAULT_TOKENS", "ENCODER_NAME", "FrozenTextEncoder", "sinusoidal_positions", "vocabulary"]
