"""Model code: batch invariance, save/load, determinism, text-encoder cache, codec shapes, the rhythm
conditioner's beat phase, the value conditioner's log values."""

import logging

import pytest
import torch
from training_support import tiny_codec

from models.bundle import ModelBundle
from models.config import BundleConfig
from models.codec import HarmonicAutoencoder, HarmonicAutoencoderConfig
from models.dit import DiT, DiTConfig, RhythmConditioner, ValueConditioner
from models.text import load_text_encoder
from models.text.encoders import NumberChannels

LATENT = DiTConfig.latent_dim  # the embedded codec's latent channels

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder({"name": "minilm"})


def tiny_bundle(text_encoder, sampler="ddim", guidance_in_model=False, **config):
    torch.manual_seed(0)
    cfg = BundleConfig(name="tiny", sampler=sampler, default_steps=4, max_steps=50, max_duration=4.0,
                       default_duration=1.0, guidance_in_model=guidance_in_model,
                       schedule={"name": "rectified-flow"} if sampler == "pingpong" else {"name": "vp-cosine"},
                       **config)
    dit = DiT(DiTConfig(width=32, depth=2, heads=2, guidance_embed=guidance_in_model))
    for p in dit.parameters():  # zero-initialised output layers would hide bugs: randomise everything
        torch.nn.init.normal_(p, std=0.05)
    codec = tiny_codec()
    return ModelBundle(cfg, dit, codec, text_encoder)


def test_dit_is_invariant_to_batch_padding(text_encoder):
    b = tiny_bundle(text_encoder)
    text = text_encoder.encode(["a 440 Hz sine tone", "rain on a roof with distant thunder and wind"])
    z = torch.randn(2, LATENT, 30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 17:] = False
    z[0, :, 17:] = 99.0  # garbage in the padding must not matter
    t, sec = torch.tensor([0.3, 0.8]), torch.tensor([0.8, 1.4])
    with torch.no_grad():
        batched = b.denoiser(z, t, text.tokens, text.mask, text.pooled, sec, mask)
        alone = text_encoder.encode(["a 440 Hz sine tone"])
        single = b.denoiser(z[:1, :, :17], t[:1], alone.tokens, alone.mask, alone.pooled, sec[:1])
    assert torch.allclose(batched[0, :, :17], single[0], atol=1e-5)
    assert torch.all(batched[0, :, 17:] == 0)


def test_rhythm_conditioner_repeats_at_the_stated_tempo_and_ignores_words():
    rate = 44100 / 2048
    conditioner = RhythmConditioner(16, rate, (1.0, 2.0, 3.0))
    torch.nn.init.normal_(conditioner.mix.weight, std=0.1)
    torch.nn.init.normal_(conditioner.mix.bias, std=0.1)
    encoder = load_text_encoder({"name": "minilm", "number_freqs": 4, "number_linear": True})
    bpm = 60 * rate / 10  # 129.2 BPM: a beat every 10 latent frames
    text = encoder.encode([f"clicks at {bpm:.4f} BPM", "rain on a roof"])
    context = torch.randn(*text.tokens.shape[:2], 16)
    out = conditioner(text.tokens, text.mask, context, 60)
    assert out.shape == (2, 60, 16)
    assert torch.allclose(out[0, 10:], out[0, :-10], atol=1e-3)  # the beat phase repeats every period ...
    assert not torch.allclose(out[0, 5:], out[0, :-5], atol=1e-1)  # ... and not at half of it
    assert torch.all(out[1] == 0)  # a prompt without numbers gets nothing, whatever its words
    padded = text.mask.clone()
    padded[0] = False  # nor do masked tokens
    assert torch.all(conditioner(text.tokens, padded, context, 60)[0] == 0)


def test_value_conditioner_is_affine_in_the_log_value_and_counts_a_number_once():
    conditioner = ValueConditioner(16)
    torch.nn.init.normal_(conditioner.mix.weight, std=0.1)
    torch.nn.init.normal_(conditioner.mix.bias, std=0.1)
    encoder = load_text_encoder({"name": "minilm", "number_freqs": 4, "number_linear": True})
    prompts = ["a tone at 100 Hz", "a tone at 400 Hz", "a tone at 1600 Hz", "a tone at 1141 Hz", "rain on a roof"]
    text = encoder.encode(prompts)
    number_tokens = (text.tokens[..., -2] * text.mask).sum(1)
    assert number_tokens[3] > 1  # the tokenizer splits this number: it must still count once
    context = torch.randn(1, text.tokens.shape[1], 16).expand(len(prompts), -1, -1).clone()
    state = torch.randn(16)
    for i in range(4):  # each number's tokens all read the same contextual state
        context[i, text.tokens[i, :, -2] > 0] = state
    out = conditioner(text.tokens, text.mask, context)
    assert out.shape == (5, 1, 16)
    # 400 Hz lies halfway between 100 and 1600 Hz in log: the output is affine in the log value ...
    assert torch.allclose(out[1], (out[0] + out[2]) / 2, atol=1e-5)
    assert not torch.allclose(out[0], out[2], atol=1e-2)
    # ... and a number split into several tokens contributes what one token of its value would
    a, c = conditioner.mix(state).view(2, 16)
    log_value = text.tokens[3, text.tokens[3, :, -2] > 0, -1]
    assert torch.allclose(out[3, 0], log_value[0] * a + c, atol=1e-5) and torch.all(log_value == log_value[0])
    assert torch.all(out[4] == 0)  # a prompt without numbers gets nothing
    padded = text.mask.clone()
    padded[0] = False  # nor do masked tokens
    assert torch.all(conditioner(text.tokens, padded, context)[0] == 0)


def test_values_only_hides_the_values_from_attention_and_the_pooled_condition():
    """With values_only a stated value reaches the denoiser through the value conditioner alone: changing its smooth
    (sine / cosine) channels, which only attention and the pooled condition read, changes nothing; changing its
    linear log value still does. Without the flag the smooth channels matter."""
    encoder = load_text_encoder({"name": "minilm", "number_freqs": 4, "number_linear": True, "number_masked": True})
    width = 2 * 4 + 2
    text = encoder.encode(["a tone at 440 Hz"])
    smooth, linear = text.tokens.clone(), text.tokens.clone()
    is_number = text.tokens[0, :, -2] > 0
    smooth[0, is_number, -width:-2] += 0.5
    linear[0, is_number, -1] += 0.5
    pooled_smooth = text.pooled.clone()
    pooled_smooth[0, -width:-2] += 0.5
    z, t, sec = torch.randn(1, LATENT, 12), torch.tensor([0.5]), torch.tensor([1.0])

    def run(values_only, tokens, pooled):
        torch.manual_seed(0)
        dit = DiT(DiTConfig(width=32, depth=1, heads=2, text_dim=encoder.dim, pooled_dim=encoder.pooled_dim,
                            number_values=True, number_width=width, values_only=values_only))
        for p in dit.parameters():
            torch.nn.init.normal_(p, std=0.05)
        with torch.no_grad():
            return dit(z, t, tokens, text.mask, pooled, sec)

    base = run(True, text.tokens, text.pooled)
    assert torch.allclose(run(True, smooth, pooled_smooth), base, atol=1e-6)
    assert not torch.allclose(run(True, linear, text.pooled), base, atol=1e-4)
    assert not torch.allclose(run(False, smooth, pooled_smooth), run(False, text.tokens, text.pooled), atol=1e-4)
    with pytest.raises(ValueError, match="values_only"):
        DiTConfig(number_values=False, number_width=width, values_only=True)
    with pytest.raises(ValueError, match="values_only"):
        DiTConfig(number_values=True, number_width=0, values_only=True)
    hiding = DiTConfig(number_values=True, number_width=width, values_only=True)
    hiding.check_numbers(NumberChannels(4, True, True))
    with pytest.raises(ValueError, match="hides the values of 10 number channels, but the text encoder writes 34"):
        hiding.check_numbers(NumberChannels(16, True, True))


def test_a_denoiser_config_with_a_retired_key_loads_without_it_and_warns(caplog, monkeypatch):
    """A saved denoiser config that still holds the key of an option since removed (the value head) loads as the
    config without it, and the log names the key; an unknown key is still an error."""
    monkeypatch.setattr(logging.getLogger("tta"), "propagate", True)  # the service's logging setup turns it off
    config = DiTConfig(width=32, depth=1, heads=2, number_values=True)
    saved = {**DiT(config).to_config(), "value_head_slots": 0}
    with caplog.at_level("WARNING", logger="tta.models"):
        loaded = DiT.from_config(saved)
    assert loaded.config == config
    assert any("value_head_slots" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    with pytest.raises(TypeError, match="no_such_option"):
        DiT.from_config({**config.__dict__, "no_such_option": 1})


@pytest.mark.parametrize("conditioner", [{"rhythm_frame_rate": 44100 / 2048}, {"number_values": True}])
def test_a_number_reading_denoiser_without_linear_number_channels_does_not_load(tmp_path, text_encoder,
                                                                                 conditioner):
    b = tiny_bundle(text_encoder)
    b.denoiser = DiT(DiTConfig(width=32, depth=2, heads=2, **conditioner))
    b.save(tmp_path / "m")
    with pytest.raises(ValueError, match="number_linear"):
        ModelBundle.load(tmp_path / "m", text_encoder=text_encoder)


def test_predict_x0_mixed_guidance_matches_separate_calls(text_encoder):
    b = tiny_bundle(text_encoder)
    cond = b.pipeline.conditioning(["a dog barks", "white noise fading in", "a kick drum"], [1.0, 2.0, 1.5])
    frames = [b.latent_frames(d) for d in (1.0, 2.0, 1.5)]
    z = torch.randn(3, LATENT, max(frames))
    mask = torch.arange(max(frames))[None] < torch.tensor(frames)[:, None]
    t = torch.tensor([0.9, 0.5, 0.2])
    g = torch.tensor([3.0, 1.0, 5.0])
    x0 = b.pipeline.predict_x0(z, t, cond, g, mask)
    for i in range(3):
        one = b.pipeline.predict_x0(z[i:i + 1, :, :frames[i]], t[i:i + 1], cond.select([i]), g[i:i + 1],
                           torch.ones(1, frames[i], dtype=torch.bool))
        assert torch.allclose(x0[i, :, :frames[i]], one[0], atol=1e-5)
    assert b.pipeline.forward_count(g) == 5  # 3 conditional rows + 2 unconditional rows in ONE forward


def test_save_load_round_trip_and_seeded_generation(tmp_path, text_encoder):
    b = tiny_bundle(text_encoder)
    b.save(tmp_path / "tiny")
    loaded = ModelBundle.load(tmp_path / "tiny", text_encoder=text_encoder)
    a = b.pipeline.generate(["a 440 Hz sine tone on the left"], [1.3], [7], steps=3)[0]
    c = loaded.pipeline.generate(["a 440 Hz sine tone on the left"], [1.3], [7], steps=3)[0]
    d = loaded.pipeline.generate(["a 440 Hz sine tone on the left"], [1.3], [8], steps=3)[0]
    assert a.shape == (2, round(1.3 * 44100))
    assert torch.equal(a, c)
    assert not torch.allclose(a, d)


def test_generation_alone_equals_generation_in_a_mixed_batch(text_encoder):
    b = tiny_bundle(text_encoder, sampler="pingpong")
    alone = b.pipeline.generate_latents(["birds chirping"], [1.0], [11], steps=4, guidance=1.0)[0]
    mixed = b.pipeline.generate_latents(["a siren", "birds chirping", "a 300 Hz square wave"], [2.0, 1.0, 0.5],
                               [3, 11, 5], steps=4, guidance=1.0)[1]
    assert torch.allclose(alone, mixed, atol=1e-5)


def test_guidance_embedding_student_runs_one_forward(text_encoder):
    b = tiny_bundle(text_encoder, guidance_in_model=True)
    assert b.pipeline.forward_count(torch.tensor([3.0, 1.0])) == 2
    out = b.pipeline.generate_latents(["a clap"], [0.5], [1], steps=2, guidance=3.0)[0]
    assert torch.isfinite(out).all()


def test_text_cache_returns_the_same_embeddings(text_encoder):
    enc = load_text_encoder({"name": "minilm"}, cache_size=2)
    first = enc.encode(["ocean waves", "a phone ringing on the right"])
    again = enc.encode(["a phone ringing on the right"])
    n = int(again.mask[0].sum())
    assert torch.allclose(first.tokens[1, :n], again.tokens[0, :n])
    assert enc.hits == 1 and enc.misses == 2
    enc.encode(["x", "y", "z"])
    assert len(enc._cache) == 2  # LRU bound


def test_decode_groups_equal_lengths_and_caps_the_batch():
    from models.pipeline import decode_grouped

    calls = []

    def upsample(batch):  # [B, D, T] -> [B, 2, 10 T]: a stand-in decoder that is exact to check against
        calls.append(tuple(batch.shape))
        return batch[:, :2].repeat_interleave(10, dim=-1)

    latents = [torch.randn(3, 5) for _ in range(6)] + [torch.randn(3, 7)]
    durations = [0.4] * 6 + [0.65]
    waves = decode_grouped(latents, durations, 100, upsample, max_batch=4)
    assert calls == [(4, 3, 5), (2, 3, 5), (1, 3, 7)]
    for x, w, d in zip(latents, waves, durations):
        assert w.shape == (2, round(d * 100)) and torch.equal(w, x[:2].repeat_interleave(10, dim=-1)[:, : w.shape[-1]])


def test_channel_weighted_mse_and_the_analytic_channel_weights():
    from models.training.batches import latent_channel_weight, masked_mse

    pred = torch.zeros(2, 3, 4)
    target = torch.zeros(2, 3, 4)
    target[:, 0] = 1.0   # channel 0 wrong by 1 on every frame, channel 2 by 2, channel 1 exact
    target[:, 2] = 2.0
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    target[1, :, 2:] = 9.0  # padded frames never count
    assert torch.allclose(masked_mse(pred, target, mask), torch.full((2,), (1 + 4) / 3))
    w = torch.tensor([3.0, 1.0, 1.0])
    assert torch.allclose(masked_mse(pred, target, mask, w), torch.full((2,), (3 * 1 + 4) / 5))

    codec = HarmonicAutoencoder(HarmonicAutoencoderConfig(latent_dim=12, hidden=32, slots=2, balance=True))
    weight = latent_channel_weight(codec, 4.0)
    names = codec.config.channel_names()
    assert weight.tolist() == [1.0 if n.startswith("learned") else 4.0 for n in names]
    assert weight[:5].tolist() == [4.0] * 5 and latent_channel_weight(codec, 1.0) is None
