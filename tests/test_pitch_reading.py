"""The pitch-reading benchmark: the guidance stretch it reports, and one tiny end-to-end run."""
import math

import numpy as np
import pytest
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
                 "--sample-pitches", "200,800", "--steps", "2", "--phrasing-pitches", "300", "--phrasings", "3",
                 "--out-dir", str(tmp_path / "out"), "--name", "pr"])
    assert data["reading"]["points"] == 4 and data["guided_reading"]["guidance"] == 3.0
    assert np.isfinite(data["guided_reading"]["gain"]) and np.isfinite(data["unconditional_tonality"])
    assert [s["guidance"] for s in data["sampling"]] == [1.0, 3.0]
    assert (tmp_path / "out" / "pr.json").is_file()
    assert "reading under guidance 3" in (tmp_path / "out" / "pr.md").read_text()
    phrased = data["phrasing"]["per_pitch"][0]
    assert phrased["stated_hz"] == 300 and len(set(phrased["captions"])) == 3
    assert all("300 Hz" in c for c in phrased["captions"]) and np.isfinite(phrased["sd_ln"])
    assert data["value_conditioner_off"] == {} == data["value_head_off"]  # the tiny teacher has neither


def test_a_value_reader_off_zeroes_its_term_only_within_the_block():
    from types import SimpleNamespace

    from benchmarks.pitch_reading import value_reader_off
    from models.dit import DiT, DiTConfig

    dit = DiT(DiTConfig(width=16, depth=1, heads=2, text_dim=8, pooled_dim=8, number_values=True))
    torch.nn.init.normal_(dit.values.mix.weight)
    tokens = torch.zeros(1, 3, 8)
    tokens[0, 1, -2], tokens[0, 1, -1] = 1.0, 0.7  # one number token
    mask, context = torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 3, 16)
    before = dit.values(tokens, mask, context)
    assert before.abs().sum() > 0
    with value_reader_off(SimpleNamespace(denoiser=dit)) as has:
        assert has and torch.count_nonzero(dit.values(tokens, mask, context)) == 0
    assert torch.equal(dit.values(tokens, mask, context), before)
    with value_reader_off(SimpleNamespace(denoiser=DiT(DiTConfig(width=16, depth=1, heads=2)))) as has:
        assert not has
    headed = DiT(DiTConfig(width=16, depth=1, heads=2, text_dim=8, pooled_dim=8, latent_dim=5, value_head_slots=1))
    torch.nn.init.normal_(headed.value_head.out.weight)
    hidden = torch.randn(1, 4, 16)
    before = headed.value_head(tokens, mask, context, hidden)
    with value_reader_off(SimpleNamespace(denoiser=headed), "value_head") as has:
        assert has and torch.count_nonzero(headed.value_head(tokens, mask, context, hidden)) == 0
    assert before.abs().sum() > 0 and torch.equal(headed.value_head(tokens, mask, context, hidden), before)


def test_phrasings_can_come_from_the_held_out_templates(tmp_path, text_encoder):
    from benchmarks.pitch_reading import phrasing_spread
    from models.bundle import ModelBundle
    from models.data.corpus import TEMPLATES

    tiny_teacher(tmp_path, text_encoder, depth=1, default_steps=2)
    bundle = ModelBundle.load(tmp_path / "tiny-teacher")
    held = phrasing_spread(bundle, [300], 4, 0.99, 1, split="heldout")
    wrappers = [w.split("{")[0] or w.split("}")[-1] for w in TEMPLATES["heldout"]["wrapper"]]
    assert held["split"] == "heldout"
    for caption in held["per_pitch"][0]["captions"]:
        assert "300 Hz" in caption and any(w in caption for w in wrappers), caption
    trained = phrasing_spread(bundle, [300], 4, 0.99, 1)
    assert not any(w in c for c in trained["per_pitch"][0]["captions"] for w in wrappers)


def test_phrasing_sources_swap_only_the_named_part(tmp_path, text_encoder):
    """With the whole text condition taken from the template, the captions read as the template itself does (the
    same noise draws); with none of it, as the captions do; the report has each variant."""
    from benchmarks.pitch_reading import phrasing_captions, phrasing_sources, read_at_noise, spread_of
    from models.bundle import ModelBundle
    from models.text.encoders import NumberChannels

    tiny_teacher(tmp_path, text_encoder, depth=1, default_steps=2)
    bundle = ModelBundle.load(tmp_path / "tiny-teacher")
    numbers = NumberChannels.from_config(bundle.config.text_encoder)
    template = "a sine tone at {} Hz"
    got = phrasing_sources(bundle, [300, 900], 4, 0.99, 1, "heldout", template, numbers)
    captions = phrasing_captions([300, 900], 4, "heldout")
    own = {hz: read_at_noise(bundle, bundle.encode_text(c), 0.99, 1) for hz, c in captions.items()}
    canon = {hz: read_at_noise(bundle, bundle.encode_text([template.format(hz)] * 4), 0.99, 1) for hz in captions}
    assert got["own"] == pytest.approx(spread_of(own), rel=1e-4)
    assert got["template"] == pytest.approx(spread_of(canon), rel=1e-4)
    assert got["own"] != pytest.approx(got["template"], rel=1e-3)
    given = phrasing_sources(bundle, [300, 900], 4, 0.99, 1, "heldout", template, numbers,
                             {hz: 2 * r for hz, r in own.items()})  # readings at hand are taken, not read again
    assert given["own"] == pytest.approx(spread_of({hz: 2 * r for hz, r in own.items()}), rel=1e-6)
    assert given["template"] == pytest.approx(got["template"], rel=1e-6)
    expected = {"own", "template_pooled", "template_tokens", "template"} | (
        {"template_number_tokens"} if numbers.linear else set())
    assert expected <= set(got)


def test_number_states_come_from_the_template_number_token_only():
    from benchmarks.pitch_reading import with_number_state
    from models.text.encoders import PRESENT_CHANNEL

    tokens = torch.randn(2, 5, 6)
    tokens[..., PRESENT_CHANNEL] = 0.0
    tokens[0, 2, PRESENT_CHANNEL] = tokens[1, 3, PRESENT_CHANNEL] = tokens[1, 4, PRESENT_CHANNEL] = 1.0
    template = torch.randn(4, 6)
    template[:, PRESENT_CHANNEL] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    out = with_number_state(tokens, template)
    swapped = torch.zeros(2, 5, dtype=torch.bool)
    swapped[0, 2] = swapped[1, 3] = swapped[1, 4] = True
    assert torch.equal(out[swapped], template[1].expand(3, 6))
    assert torch.equal(out[~swapped], tokens[~swapped])
