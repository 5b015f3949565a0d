"""Autoencoder reconstruction quality on held-out corpus clips: multi-resolution STFT distance, SI-SDR, and
whether tone pitch survives (CREPE, pretrained, on the original and the reconstruction).

    python -m benchmarks.autoencoder_quality [--codec models/zoo/tta-codec] [--clips 48]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import environment, md_table, peak_rss_mb, write_results
from models.audio.spectral import multi_resolution_stft_distance, si_sdr
from models.codec import load_codec
from models.data.corpus import SAMPLE_RATE, SyntheticCorpus
from models.eval.adherence import channel_balance_db, placement_matches
from models.eval.pitch import PitchTracker


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--codec", default="models/zoo/tta-codec")
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--tones", type=int, default=24, help="extra held-out tone clips for the pitch check")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="autoencoder_quality")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    codec = load_codec(args.codec)
    tracker = PitchTracker("full")
    corpus = SyntheticCorpus("heldout", seed=1234)
    clips, tones, i = [], [], 0
    while len(clips) < args.clips or len(tones) < args.tones:
        clip = corpus[i]
        i += 1
        if len(clips) < args.clips:
            clips.append(clip)
        elif clip.params["category"] == "tone":
            tones.append(clip)
    tones = [c for c in clips if c.params["category"] == "tone"] + tones[: max(0, args.tones)]
    per_clip = []
    for clip in clips:
        x = torch.from_numpy(clip.audio)[None]
        with torch.no_grad():
            y = codec.decode(codec.encode(x))[..., : x.shape[-1]]
        per_clip.append({
            "caption": clip.caption, "category": clip.params["category"],
            # over the stereo clip as a whole: per channel, a hard-panned clip's silent side divides by ~0
            "mrstft": float(multi_resolution_stft_distance(y[0], x[0], item_dims=2)),
            "si_sdr_db": float(si_sdr(y, x)[0].mean()),
            "balance_db": channel_balance_db(clip.audio), "reconstruction_balance_db": channel_balance_db(y[0].numpy()),
            "placement": clip.params.get("placement"),
            "placement_kept": placement_matches(y[0].numpy(), clip.params.get("placement")),
        })
    pitch = []
    for clip in tones:
        x = torch.from_numpy(clip.audio)[None]
        with torch.no_grad():
            y = codec.decode(codec.encode(x))[0, :, : x.shape[-1]].numpy()
        f_ref = tracker.median_pitch(clip.audio, SAMPLE_RATE)
        f_rec = tracker.median_pitch(y, SAMPLE_RATE)
        err = None if (f_ref is None or f_rec is None) else abs(f_rec - f_ref) / f_ref
        pitch.append({"caption": clip.caption, "target_hz": clip.params["pitch_hz"], "original_hz": f_ref,
                      "reconstruction_hz": f_rec, "relative_error": err})
    errs = [p["relative_error"] for p in pitch if p["relative_error"] is not None]
    placed = [c for c in per_clip if c["placement"] is not None]
    summary = {
        "clips": len(per_clip),
        "mrstft_mean": float(np.mean([c["mrstft"] for c in per_clip])),
        "mrstft_median": float(np.median([c["mrstft"] for c in per_clip])),
        "si_sdr_db_median": float(np.median([c["si_sdr_db"] for c in per_clip])),
        "tones": len(pitch),
        "pitch_error_median": float(np.median(errs)) if errs else None,
        "pitch_within_1pct": sum(e <= 0.01 for e in errs) / len(pitch) if pitch else None,
        "balance_error_db_median": float(np.median([abs(c["reconstruction_balance_db"] - c["balance_db"])
                                                    for c in per_clip])),
        "placed_clips": len(placed),
        "placement_kept": sum(bool(c["placement_kept"]) for c in placed) / len(placed) if placed else None,
        "peak_rss_mb": peak_rss_mb(),
    }
    by_cat = {}
    for c in per_clip:
        by_cat.setdefault(c["category"], []).append(c)
    rows = [[cat, len(v), float(np.mean([c["mrstft"] for c in v])), float(np.median([c["si_sdr_db"] for c in v]))]
            for cat, v in sorted(by_cat.items())]
    md = (f"# Autoencoder reconstruction on held-out clips\n\nCodec: `{args.codec}`. "
          f"{summary['clips']} held-out clips; pitch on {summary['tones']} held-out tones (CREPE full, pretrained).\n\n"
          + md_table(["metric", "value"], [[k, v] for k, v in summary.items()]) + "\n\n## By category\n\n"
          + md_table(["category", "clips", "MR-STFT distance (mean)", "SI-SDR dB (median)"], rows))
    data = {"summary": summary, "per_clip": per_clip, "pitch": pitch, "environment": environment()}
    write_results(args.name, data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()
