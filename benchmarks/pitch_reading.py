"""How a teacher reads a stated pitch, in the latent's analytic pitch channel (no decoder, no tracker).

    python -m benchmarks.pitch_reading [--model models/zoo/tta-teacher] [--name pitch_reading]

1. Reading: the conditional x0 prediction at t = 0.99 (pure noise in, the text is all the model has) for stated
   pitches spaced evenly in log frequency over 80 .. 2000 Hz, averaged over a few noise draws: the fit
   ln f_read = gain * ln f + offset, the spread of the residuals around it, and the median error; the same
   fit's gain for the guided prediction at the model's default guidance, and the unconditional prediction's
   tonality (guidance extrapolates tonality and tonality * log pitch alike, so the more surely the unconditional
   prediction states a tone, the more the guided pitch is stretched away from 400 Hz).
2. Sampling: full DDIM runs for a few stated pitches and seeds at guidance 1 and at the model's default: the median
   error and the spread over seeds (sd of ln f), which is what decides whether many seeds land within 3 %.

Pitch here is the codec's analytic slot-1 pitch (``latent_pitch``) over frames with tonality above 0.5;
``benchmarks.teacher_quality`` measures the decoded audio with CREPE.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from benchmarks.common import environment, md_table, peak_rss_mb, write_results
from models.bundle import ModelBundle
from models.conditioning import Conditioning
from models.text.encoders import TextEmbedding

DURATION = 3.0


def slot_pitch(bundle: ModelBundle, latents: torch.Tensor, tonal: float = 0.5) -> np.ndarray:
    """[B] pitch in Hz of slot 1: the geometric mean over the frames whose tonality is above ``tonal``."""
    tau, hz = bundle.codec.latent_pitch(latents)
    logf = torch.log(hz[:, 0])
    keep = tau[:, 0] > tonal
    return np.array([math.exp(float(logf[i][keep[i]].mean())) if keep[i].any() else float("nan")
                     for i in range(len(logf))])


@torch.inference_mode()
def predict_at_noise(bundle: ModelBundle, text: TextEmbedding, t: float, draws: int, guidance: float = 1.0):
    """Per noise draw, (tonality, Hz) of slot 1 in the x0 prediction at time ``t`` from pure noise, [P, T] each
    (guidance 1: the conditional prediction)."""
    n = text.tokens.shape[0]
    frames = bundle.latent_frames(DURATION)
    cond = Conditioning(text, torch.full((n,), DURATION))
    for s in range(draws):
        z = torch.randn(n, bundle.codec.latent_dim, frames, generator=torch.Generator().manual_seed(s))
        x0 = bundle.pipeline.predict_x0(z, torch.full((n,), t), cond, torch.full((n,), guidance),
                                        torch.ones(n, frames, dtype=torch.bool))
        tau, hz = bundle.codec.latent_pitch(x0)
        yield tau[:, 0], hz[:, 0]


def read_at_noise(bundle: ModelBundle, text: TextEmbedding, t: float, draws: int, guidance: float = 1.0) -> np.ndarray:
    """[P] slot-1 pitch of the x0 prediction at time ``t`` from pure noise, the geometric mean over all frames (the
    prediction is a tone's) and ``draws`` noise draws."""
    logs = [torch.log(hz).mean(-1).numpy() for _, hz in predict_at_noise(bundle, text, t, draws, guidance)]
    return np.exp(np.mean(logs, axis=0))


def fit(stated: np.ndarray, read: np.ndarray) -> dict:
    x, y = np.log(stated / 400.0), np.log(read / 400.0)
    gain, offset = np.polyfit(x, y, 1)
    err = np.abs(read / stated - 1)
    return {"gain": float(gain), "offset": float(offset), "residual_sd_ln": float(np.std(y - (gain * x + offset))),
            "median_error": float(np.median(err)), "points": len(stated)}


@torch.inference_mode()
def sample_spread(bundle: ModelBundle, template: str, pitches: list[int], seeds: int, guidance: float,
                  steps: int) -> dict:
    prompts = [template.format(p) for p in pitches for _ in range(seeds)]
    seeds_of = [s for _ in pitches for s in range(seeds)]
    lat = bundle.pipeline.generate_latents(prompts, [DURATION] * len(prompts), seeds_of, steps=steps, guidance=guidance)
    read = slot_pitch(bundle, torch.stack(lat)).reshape(len(pitches), seeds)
    stated = np.array(pitches, dtype=float)[:, None]
    err = np.abs(read / stated - 1)
    per = [{"stated_hz": int(p), "median_hz": float(np.median(r)), "sd_ln": float(np.std(np.log(r)))}
           for p, r in zip(pitches, read)]
    return {"guidance": guidance, "median_error": float(np.nanmedian(err)),
            "within_3pct": float(np.nanmean(err <= 0.03)), "sd_ln_median": float(np.median([q["sd_ln"] for q in per])),
            "per_pitch": per}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/zoo/tta-teacher")
    ap.add_argument("--template", default="a sine tone at {} Hz")
    ap.add_argument("--points", type=int, default=40)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--t", type=float, default=0.99)
    ap.add_argument("--sample-pitches", default="90,200,440,679,1000,1614")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="pitch_reading")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = ModelBundle.load(args.model)
    t0 = time.perf_counter()

    stated = np.unique(np.round(np.exp(np.linspace(math.log(80), math.log(2000), args.points)))).astype(float)
    text = bundle.encode_text([args.template.format(int(h)) for h in stated])
    reading = {**fit(stated, read_at_noise(bundle, text, args.t, args.draws)), "t": args.t}
    # Guidance acts on (tonality, tonality * log pitch): with a conditional tonality of 1 and an unconditional one
    # of tau_u, the guided ratio grows with the conditional log pitch (around 400 Hz) at g / (g - (g - 1) tau_u),
    # 1 where the unconditional prediction states no tone and g where it is sure of one.
    guidance = float(bundle.config.default_guidance)
    guided = {**fit(stated, read_at_noise(bundle, text, args.t, args.draws, guidance)), "guidance": guidance}
    # the prediction for the empty prompt: guidance's unconditional row
    empty = bundle.unconditional_text(1)
    unconditional_tonality = float(np.mean([tau.mean().item() for tau, _ in
                                            predict_at_noise(bundle, empty, args.t, args.draws)]))

    steps = args.steps or bundle.config.default_steps
    pitches = [int(p) for p in args.sample_pitches.split(",") if p]
    sampling = [sample_spread(bundle, args.template, pitches, args.seeds, g, steps)
                for g in dict.fromkeys([1.0, float(bundle.config.default_guidance)])] if args.seeds else []
    seconds = time.perf_counter() - t0

    rows = [["reading at t = %.2f: gain" % args.t, reading["gain"], "1"],
            ["reading: residual sd (ln)", reading["residual_sd_ln"], "0"],
            ["reading: median error", reading["median_error"], "0"],
            [f"reading under guidance {guidance:g}: gain", guided["gain"], "1"],
            ["unconditional tonality at t = %.2f" % args.t, unconditional_tonality, "-"]]
    for s in sampling:
        rows += [[f"{steps}-step samples, guidance {s['guidance']:g}: median error", s["median_error"], "<= 0.03"],
                 [f"{steps}-step samples, guidance {s['guidance']:g}: seed spread sd (ln)", s["sd_ln_median"], "0"]]
    md = (f"# How {bundle.name} reads a stated pitch\n\n"
          f"Prompt `{args.template}`; pitch from the codec's analytic channels. Reading: {len(stated)} stated "
          f"pitches 80-2000 Hz, x0 prediction from pure noise at t = {args.t}, {args.draws} draws. Samples: "
          f"{', '.join(map(str, pitches))} Hz x {args.seeds} seeds. {seconds:.0f} s, peak RSS "
          f"{peak_rss_mb():.0f} MB.\n\n" + md_table(["figure", "value", "ideal"], rows) + "\n")
    data = {"model": bundle.name, "template": args.template, "reading": reading, "guided_reading": guided,
            "unconditional_tonality": unconditional_tonality, "sampling": sampling, "seconds": seconds,
            "peak_rss_mb": peak_rss_mb(), "environment": environment()}
    write_results(args.name, data, md, args.out_dir)
    print(md)
    return data


if __name__ == "__main__":
    main()
