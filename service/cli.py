"""``tta``: train, generate, serve (and, later, distil, post-train and export)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import get_args

from service.schemas import FormatName
from service.settings import DEFAULT_MP3_BITRATE_KBPS, MP3_BITRATES_KBPS, PolicyName, Precision

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            kind = type(default) if default is not None else _optional_type(f.type)
            parser.add_argument(flag, type=kind, default=default, help=f"(default: {default})")


def _optional_type(annotation) -> type:
    """The value type of an ``X | None`` field (annotations are strings: ``from __future__ import annotations``)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return next((t for t in (float, str) if t.__name__ in text), int)


def _dataclass_from_args(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def cmd_train_autoencoder(args) -> None:
    from models.training.autoencoder import AutoencoderTrainConfig, train_autoencoder

    cfg = _dataclass_from_args(AutoencoderTrainConfig, args)
    train_autoencoder(args.out, args.run_dir, cfg)


def cmd_train_teacher(args) -> None:
    from models.training.teacher import TeacherTrainConfig, train_teacher

    cfg = _dataclass_from_args(TeacherTrainConfig, args)
    train_teacher(args.out, args.run_dir, args.codec, cfg)


def cmd_distill(args) -> None:
    from models.diffusion.weighting import WEIGHTINGS
    from models.training.distill import DistillConfig, run_distill

    cfg = _dataclass_from_args(DistillConfig, args)
    if cfg.weighting not in WEIGHTINGS:
        raise SystemExit(f"--weighting must be one of {', '.join(WEIGHTINGS)}")
    run_dir = args.run_dir or f"runs/distill-{cfg.weighting}"
    out = run_distill(args.source, args.out, run_dir, cfg, name=args.name, cache_dir=args.cache_dir,
                      stop_at=args.stop_after)
    print("students: " + ", ".join(str(p) for p in out))


def cmd_arc(args) -> None:
    from models.training.arc import ARCConfig, run_arc

    cfg = _dataclass_from_args(ARCConfig, args)
    out = run_arc(args.source, args.out, args.run_dir, cfg, cache_dir=args.cache_dir, stop_at=args.stop_after)
    print(f"ARC model: {out}")


def cmd_generate(args) -> None:
    """One generation offline, through what the server runs: the model registry, the runtime, the engine and the
    pipeline (so any model directory the server serves, a downloaded checkpoint included, works here too)."""
    import pydantic
    import torch

    from models.registry import resolve_model
    from service.audio import FORMATS, encode_audio
    from service.engine import Engine
    from service.errors import ApiError
    from service.gateway import resolve_request
    from service.metrics import Metrics
    from service.runtimes import load_runtime
    from service.schemas import GenerateRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    fmt = args.format or Path(args.output).suffix.lstrip(".").lower() or "wav"
    if fmt not in FORMATS:
        raise SystemExit(f"--format {fmt!r}: expected one of {', '.join(FORMATS)} (or an output file ending in one)")
    try:
        inpaint = [float(x) for x in args.inpaint.split(",")] if args.inpaint else [None, None]
        if len(inpaint) != 2:
            raise ValueError(f"--inpaint {args.inpaint!r}: expected START,END in seconds")
        body = GenerateRequest(prompt=args.prompt, duration=args.duration, steps=args.steps, guidance=args.guidance,
                               seed=args.seed, format=fmt, negative_prompt=args.negative_prompt,
                               init_noise_level=args.init_noise_level, inpaint_start=inpaint[0],
                               inpaint_end=inpaint[1])
        clip = Path(args.init_audio).read_bytes() if args.init_audio else None
        path = resolve_model(args.model, args.model_dir)
    except (pydantic.ValidationError, ValueError, OSError) as exc:
        raise SystemExit(str(exc)) from None
    runtime = load_runtime(path, args.runtime, args.device)
    engine = Engine({runtime.model_name: runtime}, Metrics(), max_batch=1, queue_size=1)
    try:
        spec = resolve_request(body, {runtime.model_name: engine.runners[runtime.model_name].pipeline},
                               runtime.model_name, clip)
    except ApiError as exc:
        raise SystemExit(exc.message) from None
    engine.start()
    try:
        result = engine.generate_sync(dict(id="cli", **spec.job_fields()), timeout=args.timeout)
    finally:
        engine.stop()
    data, _ = encode_audio(result.wave, result.sample_rate, fmt, args.mp3_bitrate)
    Path(args.output).write_bytes(data)
    t, sample = result.timings, spec.sample
    print(f"wrote {args.output}: {sample.duration:.2f} s, model {spec.model} ({runtime.name}), {sample.steps} steps, "
          f"guidance {sample.guidance:g}, seed {sample.seed}; encode {t['encode'] * 1e3:.0f} ms, denoise "
          f"{t['denoise'] * 1e3:.0f} ms, decode {t['decode'] * 1e3:.0f} ms")


def cmd_serve(args) -> None:
    from service.__main__ import serve

    serve(host=args.host, port=args.port, model_dir=args.model_dir, default_model=args.default_model,
          device=args.device, runtime=args.runtime, policy=args.policy, max_batch=args.max_batch,
          threads=args.threads, log_level=args.log_level, torch_compile=args.compile,
          compile_blocks=args.compile_blocks, precision=args.precision,
          decode_precision=args.decode_precision, cuda_graphs=args.cuda_graphs,
          whole_generation=args.whole_generation, tick_graphs=args.tick_graphs)


def cmd_export(args) -> None:
    from models.registry import resolve_model

    try:
        model_path = resolve_model(args.model)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    from models.export import ExportError, MissingPackage
    from models.export.onnx_export import ensure_onnx_export, export_onnx

    if args.format == "tensorrt":  # before the ONNX export, which the engines are built from
        from models.export.tensorrt import import_tensorrt

        try:
            import_tensorrt("--format tensorrt")
        except MissingPackage as exc:
            raise SystemExit(f"{exc}; --format onnx works everywhere") from None
    try:
        done = export_onnx(model_path, args.out) if args.force else ensure_onnx_export(model_path, args.out)
    except (ExportError, MissingPackage) as exc:
        raise SystemExit(f"export failed: {exc}") from None
    _print_onnx_export(done)
    if args.format == "tensorrt":
        _build_tensorrt(model_path, done, args.precision, args.force)


def _print_onnx_export(done) -> None:
    m = done.manifest
    print(f"{m['model']}: ONNX opset {m['opset']} in {done.dir} (created {m['created']})")
    for g in m["graphs"].values():
        checks = ", ".join(f"{metric} {g['parity'][metric]:.2e} <= {limit:g}"
                           for metric, limit in g["parity"]["tolerance"].items())
        size = g["bytes"] + (g.get("external_data") or {}).get("bytes", 0)  # the graph and its external weights
        print(f"  {g['file']:<18} {size / 1e6:7.1f} MB  vs PyTorch: {checks}")


def _build_tensorrt(model_path: Path, export, precision: str, force: bool) -> None:
    """TensorRT engines from the ONNX export (those missing or stale; all with ``force``), one line per graph."""
    from models.export import ExportError
    from models.export.tensorrt_engines import engines_dir, ensure_engines

    try:
        plans = ensure_engines(model_path, export, precision, force=force)
    except ExportError as exc:
        raise SystemExit(f"TensorRT build failed: {exc}") from None
    print(f"TensorRT engines in {engines_dir(export)}:")
    for graph, plan in plans.items():
        record, key = plan.record, plan.key
        if "failed" in record:
            print(f"  {graph:<14} runs under ONNX Runtime: {record['failed']}")
        else:
            print(f"  {plan.engine.name:<18} {record['bytes'] / 1e6:7.1f} MB  {key['precision']}, TensorRT "
                  f"{key['tensorrt']}, {key['gpu']['name']} (built {record.get('created', '?')})")


def cmd_sized(args) -> None:
    from models.checkpoints.sized import describe, write_random_checkpoint

    try:
        counts = write_random_checkpoint(args.out, args.what, scale=args.scale, seed=args.seed, overwrite=args.force)
    except FileExistsError as exc:
        raise SystemExit(str(exc)) from None
    print(f"{args.out}: {describe(args.what)} ({args.scale} size), random weights (seed {args.seed})")
    for part, n in counts.items():
        print(f"  {part.replace('_', ' '):<14} {n / 1e6:9.2f} M parameters")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tta", description="Text-to-audio diffusion: train, generate, serve")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the embedded models").add_subparsers(dest="what", required=True)
    from models.training.autoencoder import AutoencoderTrainConfig

    p = train.add_parser("autoencoder", help="train the STFT autoencoder on the synthetic corpus")
    p.add_argument("--out", default=str(ZOO / "tta-codec"), help="where codec.safetensors + config.json go")
    p.add_argument("--run-dir", default="runs/autoencoder", help="checkpoints and logs; an existing run resumes")
    _add_dataclass_args(p, AutoencoderTrainConfig)
    p.set_defaults(func=cmd_train_autoencoder)

    try:
        from models.training.teacher import TeacherTrainConfig
    except ImportError:  # pragma: no cover - during bring-up
        TeacherTrainConfig = None
    if TeacherTrainConfig is not None:
        p = train.add_parser("teacher", help="train the 200-step DiT teacher on cached corpus latents")
        p.add_argument("--out", default=str(ZOO / "tta-teacher"))
        p.add_argument("--run-dir", default="runs/teacher")
        p.add_argument("--codec", default=str(ZOO / "tta-codec"), help="trained autoencoder directory")
        _add_dataclass_args(p, TeacherTrainConfig)
        p.set_defaults(func=cmd_train_teacher)

    from models.training.arc import ARCConfig
    from models.training.distill import DistillConfig

    p = sub.add_parser("distill", help="progressive distillation of a guided teacher: N -> N/2 -> ... steps")
    p.add_argument("--from", dest="source", default="tta-teacher", help="teacher: a model directory, a zoo name, "
                   "or a checkpoint directory (Stable Audio, Tango: students are written as derived directories)")
    p.add_argument("--out", default=str(ZOO), help="students go to <out>/<name>-<steps>, one per halving")
    p.add_argument("--name", default=None, help="student name prefix (default: tta-<weighting>, or "
                   "<teacher>-<weighting> for a checkpoint teacher)")
    p.add_argument("--run-dir", default=None, help="checkpoints and logs, resumed if present "
                                                   "(default: runs/distill-<weighting>)")
    p.add_argument("--cache-dir", default=None, help="latent cache of the teacher's codec (default: <run-dir>/latents)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps in all (resume later)")
    _add_dataclass_args(p, DistillConfig)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("arc", help="ARC post-training: a few-step ping-pong generator without guidance")
    p.add_argument("--from", dest="source", default="tta-teacher", help="source: a model directory, a zoo name, or a "
                   "Stable Audio checkpoint directory")
    p.add_argument("--out", default=str(ZOO / "tta-arc"))
    p.add_argument("--run-dir", default="runs/arc", help="checkpoints and logs, resumed if present")
    p.add_argument("--cache-dir", default=None, help="latent cache of the source's codec (default: <run-dir>/latents)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resume later)")
    _add_dataclass_args(p, ARCConfig)
    p.set_defaults(func=cmd_arc)

    p = sub.add_parser("generate", help="generate audio from a prompt, offline (the server's models and runtimes)")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", default="out.wav", help="the file to write; its suffix picks the format")
    p.add_argument("--model", default=os.environ.get("TTA_DEFAULT_MODEL", "tta-bsa-25"),
                   help="a model name under --model-dir, or a model / checkpoint directory")
    p.add_argument("--model-dir", default=os.environ.get("TTA_MODEL_DIR", str(ZOO)))
    p.add_argument("--runtime", choices=["auto", "torch", "onnxruntime", "tensorrt"], default="torch")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--format", choices=get_args(FormatName), default=None,
                   help="(default: from --output; opus is written at 48 kHz, pcm headerless 16-bit)")
    p.add_argument("--mp3-bitrate", type=int, choices=MP3_BITRATES_KBPS, metavar="KBPS",
                   default=int(os.environ.get("TTA_MP3_BITRATE_KBPS", DEFAULT_MP3_BITRATE_KBPS)),
                   help="constant bitrate of --format mp3 (default: TTA_MP3_BITRATE_KBPS or 192)")
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the generation is given up")
    p.add_argument("--negative-prompt", default=None, help="what guidance steers away from (guidance other than 1)")
    p.add_argument("--init-audio", default=None, help="a WAV / FLAC / Ogg / MP3 clip to start from (any rate, "
                   "channels)")
    p.add_argument("--init-noise-level", type=float, default=None,
                   help="audio-to-audio: how far the clip is noised, in (0, 1]; 1 ignores it")
    p.add_argument("--inpaint", default=None, metavar="START,END",
                   help="regenerate this span of the init clip (seconds); past its end it outpaints")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="run the HTTP service (flags override TTA_* environment settings)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--default-model", default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--runtime", default=None)
    p.add_argument("--policy", choices=get_args(PolicyName), default=None)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-level", default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch runtime: torch.compile the denoiser")
    p.add_argument("--compile-blocks", action="store_true", default=None,
                   help="torch runtime: torch.compile each block of the denoiser (combines with --cuda-graphs)")
    p.add_argument("--precision", choices=get_args(Precision), default=None,
                   help="torch runtime: autocast the denoiser to this type")
    p.add_argument("--decode-precision", choices=get_args(Precision), default=None,
                   help="torch runtime: the Oobleck decoder's weights in this type (float16 on GPUs)")
    p.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="torch runtime on cuda: replay the denoiser from CUDA graphs")
    p.add_argument("--whole-generation", action="store_true", default=None,
                   help="requests that run alone and share steps and length: every step, the decode and the PCM in "
                        "one call (one CUDA graph on cuda)")
    p.add_argument("--tick-graphs", action="store_true", default=None,
                   help="torch runtime on cuda: each tick's forward and sampler step as one CUDA graph per batch shape")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a model's graphs for another runtime (checked against PyTorch)")
    p.add_argument("model", help="a model directory or a model name in models/zoo")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx",
                   help="tensorrt: engines for this machine's GPU, built from the ONNX export (made first if needed)")
    p.add_argument("--precision", choices=["fp16", "bf16"], default="fp16",
                   help="--format tensorrt: the denoiser engines' precision (the text encoder and codec stay float32)")
    p.add_argument("--out", default=None, help="output directory (default: <model>/onnx; engines in its tensorrt/)")
    p.add_argument("--force", action="store_true", help="export (and build) even when a current export exists")
    p.set_defaults(func=cmd_export)

    sized = sub.add_parser("sized", help="random-weight checkpoints of a published model's size, for speed "
                                         "measurements").add_subparsers(dest="what", required=True)
    for what, scales, about in (
            ("sao-small", ["full", "tiny"], "Stable Audio Open Small (stable-audio-tools format, T5 beside it)"),
            ("sao-1.0", ["full"], ("Stable Audio Open 1.0 (stable-audio-tools format, T5 beside it; ~4 GiB DiT, "
                                   "its ONNX export keeps the weights in an external file)")),
            ("sa3-small", ["full", "tiny"], "Stable Audio 3 Small (diffusers StableAudio3Pipeline layout: DiT 459 M, "
                                            "SAME-S, a T5Gemma-sized encoder)"),
            ("sa3-medium", ["full", "tiny"], "Stable Audio 3 Medium (diffusers layout: DiT 1.45 B, SAME-L 852 M; about "
                                             "10 GiB of float32 weights)")):
        p = sized.add_parser(what, help=about)
        p.add_argument("--out", default=f"runs/{what}-sized", help="the checkpoint directory to write")
        p.add_argument("--scale", choices=scales, default="full", help="published size" + (
            ", or tiny for tests" if "tiny" in scales else ""))
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--force", action="store_true", help="write into a non-empty directory")
        p.set_defaults(func=cmd_sized)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
