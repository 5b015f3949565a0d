"""Synthetic corpus: determinism, format, caption/ground-truth agreement and held-out separation."""
import json

import numpy as np
import pytest

from models.data import SAMPLE_RATE, Clip, SyntheticCorpus, heldout_caption_set, render
from models.data.corpus import (BPM_HOLDOUT_TOL, HELDOUT_BPMS, HELDOUT_PITCHES_HZ, PITCH_HOLDOUT_TOL,
                                PLACEMENTS, TEMPLATES, TRAIN_NOTES, midi_to_hz)


def _leaves(p):
    yield p
    for q in p.get("parts", []):
        yield q


def _params(split, n, seed=0):
    c = SyntheticCorpus(split, seed=seed)
    return [c.sample_params(c.rng_for(i)) for i in range(n)]


def test_determinism_and_rerender():
    a, b = SyntheticCorpus("train", seed=3), SyntheticCorpus("train", seed=3)
    for i in (0, 1, 7, 123, 10_000):
        x, y = a[i], b[i]
        assert isinstance(x, Clip)
        assert x.caption == y.caption and x.params == y.params
        assert np.array_equal(x.audio, y.audio)
        # params are JSON-serialisable and re-render bit-for-bit, also after a JSON round trip
        p = json.loads(json.dumps(x.params))
        assert np.array_equal(render(p), x.audio)
    # another seed / split gives other data
    assert SyntheticCorpus("train", seed=4)[0].caption != a[0].caption or \
        not np.array_equal(SyntheticCorpus("train", seed=4)[0].audio, a[0].audio)
    assert SyntheticCorpus("heldout", seed=3)[0].caption != a[0].caption


def test_shapes_dtype_duration_peak():
    c = SyntheticCorpus("train", seed=1)
    for i in range(30):
        clip = c[i]
        n = int(round(clip.duration * SAMPLE_RATE))
        assert clip.audio.dtype == np.float32
        assert clip.audio.shape == (2, n)
        assert 1.0 <= clip.duration <= 10.0
        assert clip.params["duration"] == clip.duration
        peak = float(np.max(np.abs(clip.audio)))
        assert peak <= 1.0
        assert 10 ** (-12 / 20) - 1e-3 <= peak <= 10 ** (-3 / 20) + 1e-3
        assert abs(20 * np.log10(peak) - clip.params["gain_db"]) < 0.01
        assert np.all(np.isfinite(clip.audio))
        assert clip.params["placement"] in PLACEMENTS + (None,)
    short = SyntheticCorpus("train", min_duration=1.0, max_duration=2.0)
    for i in range(10):
        assert short[i].duration <= 2.0


def test_category_mix_and_required_fields():
    ps = _params("train", 600)
    cats = [p["category"] for p in ps]
    frac = {k: cats.count(k) / len(cats) for k in set(cats)}
    assert 0.24 <= frac["tone"] <= 0.36
    assert 0.10 <= frac["clicks"] <= 0.20
    for k in ("noise", "sweep", "siren", "impact", "texture", "mixture"):
        assert frac.get(k, 0) > 0.02, k
    for p in ps:
        for key in ("category", "duration", "placement", "gain_db"):
            assert key in p
        for q in _leaves(p):
            if q["category"] == "tone":
                assert q["waveform"] in ("sine", "square", "sawtooth", "triangle")
                assert 80 <= q["pitch_hz"] <= 2000 and q["pitch_text"]
            if q["category"] == "clicks":
                assert 40 <= q["bpm"] <= 200 and q["sound"] in ("click", "beep")
        if p["category"] == "mixture":
            assert len(p["parts"]) == 2
    placements = {p["placement"] for p in ps}
    assert placements == set(PLACEMENTS) | {None}


def test_caption_states_pitch_and_tempo():
    for split in ("train", "heldout"):
        c = SyntheticCorpus(split, seed=5)
        for i in range(120):
            rng = c.rng_for(i)
            p = c.sample_params(rng)
            cap = c.caption(p, rng)
            for q in _leaves(p):
                if q["category"] == "tone":
                    assert q["pitch_text"] in cap
                    if q["pitch_text"].endswith("Hz"):
                        assert abs(float(q["pitch_text"].split()[0].replace("Hz", "")) - q["pitch_hz"]) < 1e-9
                if q["category"] == "clicks":
                    assert str(q["bpm"]) in cap


def test_note_names_map_to_pitch():
    ps = [q for p in _params("train", 800) for q in _leaves(p) if q["category"] == "tone"]
    named = {q["pitch_text"]: q["pitch_hz"] for q in ps if "Hz" not in q["pitch_text"] and "hertz" not in q["pitch_text"]}
    assert named, "train split should use note names"
    if "A4" in named:
        assert named["A4"] == pytest.approx(440.0)
    if "middle C" in named:
        assert named["middle C"] == pytest.approx(261.6256, rel=1e-5)
    assert midi_to_hz(69) == 440.0


def test_issue_example_caption_is_producible():
    c = SyntheticCorpus("train")
    p = {"category": "tone", "seed": 1, "waveform": "sine", "waveform_stated": True, "pitch_hz": 440.0,
         "pitch_text": "440 Hz", "duration": 2.0, "envelope": None, "placement": "left", "pan_db": 15.0,
         "gain_db": -6.0}
    caps = {c.caption(p, np.random.default_rng(s)) for s in range(3000)}
    assert "a 440 Hz sine tone on the left" in caps
    # articles are fixed up
    assert not any(" a 8" in x or x.startswith("a 8") for x in caps)


def test_heldout_separation():
    train = _params("train", 800)
    held = _params("heldout", 300)
    train_pitches = [q["pitch_hz"] for p in train for q in _leaves(p) if q["category"] == "tone"]
    train_bpms = [q["bpm"] for p in train for q in _leaves(p) if q["category"] == "clicks"]
    for f in train_pitches + [midi_to_hz(m) for m in TRAIN_NOTES]:
        assert all(abs(f - h) / h >= PITCH_HOLDOUT_TOL for h in HELDOUT_PITCHES_HZ), f
    for b in train_bpms:
        assert all(abs(b - h) / h >= BPM_HOLDOUT_TOL for h in HELDOUT_BPMS), b
    assert len(HELDOUT_PITCHES_HZ) >= 15 and len(HELDOUT_BPMS) >= 8
    for p in held:
        for q in _leaves(p):
            if q["category"] == "tone":
                assert q["pitch_hz"] in HELDOUT_PITCHES_HZ
            if q["category"] == "clicks":
                assert q["bpm"] in HELDOUT_BPMS

    # template strings are disjoint
    def strings(t):
        out = set()
        stack = [t]
        while stack:
            x = stack.pop()
            if isinstance(x, str):
                out.add(x)
            elif isinstance(x, dict):
                stack.extend(x.values())
            else:
                stack.extend(x)
        return out
    shared = strings(TEMPLATES["train"]) & strings(TEMPLATES["heldout"])
    shared -= {", ", " "}  # joiners
    # the bare waveform names are values, not templates
    shared -= {"sine", "square", "sawtooth", "triangle", "tone", "click", "beep"}
    assert not shared, shared

    # and the generated captions are disjoint
    ct, ch = SyntheticCorpus("train", seed=9), SyntheticCorpus("heldout", seed=9)
    tcaps = set()
    for i in range(400):
        r = ct.rng_for(i)
        tcaps.add(ct.caption(ct.sample_params(r), r))
    hcaps = set()
    for i in range(300):
        r = ch.rng_for(i)
        hcaps.add(ch.caption(ch.sample_params(r), r))
    assert len(hcaps) > 200 and len(tcaps) > 300
    assert not (tcaps & hcaps)


def test_heldout_caption_set():
    clips = heldout_caption_set(4)
    assert len(clips) == 4
    again = SyntheticCorpus("heldout", seed=1234)
    assert [c.caption for c in clips] == [again[i].caption for i in range(4)]
