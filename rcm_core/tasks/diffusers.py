"""The diffusers task: rCM of a diffusers transformer (a family of rcm_core.teachers: Wan2.1, Cosmos-Predict2)
into a few-step student of the same architecture, initialised (with the fake score) from the teacher's weights.

Data, dataset "latents" (`DatasetData`): an rcm-latents-v1 dataset at data.uri (rcm_core.data.latent_shards,
written by `rcm data prepare`), streamed by each data-parallel rank (rcm_core.data.latent_stream): encoded
prompts and their clean latents; a prompts-only dataset trains DMD only (see DatasetData).
Data, dataset "teacher-synthetic" (`TeacherSyntheticData`): no prompts and no latents; both are made here, and the
README says so:
- conditions are PLACEHOLDER prompts: seeded random text-embedding tokens (B, text_tokens, text_dim), standard
  normal, each prompt a random length with the rest padding (mask False, embeddings zeroed as both pipelines do).
  They are not encoded text: the student learns the teacher's behaviour on these inputs, not on real captions;
- the null condition (CFG's negative prompt) is all padding: zero embeddings, mask False;
- the clean latents x0 are the teacher's own samples: one per placeholder prompt, drawn at job start by the
  teacher's Euler sampler (data.sample_steps steps uniform in RF time, CFG at teacher.guidance_scale), the way
  the published rCM trains on teacher-generated data. Every rank draws the same pool through the (sharded)
  teacher; a resumed job draws it again from the same seed.
Evaluation without a scorer: every sampler starts from the same noise and placeholder conditions, and its output
is compared with the teacher's reference sample (max(eval.teacher_steps) Euler steps, CFG), as relative L2
(||x - ref|| / ||ref||, mean over samples) and MSE. The reference is drawn with the pool at job start.
The evaluation also writes its inputs and outputs beside the grid (samples.safetensors: tokens, mask, noise and
student_<N>step latents), so an exported student can be checked to reproduce them.
Export (rcm_core.export documents the layout): the student `save_pretrained` by the family's diffusers class
(sharded with an index above export.max_shard_size), or for a LoRA student (student.lora, rcm_core.teachers.lora) its
adapters alone as diffusers' pytorch_lora_weights.safetensors; the rCM sampler record as
scheduler/scheduler_config.json, a model card README.md and rcm.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from rcm_core.config import ConfigError, DistillConfig, diffusers_rcm
from rcm_core.data.latent_stream import DataAccess
from rcm_core.models.flow import FlowModel, guided_f
from rcm_core.sampling import sample_consistency, sample_euler, student_times
from rcm_core.tasks.base import Task, eval_seed, register

TEXT_DIM_KEYS = ("text_dim", "text_embed_dim")  # Wan, Cosmos: width of the text-encoder tokens in config.json


@register
class Diffusers(Task):
    name = "diffusers"
    datasets = ("teacher-synthetic", "latents")
    metric_names = ("rel_l2", "mse")
    uses_cuda = True
    teacher_is_directory = True

    def preset(self, family: str | None = None) -> DistillConfig:
        """The published recipe with the family's default guidance in the project's form (Wan 5 -> 5, Cosmos
        7 -> 8); without a family (not yet read from config.json) Wan's 5."""
        if family is None:
            return diffusers_rcm()
        from rcm_core.teachers import FAMILIES

        if family not in FAMILIES:
            raise ConfigError(f"teacher.family: must be one of {', '.join(FAMILIES)}; got {family!r}")
        fam = FAMILIES[family]
        return diffusers_rcm(fam.guidance_to_project(fam.default_guidance))

    def load_teacher(self, path: Path) -> tuple[torch.nn.Module, dict]:
        from rcm_core.teachers import load_diffusers_net

        # float32 master weights whatever the checkpoint's dtype: optimizer state and EMA stay float32, bf16 is
        # the compute dtype (autocast / FSDP mixed precision)
        net, family, config = load_diffusers_net(path, dtype=torch.float32)
        return net, {"task": self.name, "parameterization": "rf", "family": family.name, "config": config}

    def build_data(
        self, cfg: DistillConfig, meta: dict, device: torch.device | None, access: DataAccess | None = None
    ) -> TeacherSyntheticData:
        if cfg.data.dataset == "latents":
            return DatasetData(cfg, meta["config"], device=device, access=access or DataAccess())
        return TeacherSyntheticData(cfg, meta["config"], device=device)

    def prepare_data(self, data: TeacherSyntheticData, teacher: FlowModel) -> None:
        data.draw(teacher)

    def evaluate(self, cfg, entries, data, *, num_samples, seed, grid) -> list[dict[str, Any]]:
        ref = data.reference[:num_samples]
        cond = {k: v[:num_samples] for k, v in data.eval_cond.items()}
        noise = data.eval_noise[:num_samples]
        rows, panels = [], [("teacher reference", ref)]
        latents = {**cond, "noise": noise, "reference": ref}
        for name, model, steps_list, is_teacher in entries:
            device = next(model.parameters()).device
            c, z = {k: v.to(device) for k, v in cond.items()}, noise.to(device)
            for steps in steps_list:
                start = time.perf_counter()
                with torch.no_grad():
                    if is_teacher:
                        null = data.null_cond(len(z), device=device)
                        w = cfg.teacher.guidance_scale
                        x = sample_euler(lambda x, t: guided_f(model, x, t, c, null, w), z, steps)  # noqa: B023
                    else:
                        gen = torch.Generator(device=device).manual_seed(seed)
                        times = student_times(steps, cfg.eval.student_mid_times)
                        x = sample_consistency(lambda x, t: model(x, t, c), z, times, generator=gen)  # noqa: B023
                ms = 1e3 * (time.perf_counter() - start) / len(z)
                rows.append({"model": name, "steps": steps, **distance_to_reference(x.cpu(), ref), "ms_per_sample": ms})
                panels.append((f"{name} {steps}-step", x.cpu()))
                latents[f"{'teacher' if is_teacher else 'student'}_{steps}step"] = x.cpu()
        latent_grid(panels, grid)
        _save_latents(latents, grid.with_suffix(".safetensors"))
        return rows

    def network_config(self, cfg: DistillConfig, meta: dict) -> dict[str, Any]:
        return meta["config"]

    def write_student(self, out: Path, state: dict[str, torch.Tensor], info: dict[str, Any], meta: dict) -> None:
        """The export (rcm_core.export): transformer/ by save_pretrained of the teacher's class over the student's
        weights (the teacher's keys; sharded above info["max_shard_size"]), the sampler record, the model card and
        rcm.json. `info` carries eval (mid_times, step counts, seed), latent_shape and, from a job, job/teacher/
        metrics/spec for the card."""
        from rcm_core import export
        from rcm_core.teachers import FAMILIES, diffusers_module

        family = FAMILIES[meta["family"]]
        if info.get("lora"):  # a LoRA student: its adapters alone, as diffusers' LoRA loaders read them
            from rcm_core.config import LoraConfig
            from rcm_core.teachers.lora import exported_adapters, write_lora

            adapters = exported_adapters(state)
            if info.get("dtype", "float32") == "bfloat16":
                adapters = {k: v.to(torch.bfloat16) for k, v in adapters.items()}
            write_lora(out, adapters, LoraConfig(**info["lora"]), family)
        else:
            if info.get("dtype", "float32") == "bfloat16":
                state = _bf16_except_fp32_modules(state, family)
            module = diffusers_module(meta["config"], state, family)
            module.save_pretrained(
                str(out / export.TRANSFORMER_DIR),
                max_shard_size=info.get("max_shard_size", export.DEFAULT_MAX_SHARD_SIZE),
            )
        ev = info["eval"]
        record = export.sampler_record(
            mid_times=ev["student_mid_times"],
            step_counts=ev["student_steps"],
            latent_shape=info["data"]["latent_shape"],
            eval_seed=ev["seed"],
        )
        (out / export.SAMPLER_CONFIG).parent.mkdir(parents=True, exist_ok=True)
        (out / export.SAMPLER_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
        teacher = {**info.get("teacher", {}), "family": family.name, "guidance_scale": info["guidance_scale"]}
        card = export.model_card(
            job_id=info.get("job_id", "local"),
            family=family.name,
            class_name=family.class_name,
            teacher=teacher,
            dataset=info.get("dataset", {"dataset": info["data"]["dataset"]}),
            metrics=info.get("metrics", {}),
            record=record,
            spec=info.get("spec", {}),
            lora=info.get("lora"),
        )
        (out / "README.md").write_text(card)
        (out / "rcm.json").write_text(json.dumps({**info, "family": family.name}, indent=2, default=str) + "\n")

    def format_table(self, rows: list[dict]) -> str:
        lines = [f"{'model':<34} {'steps':>5} {'rel_l2':>9} {'mse':>11} {'ms/sample':>10}"]
        lines += [
            f"{r['model']:<34} {r['steps']:>5} {r['rel_l2']:>9.4f} {r['mse']:>11.4e} {r['ms_per_sample']:>10.1f}"
            for r in rows
        ]
        return "\n".join(lines)


def check_teacher_config(config: dict, cfg: DistillConfig, cp_degree: int):
    """The teacher's Family, after checking its config.json against the job before any weight is read: a
    supported `_class_name` and variant, teacher.family agreeing, student.lora's targets being the family's block
    linears, data.latent_shape fitting in_channels and patch_size, and Ulysses' rules for cp_degree (heads, and
    the latent's tokens). The service's submission
    check (service/teachers.py) applies the same rules.

    Raises:
        ConfigError: naming the spec field (teacher.family, student.lora.target_modules, data.latent_shape,
            resources.cp_degree).
    """
    from rcm_core.models.token_net import check_ulysses
    from rcm_core.teachers import detect_family

    family = detect_family(config, cfg.teacher.family)
    if cfg.student.lora is not None:  # block linears of this family only (rcm_core.teachers.lora)
        from rcm_core.teachers.lora import check_targets

        check_targets(cfg.student.lora, family)
    shape = cfg.data.latent_shape
    channels = config.get("in_channels")
    if channels is not None and shape[0] != channels:
        raise ConfigError(f"data.latent_shape: {shape[0]} channels, the teacher takes in_channels={channels}")
    patch = list(config.get("patch_size") or [1, 1, 1])
    if any(n % p for n, p in zip(shape[1:], patch, strict=True)):
        raise ConfigError(f"data.latent_shape: (F, H, W) = {tuple(shape[1:])} is not divisible by patch_size {patch}")
    grid = [n // p for n, p in zip(shape[1:], patch, strict=True)]
    positions = _rope_positions(config, patch)
    if positions is not None and max(grid) > positions:
        raise ConfigError(
            f"data.latent_shape: the grid {tuple(grid)} after patch_size exceeds {positions} RoPE positions"
        )
    tokens = math.prod(grid)
    try:
        check_ulysses(int(config.get("num_attention_heads", 1)), cp_degree, tokens, "latent_shape / patch_size")
    except ValueError as exc:
        raise ConfigError(f"resources.cp_degree: {exc}") from None
    return family


def _rope_positions(config: dict, patch: list[int]) -> int | None:
    # Wan: rope_max_seq_len per axis; Cosmos: its largest max_size / patch_size (both nets refuse a larger grid)
    if isinstance(config.get("rope_max_seq_len"), int):
        return int(config["rope_max_seq_len"])
    size = config.get("max_size")
    if isinstance(size, list | tuple) and len(size) == 3:
        return max(int(m) // int(p) for m, p in zip(size, patch, strict=True))
    return None


def text_dim(config: dict) -> int:
    """Width of the text tokens the transformer takes, from its config.json."""
    for key in TEXT_DIM_KEYS:
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ConfigError(f"teacher: config.json has none of {', '.join(TEXT_DIM_KEYS)} (the text-token width)")


def placeholder_conditions(n: int, tokens: int, dim: int, *, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """n placeholder prompts: standard-normal embeddings (n, tokens, dim), each a random length in [1, tokens],
    padding zeroed and masked out (not encoded text; see the module docstring)."""
    emb = torch.randn(n, tokens, dim, generator=generator)
    lengths = torch.randint(1, tokens + 1, (n,), generator=generator)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]  # (n, tokens)
    return {"tokens": emb * mask[..., None], "mask": mask}


class TeacherSyntheticData:
    """(x0, cond) pairs: placeholder prompts and the teacher's samples for them (drawn by `draw`)."""

    def __init__(self, cfg: DistillConfig, config: dict, *, device: torch.device | None):
        d = cfg.data
        channels = config.get("in_channels")
        if channels is not None and d.latent_shape[0] != channels:
            raise ConfigError(f"data.latent_shape: {d.latent_shape[0]} channels, the teacher takes {channels}")
        self.cfg, self.device = cfg, torch.device(device or "cpu")
        self.sample_shape = tuple(d.latent_shape)
        self.text_shape = (d.text_tokens, text_dim(config))
        # CPU generators: the same conditions and noise on every rank and every device type
        gen = torch.Generator().manual_seed(cfg.train.seed)
        self.cond = _to(placeholder_conditions(d.num_prompts, *self.text_shape, generator=gen), self.device)
        eval_gen = torch.Generator().manual_seed(eval_seed(cfg))
        n_eval = cfg.eval.num_samples
        self.eval_cond = placeholder_conditions(n_eval, *self.text_shape, generator=eval_gen)
        self.eval_noise = torch.randn((n_eval, *self.sample_shape), generator=eval_gen)
        self.pool_noise = torch.randn((d.num_prompts, *self.sample_shape), generator=gen)
        self.x0: torch.Tensor | None = None
        self.reference: torch.Tensor = torch.empty(0)

    # -- drawn once, by the teacher, on every rank -----------------------------------------------------
    @torch.no_grad()
    def draw(self, teacher: FlowModel) -> None:
        """The pool's x0 (data.sample_steps Euler steps) and the evaluation reference (max(eval.teacher_steps)).

        A collective when `teacher` is sharded: every rank calls it with the same inputs. Chunks have
        train.batch_size rows (divisible by the data-parallel degree), the last one padded by repetition.
        """
        cfg = self.cfg
        steps = cfg.data.sample_steps
        self.x0 = self._sample(teacher, self.pool_noise, self.cond, steps).to(self.device)
        ref_steps = max(cfg.eval.teacher_steps)
        self.reference = self._sample(teacher, self.eval_noise, _to(self.eval_cond, self.device), ref_steps).cpu()

    def _sample(self, teacher: FlowModel, noise: torch.Tensor, cond: dict, steps: int) -> torch.Tensor:
        n, b = len(noise), self.cfg.train.batch_size
        w = self.cfg.teacher.guidance_scale
        padded = math.ceil(n / b) * b
        index = torch.arange(padded) % n
        out = []
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for chunk in index.split(b):
            c = {k: v[chunk.to(v.device)] for k, v in cond.items()}
            z = noise[chunk].to(self.device)
            null = self.null_cond(len(z), device=self.device)
            with amp:
                out.append(sample_euler(lambda x, t: guided_f(teacher, x, t, c, null, w), z, steps).float())  # noqa: B023
        return torch.cat(out)[:n]

    # -- what the Distiller draws --------------------------------------------------------------------
    def sample(self, batch_size: int, *, generator: torch.Generator):
        if self.x0 is None:
            raise RuntimeError("TeacherSyntheticData.draw(teacher) must run before training")
        i = self._index(batch_size, generator)
        return self.x0[i.to(self.x0.device)], {k: v[i] for k, v in self.cond.items()}

    def sample_cond(self, batch_size: int, *, generator: torch.Generator):
        i = self._index(batch_size, generator)
        return {k: v[i] for k, v in self.cond.items()}

    def null_cond(self, batch_size: int, device: torch.device | None = None):
        device = device or self.device
        tokens = torch.zeros((batch_size, *self.text_shape), device=device)
        return {
            "tokens": tokens,
            "mask": torch.zeros((batch_size, self.text_shape[0]), dtype=torch.bool, device=device),
        }

    def _index(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        i = torch.randint(len(self.cond["mask"]), (batch_size,), generator=generator, device=generator.device)
        return i.to(self.device)


class DatasetData(TeacherSyntheticData):
    """(x0, cond) batches streamed from an rcm-latents-v1 dataset (data.uri; rcm_core.data.latent_stream).

    Each data-parallel rank reads its own disjoint share (train.batch_size / dp_size samples a draw) and the
    shares are all-gathered into the global batch, in rank order, so that every rank holds the same global batch
    (the Distiller's invariant) and batch sharding hands each rank back exactly the rows it read. The reader's
    position (epoch, samples emitted) of every rank is part of the checkpoint (`position_state`): a restarted
    worker continues its epoch where the checkpoint left it, no sample twice.
    Prompts-only datasets (no latents) train DMD only (loss.scm_weight 0: the sCM term needs data latents; fill
    them with `rcm data prepare --synthesize` otherwise), with data.latent_shape giving the noise's shape.
    Evaluation: the dataset's first eval.num_samples prompts (in manifest order, the same on every rank) with the
    teacher's reference samples for them, drawn at job start as for teacher-synthetic.
    """

    def __init__(self, cfg: DistillConfig, config: dict, *, device: torch.device | None, access: DataAccess):
        import pyarrow.fs as pafs

        from rcm_core.data.latent_shards import ShardFormatError, iter_shard, read_manifest
        from rcm_core.data.latent_stream import LatentStream

        d = cfg.data
        fs, root = access.fs or pafs.LocalFileSystem(), access.root or str(d.uri)
        try:
            manifest = read_manifest(fs, root)
        except ShardFormatError as exc:
            raise ConfigError(f"data.uri {d.uri}: {exc}") from None
        self.cfg, self.device, self.access = cfg, torch.device(device or "cpu"), access
        self.text_shape = (int(manifest.text["tokens"]), int(manifest.text["dim"]))
        if self.text_shape[1] != text_dim(config):
            raise ConfigError(
                f"data.uri {d.uri}: text.dim {self.text_shape[1]} in its manifest, the teacher takes {text_dim(config)}"
            )
        if manifest.latent is None:
            if cfg.loss.scm_weight > 0:
                raise ConfigError(
                    f"data.uri {d.uri}: a prompts-only dataset (no latents) trains DMD only: set method.scm_weight "
                    "to 0, or fill the latents with `rcm data prepare --synthesize`"
                )
            if len(d.latent_shape) != 4:
                raise ConfigError(f"data.latent_shape: required with the prompts-only dataset {d.uri}")
            self.sample_shape = tuple(d.latent_shape)
        else:
            self.sample_shape = tuple(manifest.latent["shape"])
        channels = config.get("in_channels")
        if channels is not None and self.sample_shape[0] != channels:
            raise ConfigError(
                f"data.uri {d.uri}: latents of {self.sample_shape[0]} channels, the teacher takes {channels}"
            )
        if cfg.train.batch_size % access.dp_size:
            raise ConfigError(
                f"schedule.batch_size ({cfg.train.batch_size}) is not divisible by the {access.dp_size} "
                "data-parallel ranks"
            )
        self.stream = LatentStream(
            fs,
            root,
            dp_rank=access.dp_rank,
            dp_size=access.dp_size,
            seed=cfg.train.seed,
            buffer_size=d.shuffle_buffer,
            latents=cfg.loss.scm_weight > 0,  # DMD draws conditions only: skip the latent column
            manifest=manifest,
        )
        n_eval = cfg.eval.num_samples
        first = []
        for shard in manifest.shards:  # only the first shards' text columns are read
            for row in iter_shard(fs, root, manifest, shard["name"], latents=False):
                first.append(row)
                if len(first) == n_eval:
                    break
            if len(first) == n_eval:
                break
        first = [first[i % len(first)] for i in range(n_eval)]  # a dataset smaller than the evaluation repeats
        mask = torch.stack([r["mask"] for r in first])
        self.eval_cond = {"tokens": torch.stack([r["tokens"] for r in first]) * mask[..., None], "mask": mask}
        eval_gen = torch.Generator().manual_seed(eval_seed(cfg))
        self.eval_noise = torch.randn((n_eval, *self.sample_shape), generator=eval_gen)
        self.x0 = None
        self.reference = torch.empty(0)

    @torch.no_grad()
    def draw(self, teacher: FlowModel) -> None:
        """The evaluation reference only (training draws from the dataset); a collective when sharded."""
        ref_steps = max(self.cfg.eval.teacher_steps)
        self.reference = self._sample(teacher, self.eval_noise, _to(self.eval_cond, self.device), ref_steps).cpu()

    def sample(self, batch_size: int, *, generator: torch.Generator):
        return self._batch(batch_size)

    def sample_cond(self, batch_size: int, *, generator: torch.Generator):
        return self._batch(batch_size)[1]

    def _batch(self, batch_size: int) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        from rcm_core.data.latent_stream import collate

        x0, cond = collate(self.stream.take(batch_size // self.access.dp_size))
        x0 = None if x0 is None else self._global(x0.to(self.device).float())
        tokens = self._global(cond["tokens"].to(self.device).float())
        mask = self._global(cond["mask"].to(self.device, torch.uint8)).bool()  # gloo and NCCL gather no bools
        return x0, {"tokens": tokens, "mask": mask}

    def _global(self, local: torch.Tensor) -> torch.Tensor:
        return local if self.access.gather is None else self.access.gather(local)

    # -- the reader's position, checkpointed with the Distiller ----------------------------------------
    def position_state(self) -> torch.Tensor:
        """(dp_size, 2) int64: (epoch, samples emitted) of every data-parallel rank (a collective), the same
        tensor on every rank, so the checkpoint holds one copy."""
        mine = torch.tensor([list(self.stream.position)], dtype=torch.long, device=self.device)
        return self._global(mine)

    def load_position(self, positions: torch.Tensor) -> None:
        if positions.shape[0] != self.access.dp_size:
            raise ConfigError(
                f"the checkpoint's data position is for {positions.shape[0]} data-parallel ranks, this job has "
                f"{self.access.dp_size}: resume with the same resources"
            )
        epoch, emitted = (int(v) for v in positions[self.access.dp_rank].tolist())
        self.stream.seek(epoch, emitted)


def _bf16_except_fp32_modules(state: dict[str, torch.Tensor], family) -> dict[str, torch.Tensor]:
    """Floating tensors to bfloat16, except those of the modules diffusers keeps in float32 (its class'
    _keep_in_fp32_modules, matched by key component as diffusers does): what from_pretrained(torch_dtype=bf16)
    would hold."""
    keep = set(getattr(family.diffusers_class(), "_keep_in_fp32_modules", None) or ())
    return {
        k: v.to(torch.bfloat16) if v.is_floating_point() and not keep & set(k.split(".")) else v
        for k, v in state.items()
    }


def _save_latents(latents: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in latents.items()}, str(path))


def distance_to_reference(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 per sample (mean over samples) and MSE of samples `x` against the reference samples."""
    diff = (x.double() - ref.double()).flatten(1)
    rel = diff.norm(dim=1) / ref.double().flatten(1).norm(dim=1).clamp_min(1e-12)
    return {"rel_l2": float(rel.mean()), "mse": float(diff.square().mean())}


def latent_grid(panels: list[tuple[str, torch.Tensor]], path: Path, *, columns: int = 4, scale: int = 4) -> Path:
    """A preview PNG, one row per sampler: channels 0-2 of each sample's first frame as RGB, each tile scaled by
    the reference row's range. A latent, not decoded video: it shows agreement, not what a viewer would see."""
    import numpy as np
    from PIL import Image, ImageDraw

    ref = panels[0][1][:columns, :3, 0].float()
    lo, hi = float(ref.min()), float(ref.max())
    h, w = ref.shape[-2:]
    cell_h, cell_w = h * scale + 4, w * scale + 4
    title_w = max(160, 6 * max(len(t) for t, _ in panels))
    img = Image.new("RGB", (title_w + columns * cell_w, len(panels) * cell_h), "white")
    draw = ImageDraw.Draw(img)
    for r, (title, x) in enumerate(panels):
        draw.text((4, r * cell_h + cell_h // 2 - 6), title, fill="black")
        for c, latent in enumerate(x[:columns]):
            rgb = latent[:3, 0].float()
            rgb = torch.cat([rgb, rgb[:1].expand(3 - len(rgb), -1, -1)]) if len(rgb) < 3 else rgb
            arr = ((rgb - lo) / max(hi - lo, 1e-12)).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(np.ascontiguousarray(arr)).resize((w * scale, h * scale), Image.NEAREST)
            img.paste(tile, (title_w + c * cell_w + 2, r * cell_h + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _to(cond: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in cond.items()}
