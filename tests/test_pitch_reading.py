"""The pitch-reading benchmark: the guidance stretch it reports, and one tiny end-to-end run."""
import math

import numpy as np
import torch
from training_support import tiny_codec, tiny_teacher

from models.diffusion.guidance import apply_guidance


def test_guidance_stretches_the_read_pitch_by_the_unconditional_tonality():
    """The codec states pitch as (tonality, tonality * scaled log pitch), so guidance g against an unconditional
    prediction of tonality tau_u stretches the read log pitch by g / (g - (g - 1) tau_u): not at all when that
    prediction states no tone, by g when it is sure of one (the figure the benchmark's comment gives)."""
    codec = tiny_codec()
    c = codec.config
    stated = np.array([90.0, 200.0, 440.0, 1000.0, 1614.0])
    logs = np.log(stated / c.pitch_ref_hz)
    cond = torch.zeros(len(stated), codec.latent_dim, 4)
    cond[:, 0], cond[:, 1] = 1.0, torch.tensor(c.pitch_scale * logs, dtype=torch.float32)[:, None]
    for tau_u, g in ((0.0, 3.0), (0.5, 3.0), (0.6, 2.0), (1.0, 3.0)):
        uncond = torch.zeros_like(cond)
        uncond[:, 0], uncond[:, 1] = tau_u, c.pitch_scale * tau_u * math.log(580 / c.pitch_ref_hz)
        guided = apply_guidance(codec.normalize(cond), codec.normalize(uncond), torch.full((len(stated),), g))
        _, hz = codec.latent_pitch(guided)
        read = np.log(hz[:, 0, 0].double().numpy() / c.pitch_ref_hz)
        slope = np.polyfit(logs, read, 1)[0]
        assert abs(slope - g / (g - (g - 1) * tau_u)) < 1e-4
        if tau_u == 0.0:
            assert abs(slope - 1.0) < 1e-4


def test_the_benchmark_reports_the_guided_reading(tmp_path, text_encoder):
    from benchmarks.pitch_reading import main

    tiny_teacher(tmp_path, text_encoder, depth=1, default_steps=2)
    data = main(["--model", str(tmp_path / "tiny-teacher"), "--points", "4", "--draws", "1", "--seeds", "2",
                 "--sample-pitches", "200,800", "--steps", "2", "--out-dir", str(tmp_path / "out"), "--name", "pr"])
    assert data["reading"]["points"] == 4 and data["guided_reading"]["guidance"] == 3.0
    assert np.isfinite(data["guided_reading"]["gain"]) and np.isfinite(data["unconditional_tonality"])
    assert [s["guidance"] for s in data["sampling"]] == [1.0, 3.0]
    assert (tmp_path / "out" / "pr.json").is_file()
    assert "reading under guidance 3" in (tmp_path / "out" / "pr.md").read_text()
