"""The harmonic-plus-noise codec's analytic parts: pitch analysis, partial rendering, the latent's pitch channels."""
import math

import pytest
import torch

from models.codec import HarmonicAutoencoder, HarmonicAutoencoderConfig
from models.codec.harmonic import band_matrix, hann_lobe

SR = 44100


def tiny_codec() -> HarmonicAutoencoder:
    torch.manual_seed(0)
    return HarmonicAutoencoder(HarmonicAutoencoderConfig(hidden=32, encoder_blocks=1, decoder_latent_blocks=1,
                                                         decoder_frame_blocks=1)).eval()


def tone(freqs_amps, seconds=1.0, pan=(1.0, 1.0)) -> torch.Tensor:
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    x = sum(a * torch.cos(2 * math.pi * f * t) for f, a in freqs_amps).float()
    return torch.stack([pan[0] * x, pan[1] * x])[None]


def test_hann_lobe_matches_the_window_spectrum():
    n = 2048
    w = torch.hann_window(n, dtype=torch.float64)
    for d in (0.0, 0.3, 1.0, 1.7, 2.0):
        exact = (w * torch.exp(2j * math.pi * d * (torch.arange(n) - n / 2) / n)).sum().real / n
        assert float(hann_lobe(torch.tensor(d))) == pytest.approx(float(exact), abs=2e-4)


@pytest.mark.parametrize("f0", [97.3, 440.0, 1234.5, 1999.0])
def test_analyser_finds_a_tone_to_a_small_fraction_of_a_bin(f0):
    codec = tiny_codec()
    tau, freq = codec.analyser(codec.analyse(tone([(f0, 0.3)], pan=(1.0, 0.2))))
    inner = slice(2, 82)  # frames whose window lies inside the 1 s signal (86 frames; the rest is padding)
    assert torch.all(tau[0, 0, inner] == 1.0)
    assert torch.all((freq[0, 0, inner] / f0 - 1).abs() < 1e-3)
    assert torch.all(tau[0, 1, inner] == 0.0)  # no second source: side lobes and harmonics are not slots


def test_analyser_separates_two_tones_and_ignores_noise():
    codec = tiny_codec()
    tau, freq = codec.analyser(codec.analyse(tone([(300.0, 0.3), (1000.0, 0.2)])))
    assert torch.all(tau[0, :, 3:82] == 1.0)
    assert torch.allclose(freq[0, 0, 3:82], torch.tensor(300.0), rtol=1e-3)
    assert torch.allclose(freq[0, 1, 3:82], torch.tensor(1000.0), rtol=1e-3)
    torch.manual_seed(1)
    tau, _ = codec.analyser(codec.analyse(torch.randn(1, 2, SR) * 0.1))
    assert float(tau.max()) == 0.0


def test_rendered_partial_is_the_stft_of_a_real_sinusoid():
    codec = tiny_codec()
    c = codec.config
    f0 = 523.25
    wave = tone([(f0, 0.3)], pan=(1.0, 0.5))
    spec = codec.analyse(wave)
    frames = spec.shape[-1]
    log_amp = torch.full((1, c.slots, 2, c.max_harmonics, frames), -40.0)
    log_amp[0, 0, 0, 0], log_amp[0, 0, 1, 0] = math.log(0.3), math.log(0.15)
    rendered = codec.render(torch.full((1, c.slots, frames), math.log(f0)), log_amp,
                            torch.full((1, 2, c.bins, frames), -40.0))
    inner = (..., slice(2, 82))
    assert float((rendered - spec)[inner].abs().max() / spec.abs().max()) < 0.05  # main lobe only: side lobes cut
    y = codec.synthesize(rendered)
    assert float((y[..., 4096:40000] - wave[..., 4096:40000]).abs().max()) < 5e-3


def test_pitch_channels_of_the_latent_are_explicit():
    codec = tiny_codec()
    c = codec.config
    mean, logvar = codec.encode_distribution(tone([(440.0, 0.3)], seconds=2.0))
    inner = slice(1, 42)  # latent frames inside the 2 s signal (the last one is partly padding)
    assert torch.allclose(mean[0, 0, inner], torch.tensor(1.0))  # tonality of slot 1
    expected = c.pitch_scale * math.log(440.0 / c.pitch_ref_hz)
    assert torch.allclose(mean[0, 1, inner], torch.tensor(expected), atol=1e-3)
    assert torch.isneginf(logvar[0, : c.pitch_channels]).all()
    params = codec.decode_params(mean)  # the decoder's base pitch is the latent's, before any learned correction
    with torch.no_grad():
        codec.dec_out.weight.zero_()
        codec.dec_out.bias.zero_()
        logf = codec.decode_params(mean)["logf"]
    assert torch.allclose(logf[0, 0, 8:-8].exp(), torch.tensor(440.0), rtol=1e-3)
    assert params["log_amp"].shape[:2] == (1, c.slots)


def test_band_matrix_interpolates():
    m = band_matrix(1025, 48, SR)
    assert torch.allclose(m.sum(1), torch.ones(1025))
    assert (m >= 0).all()


def test_codec_shapes_and_determinism():
    codec = tiny_codec()
    wave = torch.randn(2, 2, 44100) * 0.1
    z = codec.encode(wave)
    assert z.shape == (2, 32, math.ceil(44100 / 2048))
    y1, y2 = codec.decode(z), codec.decode(z[1:])
    assert y1.shape == (2, 2, z.shape[-1] * 2048)
    assert torch.allclose(y1[1], y2[0], atol=1e-5)  # decoding does not depend on batch companions
    assert torch.equal(codec.decode(z), y1)
