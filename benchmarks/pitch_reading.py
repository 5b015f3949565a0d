"""How a teacher reads a stated pitch, in the latent's analytic pitch channel (no decoder, no tracker).

    python -m benchmarks.pitch_reading [--model models/zoo/tta-teacher] [--name pitch_reading]

1. Reading: the conditional x0 prediction at t = 0.99 (pure noise in, the text is all the model has) for stated
   pitches spaced evenly in log frequency over 80 .. 2000 Hz, averaged over a few noise draws: the fit
   ln f_read = gain * ln f + offset, the spread of the residuals around it, and the median error; the same
   fit's gain for the guided prediction at the model's default guidance, and the unconditional prediction's
   tonality (guidance extrapolates tonality and tonality * log pitch alike, so the more surely the unconditional
   prediction states a tone, the more the guided pitch is stretched away from 400 Hz).
2. Where the reading comes from, for stated pitches 400 .. 480 Hz: the encoder's states of one prompt ("440 Hz")
   with the number channels of each value, and each value's states with the number channels of 440 Hz. A reader
   that takes the value from the smooth channels follows the first sweep with slope 1 and is flat in the second.
3. Phrasing: one stated pitch in several captions (the corpus' first tones restated at that pitch; training
   templates, or held-out ones with ``--phrasing-split heldout``): the reading's spread over the captions (sd of
   ln f). The numbers reach the denoiser as the same placeholder token with the same number channels, so this
   spread is the phrasing's alone. Where it enters: the same captions with the pooled embedding, all token states
   or only the number tokens' states taken from the ``--template`` prompt at that pitch. Repeated with the value
   conditioner's term zeroed, and then the value head's (a model that has them): if the reading does not move, the
   model does not take the value from that path.
4. Sampling: full DDIM runs for a few stated pitches and seeds at guidance 1 and at the model's default: the median
   error and the spread over seeds (sd of ln f), which is what decides whether many seeds land within 3 %.

Pitch here is the codec's analytic slot-1 pitch (``latent_pitch``) over frames with tonality above 0.5;
``benchmarks.teacher_quality`` measures the decoded audio with CREPE.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import environment, md_table, peak_rss_mb, write_results
from models.bundle import Conditioning, ModelBundle, pad_tokens
from models.data.corpus import SyntheticCorpus
from models.text.encoders import PRESENT_CHANNEL, NumberChannels, TextEmbedding

DURATION = 3.0


def slot_pitch(bundle: ModelBundle, latents: torch.Tensor, tonal: float = 0.5) -> np.ndarray:
    """[B] pitch in Hz of slot 1: the geometric mean over the frames whose tonality is above ``tonal``."""
    tau, hz = bundle.codec.latent_pitch(latents)
    logf = torch.log(hz[:, 0])
    keep = tau[:, 0] > tonal
    return np.array([math.exp(float(logf[i][keep[i]].mean())) if keep[i].any() else float("nan")
                     for i in range(len(logf))])


def with_numbers(text: TextEmbedding, values: list[float], numbers: NumberChannels) -> TextEmbedding:
    """``text`` with the number channels of every number token (and of the pooled embedding) set to ``values``."""
    tokens, pooled = text.tokens.clone(), text.pooled.clone()
    width = numbers.width
    for i, v in enumerate(values):
        present = tokens[i, :, -width:].abs().sum(-1) > 0
        tokens[i, present, -width:] = numbers.code(v)
        if pooled[i, -width:].abs().sum() > 0:
            pooled[i, -width:] = numbers.code(v)
    return TextEmbedding(tokens, text.mask, pooled)


@torch.inference_mode()
def predict_at_noise(bundle: ModelBundle, text: TextEmbedding, t: float, draws: int, guidance: float = 1.0):
    """Per noise draw, (tonality, Hz) of slot 1 in the x0 prediction at time ``t`` from pure noise, [P, T] each
    (guidance 1: the conditional prediction)."""
    n = text.tokens.shape[0]
    frames = bundle.latent_frames(DURATION)
    cond = Conditioning(text, torch.full((n,), DURATION))
    for s in range(draws):
        z = torch.randn(n, bundle.codec.latent_dim, frames, generator=torch.Generator().manual_seed(s))
        x0 = bundle.predict_x0(z, torch.full((n,), t), cond, torch.full((n,), guidance),
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


# the denoiser's modules that read a stated value outside attention, and what the report calls them
VALUE_READERS = {"values": "value conditioner", "value_head": "value head"}


@contextlib.contextmanager
def value_reader_off(bundle: ModelBundle, name: str = "values"):
    """Within the block, the denoiser's module ``name`` of ``VALUE_READERS`` (its ``models.dit.ValueConditioner``
    or ``ValueHead``) adds nothing; yields whether the model has one."""
    values = getattr(bundle.denoiser, name, None)
    if values is None:
        yield False
        return
    handle = values.register_forward_hook(lambda module, inputs, out: torch.zeros_like(out))
    try:
        yield True
    finally:
        handle.remove()


def phrasing_captions(pitches: list[int], phrasings: int, split: str = "train") -> dict[int, list[str]]:
    """Per stated pitch, ``phrasings`` captions of it: the first tones of the corpus' ``split`` (its templates: the
    held-out split's are phrasings training never saw) that are not short bursts (whose x0 is mostly silent frames,
    with no pitch to read), their pitch restated in Hz."""
    corpus = SyntheticCorpus(split, seed=0)
    tones, i = [], 0
    while len(tones) < phrasings:
        p = corpus.sample_params(corpus.rng_for(i))
        i += 1
        if p["category"] == "tone" and p.get("envelope") != "short burst":
            tones.append(p)
    out = {}
    for hz in pitches:
        rng = np.random.default_rng(hz)
        out[hz] = [corpus.caption({**p, "pitch_hz": float(hz), "pitch_text": f"{hz} Hz"}, rng) for p in tones]
    return out


def spread_of(reads: dict[int, np.ndarray]) -> dict:
    """Readings [captions] per stated pitch -> the median over pitches of their sd in ln f, and the median error."""
    return {"sd_ln_median": float(np.median([np.std(np.log(r)) for r in reads.values()])),
            "median_error": float(np.median(np.abs(np.concatenate([r / hz - 1 for hz, r in reads.items()]))))}


def phrasing_spread(bundle: ModelBundle, pitches: list[int], phrasings: int, t: float, draws: int,
                    split: str = "train") -> dict:
    """The reading at ``t`` of each pitch in ``phrasing_captions``: per pitch the sd of ln f over the captions and
    the median error."""
    per, reads = [], {}
    for hz, captions in phrasing_captions(pitches, phrasings, split).items():
        read = reads[hz] = read_at_noise(bundle, bundle.encode_text(captions), t, draws)
        per.append({"stated_hz": hz, "sd_ln": float(np.std(np.log(read))),
                    "median_error": float(np.median(np.abs(read / hz - 1))), "captions": captions,
                    "read_hz": [float(r) for r in read]})
    return {"phrasings": phrasings, "split": split, **spread_of(reads), "per_pitch": per}


def with_number_state(tokens: Tensor, template: Tensor) -> Tensor:
    """tokens [B, L, D] with every number token's state (the linear number channels' presence flag set) replaced by
    that of the first number token of one ``template`` prompt [L', D]."""
    first = int(torch.nonzero(template[:, PRESENT_CHANNEL] > 0.5)[0, 0])
    out = tokens.clone()
    out[tokens[..., PRESENT_CHANNEL] > 0.5] = template[first]
    return out


def phrasing_sources(bundle: ModelBundle, pitches: list[int], phrasings: int, t: float, draws: int,
                     split: str, template: str, numbers: NumberChannels,
                     own_reads: dict[int, np.ndarray] | None = None) -> dict:
    """Which part of the text condition carries the phrasing's pull on the reading: each caption of
    ``phrasing_captions`` read with one part taken from ``template`` at the same pitch (the pooled embedding; all
    token states; only the number tokens' states) or with none or all of it; per variant the spread over captions
    and the median error. Swapping a part that carries the pull takes the spread away. ``own_reads``: the
    captions' own readings per pitch where they are at hand (``phrasing_spread``), so they are not read again."""
    names = ("own", "template_pooled") + (("template_number_tokens",) if numbers.linear else ()) + (
        "template_tokens", "template")
    reads: dict[str, dict[int, np.ndarray]] = {k: {} for k in names}
    for hz, captions in phrasing_captions(pitches, phrasings, split).items():
        own = bundle.encode_text(captions)
        canon = bundle.encode_text([template.format(hz)] * len(captions))
        length = max(own.tokens.shape[1], canon.tokens.shape[1])
        (o_tok, o_mask), (c_tok, c_mask) = ((pad_tokens(e.tokens, length), pad_tokens(e.mask, length))
                                            for e in (own, canon))
        variants = {"own": own, "template_pooled": TextEmbedding(o_tok, o_mask, canon.pooled),
                    "template_tokens": TextEmbedding(c_tok, c_mask, own.pooled), "template": canon}
        if numbers.linear:
            variants["template_number_tokens"] = TextEmbedding(with_number_state(o_tok, c_tok[0]), o_mask, own.pooled)
        if own_reads is not None:
            reads["own"][hz] = own_reads[hz]
            del variants["own"]
        for name, text in variants.items():
            reads[name][hz] = read_at_noise(bundle, text, t, draws)
    return {"split": split, "template": template, "phrasings": phrasings,
            **{name: spread_of(r) for name, r in reads.items()}}


@torch.inference_mode()
def sample_spread(bundle: ModelBundle, template: str, pitches: list[int], seeds: int, guidance: float,
                  steps: int) -> dict:
    prompts = [template.format(p) for p in pitches for _ in range(seeds)]
    lat = bundle.generate_latents(prompts, [DURATION] * len(prompts), [s for _ in pitches for s in range(seeds)],
                                  steps=steps, guidance=guidance)
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
    ap.add_argument("--phrasing-pitches", default="150,300,600,1200")
    ap.add_argument("--phrasings", type=int, default=12)
    ap.add_argument("--phrasing-split", default="train", choices=["train", "heldout"],
                    help="whose caption templates phrase the pitches: the training or the held-out ones")
    ap.add_argument("--sample-pitches", default="90,200,440,679,1000,1614")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="pitch_reading")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = ModelBundle.load(args.model)
    cfg = bundle.config.text_encoder
    numbers = NumberChannels.from_config(cfg)
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

    window = np.arange(400, 484, 4, dtype=float)
    sources = {}
    if numbers.width:
        fixed = bundle.encode_text([args.template.format(440)] * len(window))
        channels = read_at_noise(bundle, with_numbers(fixed, list(window), numbers), args.t, args.draws)
        own = bundle.encode_text([args.template.format(int(v)) for v in window])
        states = read_at_noise(bundle, with_numbers(own, [440.0] * len(window), numbers), args.t, args.draws)
        sources = {"channels_of_each_value": fit(window, channels),
                   "states_of_each_value_sd_ln": float(np.std(np.log(states))),
                   "states_of_each_value_hz": [float(v) for v in states]}

    phrased = [int(p) for p in args.phrasing_pitches.split(",") if p]
    phrasing = (phrasing_spread(bundle, phrased, args.phrasings, args.t, args.draws, args.phrasing_split)
                if phrased else {})
    pulled_by = (phrasing_sources(bundle, phrased, args.phrasings, args.t, args.draws, args.phrasing_split,
                                  args.template, numbers,
                                  {q["stated_hz"]: np.array(q["read_hz"]) for q in phrasing["per_pitch"]})
                 if phrased else {})
    without = {}
    for name in VALUE_READERS:
        with value_reader_off(bundle, name) as has:
            if has:
                without[name] = {"reading": fit(stated, read_at_noise(bundle, text, args.t, args.draws)),
                                 "phrasing": phrasing_spread(bundle, phrased, args.phrasings, args.t, args.draws,
                                                             args.phrasing_split) if phrased else {}}

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
    if sources:
        rows += [["channels of 400..480 Hz, states of 440: gain", sources["channels_of_each_value"]["gain"], "1"],
                 ["states of 400..480 Hz, channels of 440: sd (ln)", sources["states_of_each_value_sd_ln"], "0"]]
    if phrasing:
        rows += [[f"{phrasing['phrasings']} {phrasing['split']} phrasings of one pitch: reading sd (ln), median over "
                  f"{', '.join(map(str, phrased))} Hz", phrasing["sd_ln_median"], "0"],
                 ["those phrasings: median error of the reading", phrasing["median_error"], "0"]]
        for name, words in (("template_pooled", "the pooled embedding"), ("template_tokens", "all token states"),
                            ("template_number_tokens", "the number tokens' states"), ("template", "both")):
            if name in pulled_by:
                rows += [[f"those phrasings with {words} from `{args.template}`: reading sd (ln) / median error",
                          f"{pulled_by[name]['sd_ln_median']:.4g} / {pulled_by[name]['median_error']:.4g}", "0"]]
    for name, off in without.items():
        what = VALUE_READERS[name]
        rows += [[f"{what} off: reading gain", off["reading"]["gain"], "1"],
                 [f"{what} off: reading residual sd (ln)", off["reading"]["residual_sd_ln"], "0"]]
        if off["phrasing"]:
            rows += [[f"{what} off: phrasings' reading sd (ln)", off["phrasing"]["sd_ln_median"], "0"]]
    for s in sampling:
        rows += [[f"{steps}-step samples, guidance {s['guidance']:g}: median error", s["median_error"], "<= 0.03"],
                 [f"{steps}-step samples, guidance {s['guidance']:g}: seed spread sd (ln)", s["sd_ln_median"], "0"]]
    md = (f"# How {bundle.name} reads a stated pitch\n\n"
          f"Prompt `{args.template}`; pitch from the codec's analytic channels. Reading: {len(stated)} stated "
          f"pitches 80-2000 Hz, x0 prediction from pure noise at t = {args.t}, {args.draws} draws. Samples: "
          f"{', '.join(map(str, pitches))} Hz x {args.seeds} seeds. {seconds:.0f} s, peak RSS "
          f"{peak_rss_mb():.0f} MB.\n\n" + md_table(["figure", "value", "ideal"], rows) + "\n")
    data = {"model": bundle.name, "template": args.template, "reading": reading, "guided_reading": guided,
            "unconditional_tonality": unconditional_tonality, "sources": sources, "phrasing": phrasing,
            "phrasing_sources": pulled_by,
            "value_conditioner_off": without.get("values", {}), "value_head_off": without.get("value_head", {}),
            "sampling": sampling, "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "environment": environment()}
    write_results(args.name, data, md, args.out_dir)
    print(md)
    return data


if __name__ == "__main__":
    main()
