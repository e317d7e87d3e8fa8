"""`rcm`: command-line interface for distillation, sampling, evaluation and the built-in benchmarks.

Bad input (unknown config key, bad value, missing file) exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from rcm_core.config import PRESETS, ConfigError, DistillConfig, apply_overrides, load_config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return n


def _step_list(value: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; every entry an integer >= 1."""
    return [_positive_int(v) for v in value.split(",")]


def _seed_list(value: str) -> list[int]:
    """'1000,2000' -> [1000, 2000]; every entry an integer >= 0."""
    try:
        seeds = [int(v) for v in value.split(",")]
    except ValueError:
        seeds = [-1]
    if min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {value!r}")
    return seeds


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def print_reporter(kind: str, **f) -> None:
    """Human-readable progress lines for the pipeline's events."""
    if kind == "step":
        extras = " ".join(f"{k}={f[k]:.4f}" for k in ("scm_loss", "dmd_loss", "fake_score_loss") if k in f)
        print(
            f"[distill] step {f['step']:>6}/{f['total']}  loss={f['loss']:.4f} {extras}  "
            f"{1000 * f.get('wall_seconds_per_step', f['step_seconds']):.0f} ms/step  eta {_fmt_eta(f['eta'])}",
            flush=True,
        )
    elif kind == "teacher_progress":
        print(f"[teacher] step {f['step']:>6}/{f['total']}  loss={f['loss']:.4f}", flush=True)
    elif kind == "teacher_training":
        print(f"[teacher] no cached teacher; training one ({f['steps']} steps) -> {f['path']}", flush=True)
    elif kind in ("teacher_trained", "teacher_cached"):
        print(f"[teacher] {kind.split('_')[1]}: {f['path']}", flush=True)
    elif kind == "checkpoint":
        print(f"[checkpoint] step {f['step']} -> {f['path']}", flush=True)
    elif kind == "resumed":
        print(f"[resume] from step {f['step']} ({f['path']})", flush=True)


def _config_from_args(args) -> DistillConfig:
    cfg = load_config(args.config) if getattr(args, "config", None) else PRESETS[args.preset]()
    return apply_overrides(cfg, args.set or [])


def cmd_distill(args) -> int:
    from rcm_core import pipeline

    cfg = _config_from_args(args)
    start = time.perf_counter()
    distiller = pipeline.distill(cfg, resume=not args.no_resume, reporter=print_reporter)
    print(f"[distill] done: {distiller.step} steps in {time.perf_counter() - start:.0f}s -> {cfg.train.output_dir}")
    if args.no_eval:
        return 0
    rows = _eval_checkpoint(distiller, cfg, Path(cfg.train.output_dir) / "eval")
    print(_table(cfg, rows))
    return 0


def cmd_teacher_train(args) -> int:
    from rcm_core import pipeline

    if args.preset == "shapes":
        return _train_shapes_teacher(args)
    if args.preset == "moving-shapes":
        return _train_moving_shapes_teacher(args)
    cfg = _config_from_args(args)
    if args.out:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(Path(args.out) / "run")))
    _, meta, path = pipeline.get_teacher(cfg, print_reporter)
    print(json.dumps({"path": str(path), **meta}, indent=2))
    return 0


def _train_shapes_teacher(args) -> int:
    import yaml

    from rcm_core.config import build_dataclass
    from rcm_core.shapes_teacher import ShapesTeacherConfig, evaluate_shapes, save_shapes_teacher, train_shapes_teacher

    overrides = {}
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        overrides[key] = yaml.safe_load(raw)
    cfg = build_dataclass(ShapesTeacherConfig, overrides)
    out = Path(args.out or "runs/teachers/shapes.safetensors")
    print(f"[teacher] shapes: {cfg.steps} steps of batch {cfg.batch_size} -> {out}", flush=True)
    net, record = train_shapes_teacher(
        cfg, progress=lambda s, n, loss: print(f"[teacher] step {s:>7}/{n}  loss={loss:.4f}", flush=True)
    )
    if not args.no_eval:
        record["eval"] = evaluate_shapes(
            net,
            samples_per_prompt=cfg.eval_samples_per_prompt,
            num_steps=cfg.sample_steps,
            guidance_scale=cfg.guidance_scale,
        )
        print(json.dumps({"geneval_style_score": record["eval"]}, indent=2))
    save_shapes_teacher(net, out, cfg, record)
    print(f"[teacher] saved {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _train_moving_shapes_teacher(args) -> int:
    import yaml

    from rcm_core.moving_shapes_teacher import train_command

    overrides = {}
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        overrides[key] = yaml.safe_load(raw)
    out = args.out or "runs/teachers/moving_shapes_teacher"
    try:
        train_command(out, overrides, evaluate=not args.no_eval, log=lambda line: print(line, flush=True))
    except ValueError as exc:  # the config dataclass' own checks
        raise ConfigError(f"teacher: {exc}") from None
    return 0


def _load_checkpoint_arg(path: str):
    from rcm_core import pipeline
    from rcm_core.checkpoint import latest_checkpoint

    p = Path(path)
    if not (p / "manifest.json").is_file():
        latest = latest_checkpoint(p / "checkpoints") or latest_checkpoint(p)
        if latest is None:
            raise ConfigError(f"--checkpoint: {p} is neither a checkpoint directory nor a run directory with one")
        p = latest
    return pipeline.load_student(p)


def cmd_sample(args) -> int:
    import torch

    if args.student:
        return _sample_diffusers_student(args)
    if args.prompt_embeds or args.vae or args.latent_shape or args.teacher:
        raise ConfigError(
            "--prompt-embeds, --vae, --latent-shape and --teacher go with --student (a diffusers student export)"
        )
    args.seed = 0 if args.seed is None else args.seed
    distiller, cfg, _ = _load_checkpoint_arg(args.checkpoint)
    model = distiller.ema.model if args.ema else distiller.student
    out = Path(args.out)
    if cfg.task == "shapes":
        return _sample_shapes(model, cfg, args, out)
    if args.prompt:
        raise ConfigError("--prompt: only a shapes (text-to-image) checkpoint takes prompts; this one is 2-D")
    n = args.num_samples or 1000
    from rcm_core.tasks.toy2d import sample_student

    x = sample_student(model, distiller.task, n, args.steps, seed=args.seed, mid_times=cfg.eval.student_mid_times)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        from rcm_core.eval.toy2d import scatter_grid

        scatter_grid([(f"student {args.steps}-step", x)], out, columns=1)
    elif out.suffix == ".csv":
        out.write_text("x,y\n" + "".join(f"{a:.6f},{b:.6f}\n" for a, b in x.tolist()))
    else:
        torch.save(x, out)
    print(f"[sample] {n} samples, {args.steps} step(s) -> {out}")
    return 0


def _sample_shapes(model, cfg: DistillConfig, args, out: Path) -> int:
    """Images of a text-to-image student: `num_samples` per prompt, one grid row each (rcm_core.preview)."""
    import torch

    from rcm_core import preview
    from rcm_core.eval import shapes as ev

    if out.suffix not in (".png", ".pt"):
        raise ConfigError(f"--out: a shapes checkpoint writes .png (grid) or .pt (uint8 images), got {out.name!r}")
    n = args.num_samples or 8
    captions = args.prompt or ev.GRID_PROMPTS
    try:
        images, labels = preview.shapes_grid(
            model,
            cfg,
            captions,
            num_samples=n,
            steps=args.steps,
            seed=args.seed,
            grid=out if out.suffix == ".png" else None,
        )
    except ConfigError as e:
        raise ConfigError(f"--prompt: {e}") from None
    if out.suffix == ".pt":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images, "captions": labels}, out)
    shown = " (16 a row shown in the grid; .pt keeps all)" if out.suffix == ".png" and n > 16 else ""
    print(f"[sample] {n} image(s) for each of {len(captions)} prompt(s), {args.steps} step(s) -> {out}{shown}")
    return 0


def _sample_diffusers_student(args) -> int:
    """Few-step samples of a diffusers student export (rcm_core.export): latents.safetensors, and with --vae the
    decoded frames as PNG (one folder per sample) and an animated GIF each (Pillow; MP4 would need ffmpeg)."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from rcm_core import export
    from rcm_core.models.flow import FlowModel
    from rcm_core.sampling import DEFAULT_MID_TIMES, student_times
    from rcm_core.tasks.diffusers import text_dim
    from rcm_core.teachers import load_diffusers_net, read_config

    if args.prompt_embeds is None:
        raise ConfigError("--prompt-embeds: required with --student (a .safetensors with tokens, and mask)")
    if args.prompt:
        raise ConfigError("--prompt: a diffusers student takes encoded prompts: use --prompt-embeds")
    out = Path(args.out)
    if out.suffix:
        raise ConfigError(f"--out: a diffusers student writes a directory, got {out.name!r}")
    student = args.student
    with tempfile.TemporaryDirectory(prefix="rcm-student-") as tmp:
        if student.startswith("s3://"):
            root = export.download_export(student, Path(tmp) / "export")
        else:
            root = Path(student)
            if not root.is_dir():
                raise ConfigError(f"--student: {root} is not a directory")
            if (root / export.MANIFEST).is_file():
                export.check_complete(root)
        record = export.read_sampler_record(root) or {}
        embeds = export.load_prompt_embeds(Path(args.prompt_embeds))
        lora = (root / export.LORA_WEIGHTS).is_file() and not (root / export.TRANSFORMER_DIR).is_dir()
        if lora and not args.teacher:
            raise ConfigError(
                f"--teacher: the student is a LoRA ({export.LORA_WEIGHTS}): give the teacher's transformer folder"
            )
        if args.teacher and not lora:
            raise ConfigError(f"--teacher: only for a LoRA export ({export.LORA_WEIGHTS}), not {student}")
        folder = Path(args.teacher) if lora else export.transformer_dir(root)
        config = read_config(folder)
        width = text_dim(config)
        if embeds["tokens"].shape[-1] != width:
            raise ConfigError(
                f"--prompt-embeds: tokens are {embeds['tokens'].shape[-1]} wide, the student takes {width}"
            )
        if lora:
            from rcm_core.teachers.lora import load_lora_student

            net, family = load_lora_student(folder, root)
        else:
            net, family, _ = load_diffusers_net(folder, dtype=torch.float32)
        model = FlowModel(net, "rf").eval()
    schedule = record.get("schedules", {}).get(str(args.steps))
    times = (
        schedule["trigflow_times"]
        if schedule
        else student_times(args.steps, record.get("mid_times", DEFAULT_MID_TIMES))
    )
    seed = args.seed if args.seed is not None else int(record.get("eval_seed", 0))
    noise = embeds.get("noise")
    if noise is None:
        shape = args.latent_shape or record.get("latent_shape")
        if not shape:
            raise ConfigError(
                "--latent-shape: required (C,F,H,W) when the export records none and the file has no noise"
            )
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(embeds["tokens"]), *shape), generator=gen)
    cond = {"tokens": embeds["tokens"], "mask": embeds["mask"]}
    try:
        latents = export.sample_student(model, cond, noise, times, seed)
    except ValueError as exc:  # the net's own shape checks (patch size, RoPE positions)
        raise ConfigError(f"--latent-shape: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, str(out / "latents.safetensors"))
    info = {"student": student, "family": family.name, "steps": args.steps, "trigflow_times": times, "seed": seed}
    info["sigmas"] = export.rf_sigmas(times)
    (out / "sampler.json").write_text(json.dumps(info, indent=2) + "\n")
    written = "latents.safetensors"
    if args.vae:
        from rcm_core.teachers.vae import decode_latents, load_vae

        frames = decode_latents(load_vae(args.vae), latents)
        _write_frames(frames, out)
        written += f", {len(frames)} x {frames.shape[1]} PNG frame(s) + GIF"
    print(f"[sample] {len(latents)} sample(s), {args.steps} step(s), seed {seed} -> {out} ({written})")
    return 0


def _write_frames(frames, out: Path) -> None:
    """frames uint8 (B, T, H, W, 3) -> out/sample-<b>/frame-<t>.png and out/sample-<b>.gif (10 fps)."""
    from PIL import Image

    for b, video in enumerate(frames.numpy()):
        folder = out / f"sample-{b:03d}"
        folder.mkdir(exist_ok=True)
        images = [Image.fromarray(frame) for frame in video]
        for t, image in enumerate(images):
            image.save(folder / f"frame-{t:04d}.png")
        images[0].save(out / f"sample-{b:03d}.gif", save_all=True, append_images=images[1:], duration=100, loop=0)


def _eval_checkpoint(distiller, cfg: DistillConfig, out_dir: Path) -> list[dict]:
    """The task's final report (teacher vs EMA student), as the Ray worker writes it; saved under out_dir."""
    from rcm_core.eval import report_json
    from rcm_core.tasks import final_report

    out_dir.mkdir(parents=True, exist_ok=True)
    rows, _ = final_report(cfg, distiller.teacher, distiller.ema.model, distiller.task, {}, out_dir / "samples.png")
    report = out_dir / "report.json"
    report.write_text(report_json({"rows": rows, "step": distiller.step, "config": dataclasses.asdict(cfg)}))
    print(f"[eval] report -> {report}, grid -> {out_dir / 'samples.png'}")
    return rows


def cmd_eval(args) -> int:
    if args.num_samples is not None and args.num_samples < 10:
        raise ConfigError(f"--num-samples: must be >= 10 for an evaluation, got {args.num_samples}")
    distiller, cfg, _ = _load_checkpoint_arg(args.checkpoint)
    if args.steps:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, student_steps=args.steps))
    if args.num_samples:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_samples=args.num_samples))
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    print(_table(cfg, _eval_checkpoint(distiller, cfg, out)))
    return 0


def _table(cfg: DistillConfig, rows: list[dict]) -> str:
    from rcm_core.tasks import get_task

    return get_task(cfg.task).format_table(rows)


def cmd_demo(args) -> int:
    """rCM on the 2-D ring with the short CPU schedule; prints teacher vs. student at 1/2/4 steps."""
    from rcm_core import pipeline

    demo = ["eval.teacher_steps=[1,2,4,32]", f"train.output_dir={args.out}"]
    cfg = apply_overrides(PRESETS["toy2d-rcm"](), demo + (args.set or []))
    print(f"[demo] rCM distillation of a 2-D flow teacher ({cfg.train.steps} steps) -> {cfg.train.output_dir}")
    start = time.perf_counter()
    distiller = pipeline.distill(cfg, resume=False, reporter=print_reporter)
    rows = _eval_checkpoint(distiller, cfg, Path(cfg.train.output_dir) / "eval")
    print(_table(cfg, rows))
    print(f"[demo] total {time.perf_counter() - start:.0f}s")
    return 0


def _mid_times(value: str) -> list[float]:
    from rcm_core.config import check_mid_times

    try:
        times = [float(v) for v in value.split(",")]
        check_mid_times(times)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{value!r}: {err}") from None
    return times


def _default_judge_workers() -> int:
    """On a GPU machine the clip judge (numpy, ~10 ms a clip) would dominate: use up to 8 cores; on a CPU machine
    the cores are the sampler's."""
    import os

    return min(8, (os.cpu_count() or 1) - 1) if _cuda_available() else 0


def _bench_moving_shapes(args) -> int:
    from rcm_core.benchmarks.moving_shapes import run_moving_shapes_benchmark

    if not args.teacher:
        raise ConfigError("bench moving-shapes: --teacher DIR (a moving-shapes teacher folder) is required")
    if args.teacher_only or args.rescore or args.weights != "ema":
        raise ConfigError("bench moving-shapes: --teacher-only, --rescore and --weights are bench shapes options")
    if args.student_mid_times and len(args.student_mid_times) > 1:
        raise ConfigError("bench moving-shapes: give --student-mid-times once (one schedule for every student)")
    runs = []
    for item in args.run or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_dir():
            raise ConfigError(f"--run {item}: expected NAME=DIR with an existing run or export directory")
        runs.append((name, Path(path)))
    if not Path(args.teacher).is_dir():
        raise ConfigError(f"--teacher {args.teacher}: not a directory")
    text, files = run_moving_shapes_benchmark(
        Path(args.teacher),
        runs,
        Path(args.out),
        num_samples=args.num_samples or 1024,
        diversity_k=args.diversity_samples,
        seeds=args.seeds,
        teacher_steps=args.teacher_steps,
        mid_times=args.student_mid_times[0] if args.student_mid_times else None,
        judge_workers=args.judge_workers if args.judge_workers is not None else _default_judge_workers(),
        student_steps=args.student_steps,
    )
    print(text)
    print("[bench] saved " + ", ".join(map(str, files)))
    return 0


def cmd_bench(args) -> int:
    if args.task != "moving-shapes" and (args.teacher or args.seeds or args.student_steps or args.judge_workers):
        raise ConfigError("--teacher, --seeds, --student-steps and --judge-workers are bench moving-shapes options")
    if args.task == "moving-shapes":
        return _bench_moving_shapes(args)
    if args.task == "shapes":
        from rcm_core.benchmarks.shapes import rescore_shapes_benchmark, run_shapes_benchmark

        if args.rescore:
            if args.run or args.teacher_only:
                raise ConfigError("bench shapes: --rescore samples nothing; drop --run / --teacher-only")
            table, files = rescore_shapes_benchmark(Path(args.rescore), Path(args.out))
            print(table)
            print("[bench] saved " + ", ".join(map(str, files)))
            return 0
        if bool(args.run) == args.teacher_only:
            raise ConfigError(
                "bench shapes: give the students' run directories with --run NAME=DIR (one or more), "
                "or --teacher-only for the shipped teacher's rows"
            )
        runs = {}
        for item in args.run or []:
            name, sep, path = item.partition("=")
            if not sep or not Path(path).is_dir():
                raise ConfigError(f"--run {item}: expected NAME=DIR with an existing run directory")
            runs[name] = Path(path)
        table, files = run_shapes_benchmark(
            runs,
            Path(args.out),
            num_samples=args.num_samples or 1008,
            diversity_k=args.diversity_samples,
            teacher_steps=args.teacher_steps or [50, 4],
            mid_times=args.student_mid_times,
            weights=args.weights,
        )
        print(table)
        print("[bench] saved " + ", ".join(map(str, files)))
        return 0
    if args.run or args.student_mid_times or args.weights != "ema" or args.teacher_only or args.rescore:
        raise ConfigError(
            "bench toy2d: --run, --teacher-only, --rescore, --student-mid-times and --weights are bench shapes options"
        )
    from rcm_core.benchmarks.toy2d import run_toy2d_benchmark

    table, files = run_toy2d_benchmark(Path(args.out), overrides=args.set or [], reporter=print_reporter)
    print(table)
    print("[bench] saved " + ", ".join(map(str, files)))
    return 0


def _size(value: str) -> tuple[int, int]:
    """'480x832' -> (480, 832): height x width in pixels."""
    h, sep, w = value.lower().partition("x")
    try:
        size = (int(h), int(w))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 480x832; got {value!r}")
    return size


def _latent_shape(value: str) -> tuple[int, int, int, int]:
    """'16,21,60,104' -> (C, F, H, W), each >= 1."""
    parts = value.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"expected C,F,H,W (4 integers), got {value!r}")
    return tuple(_positive_int(v) for v in parts)  # type: ignore[return-value]


def cmd_data_prepare(args) -> int:
    from rcm_core.data.prepare import PrepareConfig, prepare_dataset

    device = args.device or ("cuda" if _cuda_available() else "cpu")
    cfg = PrepareConfig(
        prompts=args.prompts,
        pipeline=args.pipeline,
        out=args.out,
        media=args.media,
        size=args.size,
        synthesize=args.synthesize,
        latent_shape=args.latent_shape,
        steps=args.steps,
        guidance=args.guidance,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        batch_size=args.batch_size,
        samples_per_shard=args.samples_per_shard,
        max_sequence_length=args.max_sequence_length,
        dtype=args.dtype,
        device=device,
    )
    summary = prepare_dataset(cfg, progress=lambda line: print(line, flush=True))
    latents = f"{summary['latents_per_s']:.2f} latents/s" if summary["latents_per_s"] is not None else "no latents"
    print(
        f"[prepare] {summary['count']} samples in {summary['shards']} shard(s) -> {summary['out']} "
        f"({summary['seconds']:.1f}s; text encoder {summary['prompts_per_s']:.2f} prompts/s, {latents})"
    )
    return 0


def cmd_data_moving_shapes(args) -> int:
    from rcm_core.data.moving_shapes_dataset import write_dataset

    summary = write_dataset(
        args.out,
        count=args.count,
        split=args.split,
        seed=args.seed,
        workers=args.workers,
        text_tokens=args.text_tokens,
        text_dim=args.text_dim,
        text_seed=args.text_seed,
        samples_per_shard=args.samples_per_shard,
        progress=lambda line: print(line, flush=True) if args.verbose else None,
    )
    print(
        f"[moving-shapes] {summary['count']} {summary['split']} clips in {summary['shards']} shard(s) -> "
        f"{summary['out']} ({summary['seconds']:.1f}s, {summary['clips_per_s']:.0f} clips/s)"
    )
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="rcm",
        description="rCM distillation: distill a flow/diffusion teacher into a few-step student.",
        epilog="Job commands against the REST API: rcm submit SPEC | jobs | status ID | logs [-f] ID | cancel ID "
        "(see `rcm submit --help`).",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_config(sp, *, required: bool = False, extra_presets: tuple[str, ...] = ()):
        if required:
            sp.add_argument("config", help="YAML config (see configs/)")
        else:
            sp.add_argument("--config", help="YAML config (default: the preset)")
        choices = sorted(PRESETS) + list(extra_presets)
        sp.add_argument("--preset", default="toy2d-rcm", choices=choices, help="base config")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.steps=500")

    d = sub.add_parser("distill", help="distill a student from a YAML config")
    add_config(d, required=True)
    d.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in output_dir")
    d.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    d.set_defaults(func=cmd_distill)

    t = sub.add_parser("teacher", help="teacher commands")
    tsub = t.add_subparsers(dest="teacher_command", required=True, parser_class=_Parser)
    tt = tsub.add_parser(
        "train", help="train (or find cached) a built-in teacher: 2-D (toy2d-*), shapes (T2I) or moving-shapes (T2V)"
    )
    add_config(tt, extra_presets=("shapes", "moving-shapes"))
    tt.add_argument(
        "--out", help="toy2d: directory for the teacher; shapes: the .safetensors path; moving-shapes: a folder"
    )
    tt.add_argument("--no-eval", action="store_true", help="shapes: skip the GenEval-style evaluation")
    tt.set_defaults(func=cmd_teacher_train)

    s = sub.add_parser(
        "sample",
        help="sample from a checkpoint, or from a diffusers student export (--student)",
        description="--checkpoint: a run's checkpoint (2-D or shapes). --student: a diffusers student export "
        "(a job's s3://.../jobs/ID/export/ or a local copy; a bare transformer folder too) with "
        "--prompt-embeds (a LoRA export also with --teacher, the transformer folder it adapts); writes "
        "OUT/latents.safetensors and, with --vae, PNG frames and a GIF per sample.",
    )
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint dir (step-N) or run dir (latest)")
    source.add_argument("--student", help="diffusers student export: a directory or s3://bucket/jobs/ID/export/")
    s.add_argument(
        "--prompt-embeds",
        help="--student: .safetensors with tokens (B, L, D), optional mask (B, L) and noise (B, C, F, H, W)",
    )
    s.add_argument("--vae", help="--student: a diffusers VAE folder (AutoencoderKLWan) to decode the latents")
    s.add_argument(
        "--teacher",
        help="--student of a LoRA job (pytorch_lora_weights.safetensors): the teacher's transformer folder it adapts",
    )
    s.add_argument(
        "--latent-shape",
        type=lambda v: [_positive_int(x) for x in v.split(",")],
        metavar="C,F,H,W",
        help="--student: latent shape when neither the export nor the embeddings file gives one",
    )
    s.add_argument("--steps", type=_positive_int, default=4, help="student sampling steps")
    s.add_argument(
        "--num-samples", type=_positive_int, help="2-D: points (default 1000); shapes: images per prompt (default 8)"
    )
    s.add_argument(
        "--seed", type=int, help="default 0; --student: the export's evaluation seed (reproduces its samples)"
    )
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use EMA weights")
    s.add_argument(
        "--prompt",
        action="append",
        metavar="CAPTION",
        help="shapes only, repeatable: a caption of the grammar (default: the benchmark grid's 8 prompts)",
    )
    s.add_argument(
        "--out",
        required=True,
        help="2-D: .png (scatter), .csv or .pt (tensor); shapes: .png (one row per prompt, up to 16 shown) or .pt; "
        "--student: a directory",
    )
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="evaluate a checkpoint against its teacher: JSON report + PNG grid")
    e.add_argument("--checkpoint", required=True, help="checkpoint dir (step-N) or run dir (latest)")
    e.add_argument("--steps", type=_step_list, help="student steps, e.g. 1,2,4")
    e.add_argument("--num-samples", type=_positive_int)
    e.add_argument("--out", help="output directory (default: CHECKPOINT/eval)")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("demo", help="the short CPU demo: rCM on the 2-D benchmark")
    m.add_argument("--out", default="runs/demo", help="run directory")
    m.add_argument("--set", action="append", metavar="KEY=VALUE")
    m.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmark tables: teacher vs sCM / DMD / rCM students (toy2d or shapes)")
    b.add_argument("task", choices=["toy2d", "shapes", "moving-shapes"])
    b.add_argument("--out", default="runs/bench")
    b.add_argument(
        "--run",
        action="append",
        metavar="NAME=DIR",
        help="shapes: a distilled student's run directory; moving-shapes: a run directory or a diffusers export "
        "(repeat a NAME, e.g. two seeds of rCM, to average them)",
    )
    b.add_argument(
        "--num-samples",
        type=_positive_int,
        help="shapes: images per row (default 1008 = 126 prompts x 8); moving-shapes: clips per row (default 1024)",
    )
    b.add_argument("--diversity-samples", type=_positive_int, default=32, help="samples per diversity prompt")
    b.add_argument(
        "--teacher-steps",
        type=_step_list,
        help="teacher Euler steps, e.g. 50,4 (default: shapes 50,4; moving-shapes its default sampler's and 4)",
    )
    b.add_argument("--student-steps", type=_step_list, help="moving-shapes: student steps (default 1,2,4)")
    b.add_argument("--teacher", help="moving-shapes: the teacher folder (rcm teacher train --preset moving-shapes)")
    b.add_argument(
        "--judge-workers",
        type=int,
        help="moving-shapes: processes judging clips (default: up to 8 on a GPU machine, 0 = in-process on a CPU one)",
    )
    b.add_argument("--seeds", type=_seed_list, help="moving-shapes: sampling seeds to average, e.g. 1000,2000")
    b.add_argument(
        "--student-mid-times",
        action="append",
        type=_mid_times,
        metavar="T1,T2,T3",
        help="shapes: the students' intermediate sampling times (default: each run's eval.student_mid_times); "
        "repeat to compare schedules",
    )
    b.add_argument("--weights", choices=["ema", "raw"], default="ema", help="shapes: EMA (default) or raw student")
    b.add_argument("--teacher-only", action="store_true", help="shapes: the shipped teacher's rows alone, no --run")
    b.add_argument(
        "--rescore", metavar="DIR", help="shapes: re-score DIR/images.npz of an earlier bench with the current judge"
    )
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every student run")
    b.set_defaults(func=cmd_bench)

    dt = sub.add_parser("data", help="dataset commands")
    dsub = dt.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    dp = dsub.add_parser(
        "prepare",
        help="prompt file (+ images / frame folders, or --synthesize) -> rcm-latents-v1 shards, encoded with the "
        "teacher pipeline's own text encoder and VAE",
    )
    dp.add_argument("prompts", help="prompt file: UTF-8, one prompt per line")
    dp.add_argument(
        "--pipeline", required=True, help="diffusers pipeline directory (model_index.json, tokenizer/, ...)"
    )
    dp.add_argument("--out", required=True, help="output: a local directory or s3://bucket/prefix (must be new)")
    dp.add_argument("--media", help="list file: line i is the image or frame folder for prompt i (VAE latents)")
    dp.add_argument("--size", type=_size, help="with --media: HEIGHTxWIDTH pixels (resize to cover + centre crop)")
    dp.add_argument("--synthesize", action="store_true", help="latents = the teacher transformer's samples")
    dp.add_argument("--latent-shape", type=_latent_shape, help="with --synthesize: C,F,H,W of each latent")
    dp.add_argument("--steps", type=_positive_int, default=50, help="with --synthesize: teacher Euler steps")
    dp.add_argument("--guidance", type=float, help="with --synthesize: CFG scale as the pipeline takes it "
                    "(default: the family's, Wan 5.0, Cosmos 7.0)")  # fmt: skip
    dp.add_argument("--negative-prompt", help="with --synthesize: default the pipeline's default negative prompt")
    dp.add_argument("--seed", type=int, default=0, help="with --synthesize: sample i's noise is seeded SEED + i")
    dp.add_argument("--batch-size", type=_positive_int, default=8)
    dp.add_argument("--samples-per-shard", type=_positive_int, default=256)
    dp.add_argument("--max-sequence-length", type=_positive_int, default=512, help="text tokens per prompt")
    dp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    dp.add_argument("--device", help="default: cuda when available, else cpu")
    dp.set_defaults(func=cmd_data_prepare)
    dm = dsub.add_parser(
        "moving-shapes",
        help="render moving-shapes clips (pixels as latents) + frozen text embeddings -> rcm-latents-v1 shards",
    )
    dm.add_argument("--out", required=True, help="output: a local directory or s3://bucket/prefix (must be new)")
    dm.add_argument("--count", type=_positive_int, required=True, help="number of clips")
    dm.add_argument("--split", choices=["train", "held_out"], default="train", help="prompt split to draw from")
    dm.add_argument("--seed", type=int, default=0, help="the dataset is a function of (count, split, seed)")
    dm.add_argument("--workers", type=int, default=0, help="rendering processes (0/1: this process)")
    dm.add_argument("--text-tokens", type=_positive_int, default=16, help="text tokens L per caption")
    dm.add_argument("--text-dim", type=_positive_int, default=64, help="text token width D (the teacher's text_dim)")
    dm.add_argument("--text-seed", type=int, default=0, help="seed of the frozen word table")
    dm.add_argument("--samples-per-shard", type=_positive_int, default=4096)
    dm.add_argument("--verbose", action="store_true", help="a progress line per rendered chunk")
    dm.set_defaults(func=cmd_data_moving_shapes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"rcm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rcm: interrupted (the last checkpoint is kept; rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
