"""The Oobleck decoder's inference form against the decoder as loaded: signal-to-noise ratio and decode time.

On the same latents (random normal, the diffusion model's unit-variance scale), the decoder as loaded (float32, the
snake expression as written: the reference) against its inference form (``OobleckCodec.prepare_inference``) in
float32 (snake constants precomputed: exact, so its SNR should sit at float32's own rounding, far above 100 dB) and
with its weights in bfloat16 and float16. SNR = 10 log10(sum ref^2 / sum (out - ref)^2), per clip, against the
reference computed in true float32 (on a GPU the timed float32 runs use cuDNN's TF32 convolutions, PyTorch's default,
so their SNR shows what TF32 costs); the table gives the worst clip. The target for a 16-bit decoder is 40 dB.
Decode time per batch: median of ``--repeats`` after two warm-up calls (which also compile the fused snake on CUDA),
under cuDNN autotuning on CUDA as the torch runtime decodes.

    python -m benchmarks.decoder_precision --sized sao-small --scale tiny --duration 1 --batches 1,2   # CPU check
    python -m benchmarks.decoder_precision --model /tmp/sao-small-sized --device cuda --batches 1,16 --duration 11.888

``--model`` loads a checkpoint directory with an Oobleck VAE (``models.checkpoints``: Stable Audio Open Small / 1.0,
e.g. one written by ``tta sized sao-small``); without it ``--sized`` builds the VAE of a published size with its
loader's default initialisation (what ``tta sized`` writes). Random weights, either way: the SNR of trained weights
may differ.
"""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

TYPES = ("bfloat16", "float16")
REFERENCE, EXACT = "float32 as loaded", "float32"


def snr_db(out, ref) -> list[float]:
    """Per clip (first dimension): 10 log10(energy of ref / energy of out - ref), in float64; inf when equal."""
    ref, err = ref.double().flatten(1), (out.double() - ref.double()).flatten(1)
    signal, noise = ref.pow(2).sum(1), err.pow(2).sum(1)
    return [math.inf if float(n) == 0 else 10 * math.log10(float(s) / float(n)) for s, n in zip(signal, noise)]


def load_codec(args):
    """The Oobleck codec of ``--model`` (a checkpoint directory) or of ``--sized`` at ``--scale``, float32, eval."""
    if args.model:
        from models.checkpoints import load_checkpoint_dir

        codec = load_checkpoint_dir(Path(args.model), device=args.device).codec
        label = Path(args.model).name
    else:
        from models.checkpoints.sized import build_sized

        _, parts, _ = build_sized(args.sized, args.scale, seed=args.seed)
        codec, label = parts.codec.to(args.device), f"{args.sized} ({args.scale}, default initialisation)"
    if not hasattr(codec, "prepare_inference"):
        raise SystemExit(f"{label}: its codec ({type(codec).__name__}) has no inference form")
    return codec.float().eval(), label


def variants(codec, types) -> dict:
    """The reference and each inference form, as separate copies (the 16-bit cast is in place and one-way)."""
    import torch

    out = {REFERENCE: codec, EXACT: copy.deepcopy(codec).prepare_inference()}
    for name in types:
        out[name] = copy.deepcopy(codec).prepare_inference(getattr(torch, name))
    return out


def exact_decode(codec, z):
    """``codec.decode(z)`` in true float32: cuDNN's TF32 convolutions (on by default on GPUs since Ampere, and so in
    every float32 timing here) off."""
    import torch

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            return codec.decode(z)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def measure(codecs: dict, args, on_row=None) -> list[dict]:
    """For each batch size: every variant's decode time, and its SNR against the reference on the same latents.
    ``on_row(rows)`` gets the rows so far after each one (so a run cut off keeps them)."""
    import torch

    from benchmarks.common import timed
    from benchmarks.latency import synchronised
    from service.runtimes.torch_runtime import cudnn_benchmark

    reference = codecs[REFERENCE]
    frames = reference.latent_frames(round(args.duration * reference.sample_rate))
    rows = []
    for b in args.batches:
        g = torch.Generator().manual_seed(b)
        z = torch.randn(b, reference.latent_dim, frames, generator=g).to(args.device)
        want = exact_decode(reference, z)
        for name, codec in codecs.items():
            def decode(codec=codec, tuned=name != REFERENCE and args.device == "cuda"):
                with torch.inference_mode():
                    if not tuned:
                        return codec.decode(z)
                    with cudnn_benchmark():
                        return codec.decode(z)

            times = timed(synchronised(decode), args.repeats)
            got = decode()
            snr = snr_db(got, want)
            peak = float(want.abs().max())
            rows.append({"variant": name, "batch": b, "median_s": times["median_s"], "p95_s": times["p95_s"],
                         "repeats": times["repeats"], "snr_db_min": min(snr), "snr_db": snr,
                         "max_abs_error_of_peak": float((got.float() - want).abs().max()) / peak if peak else 0.0})
            print(f"batch {b} {name}: {times['median_s'] * 1000:.1f} ms, SNR {min(snr):.1f} dB", flush=True)
            if on_row is not None:
                on_row(rows)
    return rows


def markdown(rows: list[dict], args, label: str, frames: int) -> str:
    from benchmarks.common import md_table

    base = {r["batch"]: r["median_s"] for r in rows if r["variant"] == REFERENCE}
    table = [[r["variant"], r["batch"], r["median_s"] * 1000, r["p95_s"] * 1000, base[r["batch"]] / r["median_s"],
              None if r["variant"] == REFERENCE else r["snr_db_min"],
              None if r["variant"] == REFERENCE else r["max_abs_error_of_peak"]] for r in rows]
    worst = {t: min(r["snr_db_min"] for r in rows if r["variant"] == t) for t in args.types
             if any(r["variant"] == t for r in rows)}
    verdict = ", ".join(f"{t} {v:.1f} dB ({'meets' if v >= args.target_db else 'below'} {args.target_db:g} dB)"
                        for t, v in worst.items())
    where = f"GPU: {args.gpu_name}" if args.device == "cuda" else f"CPU, {args.threads} threads"
    return (f"# Oobleck decoder precision ({where}): `{label}`\n\n"
            f"{args.duration:g} s clips ({frames} latent frames), random normal latents; reference = the decoder as "
            "loaded (float32, snake expression as written). SNR: worst clip of the batch against the reference; "
            f"error: max |out - ref| / max |ref|. Worst SNR: {verdict}.\n\n"
            + md_table(["decoder", "batch", "median ms", "p95 ms", "speed-up", "SNR dB", "max error / peak"],
                       table))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint directory with an Oobleck VAE")
    ap.add_argument("--sized", default="sao-small", help="without --model: the published model whose VAE to build")
    ap.add_argument("--scale", choices=["full", "tiny"], default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--batches", default="1")
    ap.add_argument("--duration", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-db", type=float, default=40.0)
    ap.add_argument("--name", default=None)
    ap.add_argument("--results-dir", default=None, help="where the JSON and Markdown go (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.types = [t for t in str(args.types).split(",") if t]
    unknown = [t for t in args.types if t not in TYPES]
    if unknown:
        ap.error(f"unknown decoder type {', '.join(unknown)}; known: {', '.join(TYPES)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from benchmarks.common import environment, incomplete_note, stop_on_sigterm, write_results

    stop_on_sigterm()  # at a time limit the rows written so far stand, marked incomplete
    codec, label = load_codec(args)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        args.gpu_name = torch.cuda.get_device_name(0)
    frames = codec.latent_frames(round(args.duration * codec.sample_rate))
    codecs = variants(codec, args.types)

    def publish(rows: list[dict]) -> dict:
        done = {(r["batch"], r["variant"]) for r in rows}
        not_run = [f"{name} at batch {b}" for b in args.batches for name in codecs if (b, name) not in done]
        note = incomplete_note(not_run)
        md = markdown(rows, args, label, frames) + (f"\n\n{note}" if note else "")
        data = {"model": label, "duration_s": args.duration, "latent_frames": frames, "target_db": args.target_db,
                "rows": rows, "complete": not note, "not_run": not_run, "environment": environment()}
        write_results(args.name or f"decoder-precision-{args.device}", data, md, args.results_dir)
        return data | {"markdown": md}

    data = publish(measure(codecs, args, on_row=publish))
    print(data.pop("markdown"))
    return data


if __name__ == "__main__":
    main()
