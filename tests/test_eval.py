"""Offline evaluators: the pretrained CREPE pitch tracker and the caption-adherence metrics."""
import numpy as np
import pytest
import torch

from models.data import SAMPLE_RATE, SyntheticCorpus, render
from models.eval import (PitchTracker, channel_balance_db, estimate_tempo, evaluate_clip, pitch_error,
                         placement_matches, summarize)
from models.eval.pitch import CrepeNet, bins_to_cents, cents_to_hz, crepe_weights_path, load_crepe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return PitchTracker("tiny", hop_seconds=0.02)


def _find(category, split="train", **override):
    """First corpus params of a category (no envelope), with fields overridden."""
    c = SyntheticCorpus(split, seed=0, min_duration=1.0, max_duration=3.0)
    for i in range(1000):
        p = c.sample_params(c.rng_for(i))
        if p["category"] == category and p["envelope"] is None:
            p.update(override)
            return p
    raise AssertionError("not found")


def test_bins_and_weights_load_strict():
    # the published constant puts bin 0 at 31.70 Hz (not C1 = 32.70 Hz) and bin 359 at 2005.5 Hz;
    # readings of known tones (test_full_crepe_reads_440) confirm it is the mapping the weights use
    assert cents_to_hz(bins_to_cents(0)) == pytest.approx(31.70, abs=0.01)
    assert cents_to_hz(bins_to_cents(359)) == pytest.approx(2005.5, abs=0.5)
    for model in ("tiny", "full"):
        state = torch.load(crepe_weights_path(model), map_location="cpu", weights_only=True)
        net = CrepeNet(model)
        net.load_state_dict(state, strict=True)
    out = load_crepe("tiny")(torch.randn(3, 1024))
    assert out.shape == (3, 360) and torch.all((out >= 0) & (out <= 1))


def test_full_crepe_reads_440():
    tr = PitchTracker("full", hop_seconds=0.05)
    t = np.arange(int(0.6 * 16000)) / 16000
    f = tr.median_pitch(0.5 * np.sin(2 * np.pi * 440.0 * t), 16000, max_frames=8)
    assert f == pytest.approx(440.0, rel=0.005)


@pytest.mark.slow
def test_tracker_on_corpus_tones(tiny):
    p = _find("tone", waveform="sine", pitch_hz=300.0, pitch_text="300 Hz", placement=None, pan_db=0.0)
    audio = render(p)
    assert pitch_error(audio, SAMPLE_RATE, 300.0, tiny) < 0.01
    assert pitch_error(audio, SAMPLE_RATE, 450.0, tiny) > 0.3       # negative check
    f0, conf = tiny.track(audio.mean(0), SAMPLE_RATE)
    assert len(f0) == len(conf) == pytest.approx(p["duration"] / 0.02 + 1, abs=2)
    for wf, hz in (("square", 135.0), ("sawtooth", 571.0), ("triangle", 1141.0), ("sine", 90.0)):
        q = dict(p, waveform=wf, pitch_hz=hz)
        assert pitch_error(render(q), SAMPLE_RATE, hz, tiny) < 0.03, (wf, hz)
    # silence / noise carry no pitch
    assert tiny.median_pitch(np.zeros((2, 8000)), SAMPLE_RATE) is None
    assert tiny.median_pitch(np.random.default_rng(0).standard_normal(22050), SAMPLE_RATE) is None


def test_balance_and_placement():
    x = np.random.default_rng(0).standard_normal(44100)
    assert channel_balance_db(np.stack([x, 0.1 * x])) == pytest.approx(20.0, abs=1e-6)
    assert placement_matches(np.stack([x, x]), None) is None
    c = SyntheticCorpus("train", seed=2, min_duration=1.0, max_duration=2.0)
    seen = set()
    for i in range(120):
        clip = c[i]
        pl = clip.params["placement"]
        if pl is None:
            continue
        seen.add(pl)
        assert placement_matches(clip.audio, pl), (i, clip.caption)
        wrong = {"left": "right", "right": "left", "centre": "left",
                 "left-to-right": "right-to-left", "right-to-left": "left-to-right"}[pl]
        assert not placement_matches(clip.audio, wrong), (i, clip.caption)
    assert {"left", "right", "centre"} <= seen
    p = _find("tone", placement="right", pan_db=-15.0)
    assert placement_matches(render(p), "right") and not placement_matches(render(p), "left")


def test_tempo_of_corpus_clicks():
    for sound in ("click", "beep"):
        p = _find("clicks", bpm=120, sound=sound, sound_hz=3000.0 if sound == "click" else 1000.0,
                  sound_len_s=0.008 if sound == "click" else 0.08, duration=4.0)
        audio = render(p)
        bpm = estimate_tempo(audio, SAMPLE_RATE)
        assert bpm == pytest.approx(120.0, rel=0.05)
        assert abs(bpm - 90.0) / 90.0 > 0.05                      # negative check
    # slow, fast and noisy trains; no octave errors
    rng = np.random.default_rng(1)
    for b in (47, 75, 143, 187):
        p = _find("clicks", bpm=b, duration=6.0)
        audio = render(p)
        noisy = audio + 0.02 * rng.standard_normal(audio.shape).astype(np.float32)
        assert estimate_tempo(noisy, SAMPLE_RATE) == pytest.approx(b, rel=0.05), b
    # a steady tone has no tempo
    assert estimate_tempo(render(_find("tone", envelope=None)), SAMPLE_RATE) is None


@pytest.mark.slow
def test_evaluate_and_summarize(tiny):
    c = SyntheticCorpus("heldout", seed=0, min_duration=1.0, max_duration=3.0)
    results, shuffled = [], []
    clips = []
    for i in range(300):
        p = c.sample_params(c.rng_for(i))
        if p["category"] in ("tone", "clicks"):
            clips.append(p)
        if len(clips) == 10:
            break
    audios = [render(p) for p in clips]
    for a, p in zip(audios, clips):
        results.append(evaluate_clip(a, SAMPLE_RATE, p, tiny))
    s = summarize(results)
    assert s["n_tone"] + s["n_rhythmic"] == 10 and s["n_tone"] > 0 and s["n_rhythmic"] > 0
    assert s["pitch_within_3pct"] == 1.0 and s["pitch_error_median"] < 0.01
    assert s["tempo_within_5pct"] == 1.0
    if s["n_placed"]:
        assert s["placement_accuracy"] == 1.0
    # audio paired with the wrong ground truth scores worse
    for a, p in zip(audios[1:] + audios[:1], clips):
        shuffled.append(evaluate_clip(a, SAMPLE_RATE, p, tiny))
    bad = summarize(shuffled)
    assert (bad["pitch_within_3pct"] or 0) < 1.0 or (bad["tempo_within_5pct"] or 0) < 1.0
