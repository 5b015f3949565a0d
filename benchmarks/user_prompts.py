"""Adherence to prompts phrased as a new user would write them, not as the corpus' caption templates do.

    python -m benchmarks.user_prompts --models tta-teacher tta-bsa-25 tta-arc [runs/.../out ...] \\
        [--seeds 0,1] [--duration 4] [--threads 2] [--out-name user_prompts]

Each model generates every prompt of :data:`PROMPTS` (tones at stated pitches, click and beep tracks at stated
tempi, sounds placed left or right; none of them uses a training or held-out caption template) once per seed, at
its own default steps and guidance, through the same pipeline the service samples with. Scored with
``models.eval.adherence``: click tempo within 5 %, median relative pitch error of the tones (CREPE 'full'), stereo
placement. Rows also give the wall time per clip (generation + decode, batch of all prompts of a seed). Results go
to benchmarks/results/<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks.common import environment, peak_rss_mb, write_results
from models.bundle import ModelBundle
from models.eval.adherence import evaluate_clip, summarize
from models.eval.pitch import CappedPitch, PitchTracker
from models.registry import resolve_model

# (prompt, ground truth as the corpus' params: category + pitch_hz / bpm / placement)
PROMPTS: tuple[tuple[str, dict], ...] = (
    ("a 440 Hz sine tone", {"category": "tone", "pitch_hz": 440.0}),
    ("give me a pure tone at 220 Hz", {"category": "tone", "pitch_hz": 220.0}),
    ("steady square wave, 330 hertz", {"category": "tone", "pitch_hz": 330.0}),
    ("sawtooth buzz around 523 Hz", {"category": "tone", "pitch_hz": 523.0}),
    ("click track at 120 BPM", {"category": "clicks", "bpm": 120.0}),
    ("metronome clicking 90 beats a minute", {"category": "clicks", "bpm": 90.0}),
    ("fast ticking, 150 bpm", {"category": "clicks", "bpm": 150.0}),
    ("a beep every half second, 120 BPM", {"category": "clicks", "bpm": 120.0}),
    ("a 200 Hz hum only in the left speaker", {"category": "tone", "pitch_hz": 200.0, "placement": "left"}),
    ("white noise over on the right", {"category": "noise", "placement": "right"}),
    ("an impact, left side only", {"category": "impact", "placement": "left"}),
    ("a siren heard from the right", {"category": "siren", "placement": "right"}),
)


def score(model: str, seeds: list[int], duration: float, pitch) -> dict:
    bundle = ModelBundle.load(resolve_model(model))
    pipe = bundle.pipeline
    prompts = [p for p, _ in PROMPTS]
    pipe.generate(prompts[:1], [1.0], [0])  # warm-up
    clips, seconds = [], 0.0
    for seed in seeds:
        t0 = time.perf_counter()
        waves = pipe.generate(prompts, [duration] * len(prompts), [seed * 1000 + i for i in range(len(prompts))])
        seconds += time.perf_counter() - t0
        for (prompt, truth), wave in zip(PROMPTS, waves, strict=True):
            r = evaluate_clip(wave.numpy(), pipe.sample_rate, truth, pitch)
            r.update(prompt=prompt, seed=seed)
            clips.append(r)
    s = summarize(clips)
    return {"model": model, "name": bundle.config.name, "steps": bundle.config.default_steps,
            "seconds_per_clip": seconds / (len(seeds) * len(PROMPTS)), "peak_rss_mb": round(peak_rss_mb(), 1),
            "summary": s,
            "clips": [{k: v for k, v in c.items() if v is not None} for c in clips]}


def of(share: float | None, n: int) -> str:
    """'k of n' for a share of n clips ('-' when none was scored)."""
    return "-" if share is None else f"{round(share * n)} of {n}"


def markdown(rows: list[dict], args) -> str:
    n_tempo = sum(1 for _, t in PROMPTS if t["category"] == "clicks")
    lines = [f"# Adherence to prompts phrased as a user would ({args.out_name})", "",
             f"{len(PROMPTS)} prompts written unlike the corpus' caption templates (`benchmarks/user_prompts.py`), "
             f"{args.duration:g} s each, seeds {args.seeds}; each model at its default steps and guidance.", "",
             "| model | steps | click tempo within 5 % | median pitch error | placement | s/clip | peak RSS so far |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary"]
        tempo = of(s["tempo_within_5pct"], s["n_rhythmic"])
        bpms = [c.get("measured_bpm") for c in r["clips"] if c.get("is_rhythmic")]
        tempo += " (" + ", ".join("-" if b is None else f"{b:.0f}" for b in bpms) + " BPM)"
        pitch = "-" if s["pitch_error_median"] is None else f"{100 * s['pitch_error_median']:.1f} %"
        placed = of(s["placement_accuracy"], s["n_placed"])
        lines.append(f"| {r['model']} | {r['steps']} | {tempo} | {pitch} | {placed} | {r['seconds_per_clip']:.3f} | {r['peak_rss_mb']:.0f} MB |")
    asked = ", ".join(f"{t['bpm']:g}" for _, t in PROMPTS if t["category"] == "clicks")
    lines += ["", f"Tempi asked, per seed: {asked} BPM ({n_tempo} click prompts). Peak RSS: of the benchmark process "
              "after the row (models are loaded one after another)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tta-teacher", "tta-bsa-25", "tta-arc"])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pitch-frames", type=int, default=48)
    ap.add_argument("--out-name", default="user_prompts")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    pitch = CappedPitch(PitchTracker("full"), args.pitch_frames)
    rows = []
    for m in args.models:
        rows.append(score(m, seeds, args.duration, pitch))
        s = rows[-1]["summary"]
        print(m, json.dumps({k: s[k] for k in ("tempo_within_5pct", "pitch_error_median", "placement_accuracy")}),
              f"{rows[-1]['seconds_per_clip']:.3f} s/clip", flush=True)
    env = environment()
    report = {"args": vars(args), "environment": env, "rows": rows}
    write_results(args.out_name, report, markdown(rows, args), args.results_dir)
    return report


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
