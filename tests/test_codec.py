"""The harmonic-plus-noise codec's analytic parts: pitch analysis, partial rendering, the latent's pitch and
balance channels, warm starts across latent layouts."""
import json
import math

import pytest
import torch
import training_support
from safetensors.torch import save_file

from models.audio.spectral import istft, stft
from models.codec import HarmonicAutoencoder, HarmonicAutoencoderConfig, load_codec
from models.codec.harmonic import balance_gains, band_matrix, signed_hann_lobes
from models.training.warm_start import (
    DIT_CHANNEL_PARAMS,
    load_remapped,
    warm_start_codec,
)

SR = 44100


def tiny_codec() -> HarmonicAutoencoder:
    torch.manual_seed(0)
    return training_support.tiny_codec().eval()


def tone(freqs_amps, seconds=1.0, pan=(1.0, 1.0)) -> torch.Tensor:
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    x = sum(a * torch.cos(2 * math.pi * f * t) for f, a in freqs_amps).float()
    return torch.stack([pan[0] * x, pan[1] * x])[None]


def hann_lobe(d: torch.Tensor) -> torch.Tensor:
    """The reference the renderer's closed form is checked against: the periodic Hann window's spectrum at an offset
    of d bins, divided by n_fft, as a sum of three sincs."""
    return 0.5 * torch.sinc(d) + 0.25 * (torch.sinc(d - 1) + torch.sinc(d + 1))


@pytest.mark.filterwarnings("ignore:The length of signal is shorter")  # torch.istft, when asked to pad (case 3)
@pytest.mark.parametrize("n_fft,hop,frames,length", [(2048, 512, 40, 39 * 512), (16, 4, 9, 32), (16, 4, 9, 45),
                                                     (16, 5, 9, 40)])
def test_istft_equals_torch_istft(n_fft, hop, frames, length):
    """The codec's inverse STFT (shifted-block overlap-add when the hop divides n_fft) is torch.istft's least-squares
    inverse, also when ``length`` asks for more samples than the frames hold (zeros, as torch pads)."""
    g = torch.Generator().manual_seed(n_fft + hop + length)
    spec = torch.complex(torch.randn(2, 3, n_fft // 2 + 1, frames, generator=g),
                         torch.randn(2, 3, n_fft // 2 + 1, frames, generator=g))
    want = torch.istft(spec.reshape(6, n_fft // 2 + 1, frames), n_fft, hop, window=torch.hann_window(n_fft),
                       center=True, length=length).reshape(2, 3, length)
    got = istft(spec, n_fft, hop, length)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_istft_inverts_stft_and_passes_gradients():
    wave = torch.randn(2, 2, 4096, generator=torch.Generator().manual_seed(1))
    spec = stft(wave, 512, 128).requires_grad_()
    back = istft(spec, 512, 128, 4096)
    assert torch.allclose(back, wave, atol=1e-5)
    back.pow(2).sum().backward()
    assert spec.grad is not None and float(spec.grad.abs().sum()) > 0


def test_hann_lobe_matches_the_window_spectrum():
    n = 2048
    w = torch.hann_window(n, dtype=torch.float64)
    for d in (0.0, 0.3, 1.0, 1.7, 2.0):
        exact = (w * torch.exp(2j * math.pi * d * (torch.arange(n) - n / 2) / n)).sum().real / n
        assert float(hann_lobe(torch.tensor(d))) == pytest.approx(float(exact), abs=2e-4)


def test_signed_lobes_are_the_lobe_at_each_offset_with_the_bin_phase_sign():
    """The renderer's closed form (one sinc of the fractional bin for all five bins) equals the window spectrum at
    d = offset - frac times (-1)^offset, also at frac = 0 where its factors cancel by hand."""
    frac = torch.tensor([-0.5, -0.31, -1e-6, 0.0, 1e-6, 0.2, 0.4999, 0.5], dtype=torch.float64)
    got = signed_hann_lobes(frac)  # [5, 8]
    for row, o in enumerate(range(-2, 3)):
        want = hann_lobe(o - frac) * (-1) ** o
        assert torch.allclose(got[row], want, atol=1e-9), (o, got[row], want)


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
    channel_log_amp = torch.full((1, c.slots, 2, frames), -40.0)  # slot 1: 0.3 on the left, 0.15 on the right
    channel_log_amp[0, 0, 0], channel_log_amp[0, 0, 1] = math.log(0.3), math.log(0.15)
    partial_log_amp = torch.full((1, c.slots, c.max_harmonics, frames), -40.0)
    partial_log_amp[0, :, 0] = 0.0  # the fundamental only
    rendered = codec.render(torch.full((1, c.slots, frames), math.log(f0)), channel_log_amp, partial_log_amp,
                            torch.full((1, 2, c.bins, frames), -40.0))
    inner = (..., slice(2, 82))
    assert float((rendered - spec)[inner].abs().max() / spec.abs().max()) < 0.05  # main lobe only: side lobes cut
    y = codec.synthesize(rendered)
    assert float((y[..., 4096:40000] - wave[..., 4096:40000]).abs().max()) < 5e-3


def test_training_backpropagates_through_rendering_and_synthesis():
    """The autoencoder's losses run decode_params -> render -> synthesize with gradients (in-place tricks that
    speed up serving must leave autograd's saved tensors alone)."""
    codec = tiny_codec().train()
    p = codec.decode_params(torch.randn(2, codec.config.latent_dim, 5, generator=torch.Generator().manual_seed(0)))
    wave = codec.synthesize(codec.render(**p))
    (wave.pow(2).sum() + codec.render(**p).abs().sum()).backward()
    grads = [w.grad for w in (codec.dec_out.weight, codec.dec_in.weight)]
    assert all(g is not None and torch.isfinite(g).all() and float(g.abs().sum()) > 0 for g in grads)


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
    assert params["channel_log_amp"].shape[:3] == (1, c.slots, 2)
    assert params["partial_log_amp"].shape[:3] == (1, c.slots, c.max_harmonics)


def test_band_matrix_interpolates():
    m = band_matrix(1025, 48, SR)
    assert torch.allclose(m.sum(1), torch.ones(1025))
    assert (m >= 0).all()


def test_codec_shapes_and_determinism():
    codec = tiny_codec()
    wave = torch.randn(2, 2, 44100) * 0.1
    z = codec.encode(wave)
    assert z.shape == (2, codec.latent_dim, math.ceil(44100 / 2048))
    y1, y2 = codec.decode(z), codec.decode(z[1:])
    assert y1.shape == (2, 2, z.shape[-1] * 2048)
    assert torch.allclose(y1[1], y2[0], atol=1e-5)  # decoding does not depend on batch companions
    assert torch.equal(codec.decode(z), y1)


def test_balance_channel_places_the_sound():
    codec = tiny_codec()
    c = codec.config
    assert c.channel_names()[c.pitch_channels] == "balance"
    with torch.no_grad():  # a decoder that ignores the learned code: both channels get the same levels
        codec.dec_out.weight.zero_()
    for pan_db in (-20.0, 0.0, 9.0):
        g = 10 ** (pan_db / 20)
        wave = tone([(440.0, 0.3)], seconds=2.0, pan=(1.0 / max(1.0, g), g / max(1.0, g)))
        raw, _ = codec.encode_distribution(wave)
        inner = slice(1, 42)
        expected = pan_db / 20 * math.log(10)  # half the log energy ratio = the log amplitude ratio
        assert torch.allclose(raw[0, c.pitch_channels, inner], torch.tensor(expected), atol=1e-3)
        y = codec.decode(codec.normalize(raw))[..., 4096:80000]
        energy = y.pow(2).mean(-1)[0]
        assert 10 * math.log10(energy[1] / energy[0]) == pytest.approx(pan_db, abs=0.5)


def test_balance_gains_keep_power():
    b = torch.linspace(-4, 4, 9)[None]
    gains = balance_gains(b).exp()
    assert torch.allclose(gains.pow(2).sum(1), torch.full_like(b, 2.0))
    assert torch.allclose(gains[:, 1] / gains[:, 0], b.exp())


def test_warm_start_from_a_codec_without_a_balance_channel(tmp_path):
    torch.manual_seed(1)
    small = {"hidden": 32, "encoder_blocks": 1, "decoder_latent_blocks": 1, "decoder_frame_blocks": 1}
    old = HarmonicAutoencoder(HarmonicAutoencoderConfig(latent_dim=32, balance=False, **small)).eval()
    with torch.no_grad():
        for p in old.dec_out.parameters():
            p.normal_(0, 0.05)
    config = {k: v for k, v in old.to_config().items() if k != "balance"}  # as codecs were saved before it
    config["latent_shift"], config["latent_scale"] = [0.1] * 32, [2.0] * 32
    save_file(old.state_dict(), tmp_path / "codec.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"codec": config}))
    old = load_codec(tmp_path)
    assert not old.config.balance and old.latent_dim == 32
    new = HarmonicAutoencoder(HarmonicAutoencoderConfig(**small)).eval()
    assert warm_start_codec(new, tmp_path) == ["balance"]
    wave = tone([(300.0, 0.2), (1100.0, 0.1)], seconds=1.0)  # centred: balance 0, so the pan gains are 1
    z_old, z_new = old.encode(wave), new.encode(wave)
    keep = [i for i in range(33) if i != new.config.pitch_channels]
    assert torch.allclose(z_new[:, keep], z_old, atol=1e-5)
    assert torch.allclose(new.decode(z_new), old.decode(z_old), atol=1e-5)


def test_dit_warm_start_maps_channels_by_name():
    from models.dit import DiT, DiTConfig

    torch.manual_seed(2)
    names32 = HarmonicAutoencoderConfig(latent_dim=32, balance=False).channel_names()
    names33 = HarmonicAutoencoderConfig().channel_names()
    small = {"width": 32, "depth": 1, "heads": 2, "text_dim": 8, "pooled_dim": 8}
    old, new = DiT(DiTConfig(latent_dim=32, **small)).eval(), DiT(DiTConfig(latent_dim=33, **small)).eval()
    with torch.no_grad():
        for p in old.parameters():
            p.normal_(0, 0.05)
    assert load_remapped(new, old.state_dict(), DIT_CHANNEL_PARAMS, names32, names33) == ["balance"]
    z = torch.randn(1, 33, 7)
    keep = [i for i, n in enumerate(names33) if n != "balance"]
    args = (torch.tensor([0.4]), torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 8),
            torch.tensor([1.0]))
    with torch.no_grad():
        out_new, out_old = new(z, *args), old(z[:, keep], *args)
    assert torch.allclose(out_new[:, keep], out_old, atol=1e-5)
    assert torch.all(out_new[:, 4] == 0)


def test_dit_warm_start_gives_appended_text_channels_zero_weights():
    """A teacher warm-started onto a text encoder with more number channels computes what the old one did, whatever
    the new channels hold, until training moves their (zero) weights."""
    from models.dit import DiT, DiTConfig
    from models.training.warm_start import DIT_TEXT_INPUTS

    torch.manual_seed(3)
    names = HarmonicAutoencoderConfig().channel_names()
    small = {"latent_dim": 33, "width": 32, "depth": 1, "heads": 2}
    old = DiT(DiTConfig(text_dim=8, pooled_dim=8, **small)).eval()
    new = DiT(DiTConfig(text_dim=10, pooled_dim=10, **small)).eval()
    with torch.no_grad():
        for p in old.parameters():
            p.normal_(0, 0.05)
    load_remapped(new, old.state_dict(), DIT_CHANNEL_PARAMS, names, names, widened=DIT_TEXT_INPUTS)
    z, tokens, pooled = torch.randn(1, 33, 7), torch.randn(1, 3, 10), torch.randn(1, 10)
    t, mask, seconds = torch.tensor([0.4]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([1.0])
    with torch.no_grad():
        out_old = old(z, t, tokens[..., :8], mask, pooled[:, :8], seconds)
        out_new = new(z, t, tokens, mask, pooled, seconds)
    assert torch.allclose(out_new, out_old, atol=1e-6)
    assert torch.all(new.context_proj[0].weight[:, 8:] == 0) and torch.all(new.pooled_proj[0].weight[:, 8:] == 0)
    with pytest.raises(RuntimeError):  # without the widening the shapes do not fit
        load_remapped(DiT(DiTConfig(text_dim=10, pooled_dim=10, **small)), old.state_dict(), DIT_CHANNEL_PARAMS,
                      names, names)


def test_a_window_first_made_in_inference_mode_still_trains():
    """The STFT window cache is shared by the service (inference mode) and training in one process: a window the
    service asked for first must not be an inference tensor that backward cannot save."""
    from models.audio.spectral import stft

    n_fft = 96  # a size no other test uses, so this call makes the window
    with torch.inference_mode():
        stft(torch.randn(1, 960), n_fft, 24)
    x = torch.randn(1, 960, requires_grad=True)
    stft(x, n_fft, 24).abs().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
