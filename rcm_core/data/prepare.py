"""`rcm data prepare`: a prompt file (+ optional images / frame folders) -> an rcm-latents-v1 dataset.

Text: every prompt is encoded by the teacher pipeline's own tokenizer + text encoder
(rcm_core.teachers.pipeline_parts.TextEncoder, exactly as the diffusers pipeline's encode_prompt).
Latents, one of:
- none: a prompts-only dataset (DMD-only training or teacher-synthesised data later);
- `media`: a list file, line i naming the image (or folder of video frames) for prompt i, encoded by the
  pipeline's VAE with its latent normalisation (LatentEncoder);
- `synthesize`: the teacher transformer's own samples for each prompt (rcm_core.teachers.load_diffusers_teacher):
  `steps` Euler steps uniform in RF time (rcm_core.sampling.sample_euler, the sampler the diffusers task draws
  its pool with), CFG at the family's default guidance (or `guidance`, in the pipeline's own form), the negative
  prompt (default: the pipeline's) encoded by the same encoder. Sample i starts from noise seeded `seed + i`, so
  its latent depends on neither the batch size nor the other prompts.
Output: ShardWriter under a local directory or `s3://bucket/prefix` (pyarrow S3FileSystem from RCM_S3_ENDPOINT_URL
and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); the manifest, written last, records the encoder's and the VAE's
identity, and for synthesised latents the teacher and the sampler.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch

from rcm_core.config import ConfigError
from rcm_core.data.latent_shards import MANIFEST, ShardFormatError, ShardWriter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")
MAX_PROMPT_CHARS = 20_000  # far above 512 tokens: a longer line is a wrong file, not a prompt
STORED_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(kw_only=True)
class PrepareConfig:
    prompts: str  # prompt file: UTF-8, one prompt per line
    pipeline: str  # diffusers pipeline directory (model_index.json, tokenizer/, text_encoder/, vae/, transformer/)
    out: str  # local directory or s3://bucket/prefix; must not hold a dataset yet
    media: str | None = None  # list file: line i = image or frame folder for prompt i (relative to the list)
    size: tuple[int, int] | None = None  # (H, W) pixels media are resized and centre-cropped to
    synthesize: bool = False  # latents = the teacher's samples
    latent_shape: tuple[int, int, int, int] | None = None  # (C, F, H, W) of synthesised latents
    steps: int = 50  # teacher Euler steps per synthesised sample (the diffusers task's data.sample_steps)
    guidance: float | None = None  # pipeline-form guidance scale; None = the family's default
    negative_prompt: str | None = None  # None = the pipeline's default negative prompt
    seed: int = 0  # sample i's noise is seeded seed + i
    batch_size: int = 8  # prompts per encoder / VAE / sampler batch
    samples_per_shard: int = 256
    max_sequence_length: int = 512  # text tokens per prompt (truncation + zero padding)
    dtype: str = "float32"  # load dtype of every component: float32 | bfloat16 | float16
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.synthesize and self.media:
            raise ConfigError("--synthesize and --media are exclusive: latents come from the teacher or from media")
        if self.synthesize and self.latent_shape is None:
            raise ConfigError("--latent-shape: required with --synthesize (C,F,H,W of the teacher's latents)")
        if self.media and self.size is None:
            raise ConfigError("--size: required with --media (HxW pixels, e.g. 480x832)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype: must be float32, bfloat16 or float16, got {self.dtype!r}")
        if min(self.steps, self.batch_size, self.samples_per_shard, self.max_sequence_length) < 1:
            raise ConfigError("--steps, --batch-size, --samples-per-shard, --max-sequence-length must be >= 1")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (UTF-8; a final newline and Windows line ends are fine).

    Raises:
        ConfigError: naming the file and line: missing file, bytes that are not UTF-8, an empty or blank line,
            a NUL or other control character, a line longer than MAX_PROMPT_CHARS, no prompt at all.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompts: {path}: no such file")
    raw = p.read_bytes()
    prompts = []
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for n, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"prompts: {path}: line {n}: not UTF-8 (byte {exc.start + 1})") from None
        if n == 1:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark some editors write
        if not text.strip():
            raise ConfigError(f"prompts: {path}: line {n}: empty prompt (remove blank lines)")
        bad = next((c for c in text if ord(c) < 32 and c != "\t"), None)
        if bad is not None:
            raise ConfigError(f"prompts: {path}: line {n}: control character U+{ord(bad):04X}")
        if len(text) > MAX_PROMPT_CHARS:
            raise ConfigError(f"prompts: {path}: line {n}: {len(text)} characters (limit {MAX_PROMPT_CHARS})")
        prompts.append(text)
    if not prompts:
        raise ConfigError(f"prompts: {path}: no prompts (one per line)")
    return prompts


def read_media_list(path: str | Path, num_prompts: int) -> list[Path]:
    """Line i: an image file or a folder of frame images (sorted by name) for prompt i, relative to the list."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--media: {path}: no such file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"--media: {path}: not UTF-8") from None
    if len(lines) != num_prompts:
        raise ConfigError(f"--media: {path} has {len(lines)} lines, the prompt file {num_prompts}: one per prompt")
    items = []
    for n, line in enumerate(lines, start=1):
        entry = (p.parent / line.strip()).resolve() if line.strip() else None
        if entry is None or not entry.exists():
            raise ConfigError(f"--media: {path}: line {n}: no such file or folder")
        if entry.is_file() and entry.suffix.lower() in VIDEO_SUFFIXES:
            raise ConfigError(
                f"--media: {path}: line {n}: video files ({entry.suffix}) are not supported; "
                "give a folder of its frames (PNG/JPEG)"
            )
        if entry.is_file() and entry.suffix.lower() not in IMAGE_SUFFIXES:
            raise ConfigError(f"--media: {path}: line {n}: {entry.suffix or 'no suffix'} is not an image type")
        if entry.is_dir() and not _frames(entry):
            raise ConfigError(f"--media: {path}: line {n}: the folder has no frame images")
        for f in _frames(entry) if entry.is_dir() else [entry]:
            _check_image(f, f"--media: {path}: line {n}")  # before any model loads: fail early, not at line 900
        items.append(entry)
    return items


def _check_image(f: Path, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f):  # reads the header only
            pass
    except (UnidentifiedImageError, OSError):
        raise ConfigError(f"{where}: {f.name} is not a readable image") from None


def _frames(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def load_pixels(entry: Path, size: tuple[int, int], where: str) -> torch.Tensor:
    """An image or a frame folder -> (3, F, H, W) float32 in [-1, 1]: each frame RGB, scaled to cover (H, W)
    keeping its aspect ratio, then centre-cropped (Pillow's ImageOps.fit, Lanczos)."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    frames = []
    for f in _frames(entry) if entry.is_dir() else [entry]:
        try:
            with Image.open(f) as img:
                rgb = ImageOps.fit(img.convert("RGB"), (size[1], size[0]), Image.Resampling.LANCZOS)
        except (UnidentifiedImageError, OSError):
            raise ConfigError(f"{where}: {f.name} is not a readable image") from None
        frames.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()))  # (H, W, 3) in 0..255
    video = torch.stack(frames).permute(3, 0, 1, 2)  # (3, F, H, W)
    return video / 127.5 - 1.0


def open_output(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root) for a local directory or s3://bucket/prefix; refuses a root that holds a dataset."""
    if uri.startswith("s3://"):
        root = uri.removeprefix("s3://").rstrip("/")
        if "/" not in root:
            raise ConfigError(f"--out: {uri}: give s3://bucket/prefix, not a bare bucket")
        endpoint = os.environ.get("RCM_S3_ENDPOINT_URL")
        if not endpoint or "AWS_ACCESS_KEY_ID" not in os.environ or "AWS_SECRET_ACCESS_KEY" not in os.environ:
            raise ConfigError("--out: s3:// needs RCM_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        scheme, _, host = endpoint.partition("://")
        # NOTE: pyarrow ignores AWS_ENDPOINT_URL: the endpoint must be passed explicitly
        fs: pafs.FileSystem = pafs.S3FileSystem(
            endpoint_override=host,
            scheme=scheme,
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            region=os.environ.get("RCM_S3_REGION", "us-east-1"),
        )
    else:
        fs, root = pafs.LocalFileSystem(), str(Path(uri).resolve())
    try:
        existing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as exc:
        raise ConfigError(f"--out: cannot list {uri} ({type(exc).__name__})") from None
    names = {Path(i.path).name for i in existing}
    if MANIFEST in names or any(n.startswith("shard-") for n in names):
        raise ConfigError(f"--out: {uri} already holds a dataset (or an unfinished one): choose another location")
    return fs, root


def prepare_dataset(cfg: PrepareConfig, *, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Encode every prompt (and media / teacher sample), write the shards and the manifest; returns a summary
    with counts and throughput (prompts/s over text encoding, latents/s over VAE encoding or sampling)."""
    from rcm_core.teachers.pipeline_parts import LatentEncoder, TextEncoder

    prompts = read_prompts(cfg.prompts)
    media = read_media_list(cfg.media, len(prompts)) if cfg.media else None
    fs, root = open_output(cfg.out)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    text = TextEncoder(cfg.pipeline, max_sequence_length=cfg.max_sequence_length, dtype=dtype, device=cfg.device)
    vae = LatentEncoder(cfg.pipeline, dtype=dtype, device=cfg.device) if media else None
    latents_fn, latent_shape, extra = None, None, {"prompts": Path(cfg.prompts).name}
    if media:
        latents_fn, latent_shape = _media_latents(vae, media, cfg)
        extra["latents"] = "vae"
    elif cfg.synthesize:
        latents_fn, latent_shape, synth = _teacher_latents(text, cfg)
        extra.update(latents="teacher", synthesis=synth)
    vae_identity = vae.identity if vae else _vae_identity(cfg.pipeline)
    writer = ShardWriter(
        fs,
        root,
        text_tokens=cfg.max_sequence_length,
        text_dim=text.dim,
        latent_shape=latent_shape,
        samples_per_shard=cfg.samples_per_shard,
        text_dtype=STORED_DTYPES[text.dtype],
        encoder=text.identity,
        vae=vae_identity,
        extra=extra,
    )
    text_s = latent_s = 0.0
    start = time.perf_counter()
    for lo in range(0, len(prompts), cfg.batch_size):
        batch = prompts[lo : lo + cfg.batch_size]
        t0 = time.perf_counter()
        tokens, lengths = text.encode(batch)
        tokens = tokens.cpu()  # inside the timed window: on a GPU this waits for the encoder's kernels
        text_s += time.perf_counter() - t0
        latents = None
        if latents_fn is not None:
            t0 = time.perf_counter()
            latents = latents_fn(lo, tokens, lengths)
            latent_s += time.perf_counter() - t0
        for j, caption in enumerate(batch):
            try:
                writer.add(
                    f"{lo + j:08d}", caption, tokens[j], int(lengths[j]), None if latents is None else latents[j]
                )
            except ShardFormatError as exc:
                raise ConfigError(f"sample {lo + j + 1}: {exc}") from None
        done = lo + len(batch)
        rate = done / max(time.perf_counter() - start, 1e-9)
        progress(f"[prepare] {done}/{len(prompts)} samples  {rate:.2f} samples/s")
    manifest = writer.close()
    return {
        "count": manifest.count,
        "shards": len(manifest.shards),
        "out": cfg.out,
        "latents": extra.get("latents"),
        "seconds": time.perf_counter() - start,
        "prompts_per_s": len(prompts) / max(text_s, 1e-9),
        "latents_per_s": (len(prompts) / max(latent_s, 1e-9)) if latents_fn else None,
    }


def _vae_identity(pipeline: str) -> dict | None:
    """The VAE's identity from its config alone (prompts-only and synthesised datasets: latents live in its
    space, so a reader can tell which VAE decodes them), without loading its weights."""
    from rcm_core.teachers.pipeline_parts import component_identity, read_model_index

    path = Path(pipeline)
    index = read_model_index(path)
    entry = index.get("vae")
    if not (isinstance(entry, list) and len(entry) == 2 and (path / "vae").is_dir()):
        return None
    return component_identity(path, index, "vae", str(entry[1]))


def _media_latents(vae, media: list[Path], cfg: PrepareConfig):
    h, w = cfg.size
    f = vae.spatial_factor
    if h % f or w % f:
        raise ConfigError(f"--size: {h}x{w} must be divisible by the VAE's spatial factor {f}")
    counts = [len(_frames(m)) if m.is_dir() else 1 for m in media]
    for n, c in enumerate(counts, start=1):
        if (c - 1) % vae.temporal_factor or c != counts[0]:
            raise ConfigError(
                f"--media: line {n}: {c} frame(s); every sample needs the same count, 1 + k * "
                f"{vae.temporal_factor} (line 1 has {counts[0]})"
            )
    shape = vae.latent_shape(counts[0], h, w)

    def fn(lo: int, tokens, lengths) -> torch.Tensor:
        items = media[lo : lo + len(lengths)]
        pixels = torch.stack([load_pixels(m, (h, w), f"--media: line {lo + i + 1}") for i, m in enumerate(items)])
        return vae.encode(pixels)  # (B, C, F', H', W')

    return fn, shape


def _teacher_latents(text, cfg: PrepareConfig):
    from rcm_core.models.flow import guided_f
    from rcm_core.sampling import sample_euler
    from rcm_core.tasks.diffusers import text_dim
    from rcm_core.teachers import detect_family, load_diffusers_teacher, read_config

    transformer = Path(cfg.pipeline) / "transformer"
    config = read_config(transformer)
    family = detect_family(config)
    if family.name != text.kind.family:
        raise ConfigError(f"--pipeline: the transformer is {family.name}, the pipeline is {text.kind.family}")
    width = text_dim(config)
    if width != text.dim:
        raise ConfigError(f"--pipeline: the text encoder gives {text.dim}-wide tokens, the transformer takes {width}")
    shape = tuple(cfg.latent_shape)
    if config.get("in_channels") is not None and shape[0] != config["in_channels"]:
        raise ConfigError(f"--latent-shape: {shape[0]} channels, the teacher takes in_channels={config['in_channels']}")
    patch = list(config.get("patch_size") or [1, 1, 1])
    if any(n % p for n, p in zip(shape[1:], patch, strict=True)):
        raise ConfigError(f"--latent-shape: (F, H, W) = {shape[1:]} is not divisible by patch_size {patch}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    # float32 weights as the diffusers task keeps them; --dtype bfloat16/float16 on a GPU is the autocast dtype
    teacher = load_diffusers_teacher(transformer, dtype=torch.float32).to(cfg.device).eval()
    g_pipeline = family.default_guidance if cfg.guidance is None else cfg.guidance
    w = family.guidance_to_project(g_pipeline)
    negative = text.kind.negative_prompt if cfg.negative_prompt is None else cfg.negative_prompt
    neg_tokens, neg_len = text.encode([negative])
    device = torch.device(cfg.device)
    null = {
        "tokens": neg_tokens.to(device, torch.float32),
        "mask": (torch.arange(cfg.max_sequence_length) < neg_len[0]).to(device)[None],
    }
    amp = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32)

    @torch.no_grad()
    def fn(lo: int, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b = len(lengths)
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed + lo + i)) for i in range(b)]
        ).to(device)
        cond = {
            # the stored tokens (rounded to the stored dtype): the dataset holds exactly what conditioned x0
            "tokens": tokens.to(device, torch.float32),
            "mask": (torch.arange(cfg.max_sequence_length)[None] < lengths[:, None]).to(device),
        }
        nb = {k: v.expand(b, *v.shape[1:]) for k, v in null.items()}
        with amp:
            x = sample_euler(lambda x, t: guided_f(teacher, x, t, cond, nb, w), noise, cfg.steps)
        return x.float().cpu()

    synth = {
        "teacher": {
            "family": family.name,
            "class": config.get("_class_name"),
            "config_sha256": _config_hash(transformer),
        },  # fmt: skip
        "sampler": "euler_rf_uniform",
        "steps": cfg.steps,
        "guidance_scale": g_pipeline,
        "guidance_project": w,
        "negative_prompt": negative,
        "seed": cfg.seed,
        "noise": "sample i: torch.randn(latent_shape, Generator().manual_seed(seed + i))",
    }
    return fn, shape, synth


def _config_hash(folder: Path) -> str:
    from rcm_core.teachers.pipeline_parts import _sha256_of

    return _sha256_of(folder, ("config.json",))


__all__ = ["PrepareConfig", "load_pixels", "open_output", "prepare_dataset", "read_media_list", "read_prompts"]
