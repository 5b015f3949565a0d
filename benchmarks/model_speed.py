"""CPU speed of the embedded model's parts (issue 2 targets): decoding 10 s of stereo, one DiT forward at batch 1
for 10 s, text encoding; medians of repeated runs, with peak RSS.

    python -m benchmarks.model_speed [--model models/zoo/tta-teacher] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import environment, md_table, peak_rss_mb, timed, write_results
from models.bundle import ModelBundle


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/zoo/tta-teacher")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--name", default="model_speed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = ModelBundle.load(args.model)
    frames = bundle.latent_frames(10.0)
    z = torch.randn(1, bundle.codec.latent_dim, frames)
    text = bundle.encode_text(["a 440 Hz sine tone on the left"])
    mask = torch.ones(1, frames, dtype=torch.bool)
    t, seconds = torch.tensor([0.5]), torch.tensor([10.0])
    params = sum(p.numel() for p in bundle.denoiser.parameters())
    codec_params = sum(p.numel() for n, p in bundle.codec.named_parameters() if n.startswith("dec"))

    def dit():
        with torch.inference_mode():
            bundle.denoiser(z, t, text.tokens, text.mask, text.pooled, seconds, mask)

    def decode():
        bundle.codec.decode(z)

    prompts = [f"a {f} Hz square tone panned right" for f in range(100, 100 + 4 * args.repeats, 4)]
    it = iter(prompts * 10)

    def encode():
        bundle.text_encoder.encoder.encode_unpadded([next(it)])

    rows = []
    results = {}
    for name, fn, target in [("DiT forward, batch 1, 10 s", dit, 0.030),
                             ("decode 10 s of stereo", decode, 0.200),
                             ("text encoding, 1 prompt (uncached)", encode, None)]:
        r = timed(fn, args.repeats)
        results[name] = {**r, "target_s": target}
        rows.append([name, r["median_s"] * 1000, r["p95_s"] * 1000, None if target is None else target * 1000,
                     "yes" if target is None or r["median_s"] <= target else "no"])
    summary = {"denoiser_params": params, "decoder_params": codec_params, "latent_frames_10s": frames,
               "peak_rss_mb": peak_rss_mb(), "timings": results}
    md = (f"# CPU speed of `{bundle.name}` parts\n\nDiT {params / 1e6:.2f} M parameters, decoder "
          f"{codec_params / 1e6:.2f} M; 10 s = {frames} latent frames; {args.threads} threads; "
          f"median of {args.repeats} runs after 2 warm-ups; peak RSS {summary['peak_rss_mb']:.0f} MB.\n\n"
          + md_table(["what", "median ms", "p95 ms", "target ms", "met"], rows))
    write_results(args.name, {"summary": summary, "environment": environment()}, md)
    print(md)
    return summary


if __name__ == "__main__":
    main()
