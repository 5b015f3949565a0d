"""The teacher-quality benchmark's latent reading: where a generated tone's pitch miss comes from."""
import math
import pytest
from types import SimpleNamespace

import numpy as np
import torch
from training_support import tiny_codec, tiny_teacher

from benchmarks.teacher_quality import latent_reading, latent_summary, reference_tonality, seed_spread

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

SR = 44100


def _tone(hz: float, seconds: float = 1.5) -> SimpleNamespace:
    t = np.arange(int(seconds * SR)) / SR
    wave = (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return SimpleNamespace(audio=np.stack([wave, wave]), params={"pitch_hz": hz})


def test_latent_reading_separates_a_wrong_tonality_from_a_wrong_pitch():
    """The encoding of the described clip reads its own pitch; the same latents with every tonality scaled by 0.8
    (the pitch channel untouched) state a pitch 1.25 times as far from 400 Hz in log, a miss that the reading with
    the reference's tonality undoes exactly."""
    codec = tiny_codec().eval()
    clip = _tone(1000.0)
    z = codec.encode(torch.from_numpy(clip.audio)[None])[0]
    tau_ref = reference_tonality(codec, clip)
    own = latent_reading(codec, z, clip, tau_ref)
    assert own["latent_pitch_error"] < 0.01 and abs(own["latent_tonality"] - own["reference_tonality"]) < 1e-6

    raw = codec.denormalize(z[None])
    raw[:, 0] *= 0.8
    dull = latent_reading(codec, codec.normalize(raw)[0], clip, tau_ref)
    expected = math.exp(0.25 * math.log(1000.0 / codec.config.pitch_ref_hz)) - 1  # 0.8 tonality: 1.25 x the log
    assert abs(dull["latent_pitch_error"] - expected) < 0.02
    assert dull["latent_pitch_error_reference_tonality"] < 0.01
    assert abs(dull["latent_tonality"] / dull["reference_tonality"] - 0.8) < 1e-3

    summary = latent_summary([{"is_tone": True, **own}, {"is_tone": True, **dull}, {"is_tone": False}])
    assert summary["n_latent"] == 2
    assert abs(summary["latent_pitch_error_median"] - np.median([own["latent_pitch_error"],
                                                                  dull["latent_pitch_error"]])) < 1e-9


def test_seed_spread_separates_a_caption_bias_from_the_spread_over_seeds():
    def row(clip, hz):
        return {"is_tone": True, "clip": clip, "target_pitch_hz": 400.0, "measured_pitch_hz": hz}

    up, down = [400 * math.exp(e) for e in (0.09, 0.10, 0.11)], [400 * math.exp(e) for e in (-0.02, 0.0, 0.02)]
    rows = [row(0, hz) for hz in up] + [row(1, hz) for hz in down] + [row(2, 410.0), row(2, None), row(2, 420.0)]
    rows.append({"is_tone": False, "clip": 3})
    got = seed_spread(rows)
    assert got["n_spread"] == 2 and got["repeats"] == 3  # clip 2 has an unmeasured seed
    assert abs(got["caption_bias_median"] - 0.05) < 1e-9  # median of 0.10 and 0.00
    sd_up, sd_down = np.std([0.09, 0.10, 0.11]), np.std([-0.02, 0.0, 0.02])
    assert abs(got["seed_sd_median"] - (sd_up + sd_down) / 2) < 1e-9
    per_seed = [np.median([abs(math.expm1(a)), abs(math.expm1(b))])
                for a, b in zip((0.09, 0.10, 0.11), (-0.02, 0.0, 0.02))]
    assert np.allclose(got["per_seed_error_median"], per_seed)
    assert seed_spread([row(0, 400.0)]) == {}  # one seed: nothing to say


def test_the_benchmark_reports_the_latent_reading_of_its_tones(tmp_path, text_encoder):
    from benchmarks.teacher_quality import main

    tiny_teacher(tmp_path, text_encoder, depth=1, default_steps=2)
    data = main(["--model", str(tmp_path / "tiny-teacher"), "--tones", "2", "--clicks", "0", "--other", "0",
                 "--steps", "2", "--batch", "2", "--repeats", "2", "--threads", "1", "--out-dir", str(tmp_path / "out"),
                 "--name", "tq"])
    assert data["summary"]["n_tone"] == 4  # 2 tones x 2 seeds
    assert sorted((r["clip"], r["seed"]) for r in data["per_clip"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all("latent_tonality" in r for r in data["per_clip"])
    assert "2 ddim steps, guidance 3.0, 2 held-out clips" in (tmp_path / "out" / "tq.md").read_text()
