"""The embedded autoencoder: a harmonic-plus-noise (sinusoidal modelling) codec in the STFT domain.

Why this shape: a decoder that must place a tone's spectral peak at the right one of 1025 bins from a compact code
learns slowly (a first, per-bin design decoded unseen tones to silence after 1500 CPU steps), and a pitch hidden in a
distributed code is hard for a small diffusion model to hit to within a few percent. Here pitch is an explicit,
smooth coordinate of the latent, and the decoder renders partials analytically, so a tone keeps its exact pitch.

Latent (32 channels at 44100 / 2048 = 21.5 frames per second, like Stable Audio's Oobleck VAE):
- ``2 * slots`` analytic channels per latent frame, averaged over its 4 STFT frames: for each pitch slot its tonality
  ``tau`` in [0, 1] and ``tau * pitch_scale * log(f / pitch_ref_hz)``. Slot 1 is the strongest spectral peak of the
  frame (refined to a fraction of a bin by its phase advance), slot 2 the strongest peak that is not a harmonic of
  slot 1. A frame without a prominent peak has tau = 0 and so contributes nothing.
- the remaining channels are learned (a VAE posterior from a ConvNeXt encoder over log magnitudes and phase
  advances): loudness of each slot per audio channel, harmonic shape, the noise envelope, stereo placement.

Decoder (what runs at serving time; cheap on a CPU): ConvNeXt blocks at the latent rate -> 4x upsampling to STFT
frames -> ConvNeXt blocks -> per STFT frame: a pitch correction, per-channel log amplitude, 16 harmonic log
amplitudes and a tail (slope, odd-only weight, up to ``max_harmonics`` partials) per slot, and a noise envelope in
``noise_bands`` bands per channel. Each partial is drawn straight into the STFT as the Hann window's main lobe at its
fractional bin with the phase a real sinusoid would have (phase accumulated from the frequency track); the noise
envelope gets random phases from a fixed seeded table (deterministic, independent of batch companions). An inverse
STFT gives the waveform.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.audio.spectral import istft, pad_to_multiple, stft
from models.codec.base import AudioCodec
from models.layers import ConvNeXtBlock1d

LOG_EPS = 1e-5
MAG_FLOOR = 1e-3  # the log-magnitude loss compares log(|X| + MAG_FLOOR): about -114 dB re full scale
BALANCE_LIMIT = 4.0  # |balance| is clipped at e^4: the quieter channel 35 dB down
LOBE = 2  # partials are drawn on the bins within +-LOBE (+ rounding) of their centre: Hann's main lobe


@dataclass
class HarmonicAutoencoderConfig:
    sample_rate: int = 44100
    audio_channels: int = 2
    latent_dim: int = 33
    n_fft: int = 2048
    hop: int = 512
    frames_per_latent: int = 4
    hidden: int = 256
    encoder_blocks: int = 3
    decoder_latent_blocks: int = 2
    decoder_frame_blocks: int = 2
    layer_scale: float = 1.0
    slots: int = 2
    balance: bool = True      # one analytic stereo-balance channel (needs 2 audio channels)
    harmonics: int = 16       # partials with their own amplitude; the rest follow a power-law tail
    max_harmonics: int = 64
    noise_bands: int = 48
    pitch_min_hz: float = 60.0
    pitch_max_hz: float = 8600.0
    pitch_ref_hz: float = 400.0
    pitch_scale: float = 10.0  # latent units per natural-log unit of frequency: 1 % of pitch = 0.1 units
    phase_seed: int = 20261121
    # latent normalisation measured on the corpus after training: z = (raw - shift) / scale
    latent_shift: list[float] = field(default_factory=list)
    latent_scale: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, config: dict) -> HarmonicAutoencoderConfig:
        """A saved config; one written before the balance channel existed has none."""
        return cls(**{"balance": False, **config})

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def samples_per_latent(self) -> int:
        return self.hop * self.frames_per_latent

    @property
    def pitch_channels(self) -> int:
        return 2 * self.slots

    @property
    def analytic_channels(self) -> int:
        return self.pitch_channels + int(self.balance)

    def channel_names(self) -> list[str]:
        """What each latent channel holds: warm starts map weights between codec versions by these names."""
        names = [f"{kind}{s}" for s in range(self.slots) for kind in ("tonality", "pitch")]
        names += ["balance"] * int(self.balance)
        return names + [f"learned{i}" for i in range(self.latent_dim - self.analytic_channels)]

    @property
    def slot_outputs(self) -> int:  # pitch correction, per-channel log amplitude, harmonic shape, tail slope, odd
        return 1 + self.audio_channels + self.harmonics + 2


def analysis_features(mag: Tensor) -> Tensor:
    """[B, C, K, F] magnitudes -> [B, C * K, F] scaled log magnitudes: what the learned channels are encoded from
    (pitch is analysed exactly, so the phase advances need not be learned from)."""
    return (torch.log(mag + LOG_EPS) / 5.0).flatten(1, 2)


def balance_feature(mag: Tensor, frames_per_latent: int, floor: float) -> Tensor:
    """[B, 2, K, F] magnitudes -> stereo balance per latent frame [B, 1, T]: half the log ratio of right to left
    energy (so e^balance is the amplitude ratio), 0 for silence (``floor`` is the energy of a -80 dBFS tone)."""
    energy = F.avg_pool1d(mag.square().sum(2), frames_per_latent)  # [B, 2, T]
    ratio = (energy[:, 1:2] + floor) / (energy[:, 0:1] + floor)
    return (0.5 * torch.log(ratio)).clamp(-BALANCE_LIMIT, BALANCE_LIMIT)


def balance_gains(balance: Tensor) -> Tensor:
    """Balance [B, F] -> constant-power log gains [B, 2, F] (left, right): both 0 at balance 0, their ratio e^balance,
    g_L^2 + g_R^2 = 2 always."""
    left = 0.5 * math.log(2.0) - 0.5 * F.softplus(2 * balance)
    return torch.stack([left, left + balance], dim=1)


def _sinc(x: Tensor) -> Tensor:
    """sin(pi x) / (pi x) with a gradient that stays finite at 0 (torch.sinc has no ONNX export)."""
    small = x.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 - (math.pi * x) ** 2 / 6, torch.sin(math.pi * safe) / (math.pi * safe))


def signed_hann_lobes(frac: Tensor) -> Tensor:
    """The periodic Hann window's spectrum (divided by n_fft: 0.5 at the centre, zero at +-2 bins) at the offsets
    o = -2 .. 2 (``LOBE`` = 2) from a partial's nearest bin, times (-1) ** o, stacked on a new axis before the last:
    [..., 5, F] for frac [..., F], frac = position - round(position) in [-0.5, 0.5]. The window spectrum is
    sin(pi d) / (2 pi d (1 - d^2)) and sin(pi (o - frac)) = -(-1)^o sin(pi frac), so one sinc of frac serves all five
    bins, with the removable zeros of d (1 - d^2) cancelled by hand. The sign (-1)^o is the phase pi k that a real
    sinusoid's centred STFT has at bin k, taken out of the oscillator phase."""
    f, s = frac, _sinc(frac)
    return torch.stack([-f * s / (2 * (1 + f) * (2 + f) * (3 + f)),
                        -s / (2 * (1 + f) * (2 + f)),
                        s / (2 * (1 - f * f)),
                        -s / (2 * (1 - f) * (2 - f)),
                        f * s / (2 * (1 - f) * (2 - f) * (3 - f))], dim=-2)


def band_matrix(bins: int, bands: int, sample_rate: int) -> Tensor:
    """[bins, bands]: each bin's log level as a linear interpolation between mel-spaced band centres."""
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    centres_mel = torch.linspace(0.0, mel(sample_rate / 2), bands, dtype=torch.float64)
    centres_hz = 700.0 * (10 ** (centres_mel / 2595.0) - 1.0)
    hz = torch.linspace(0.0, sample_rate / 2, bins, dtype=torch.float64)
    pos = torch.searchsorted(centres_hz, hz, right=True).clamp(1, bands - 1)
    lo, hi = centres_hz[pos - 1], centres_hz[pos]
    w_hi = ((hz - lo) / (hi - lo)).clamp(0, 1)
    m = torch.zeros(bins, bands, dtype=torch.float64)
    m[torch.arange(bins), pos - 1] = 1 - w_hi
    m[torch.arange(bins), pos] += w_hi
    return m.float()


class PitchAnalyser:
    """Deterministic pitch slots of a complex STFT: per frame, the strongest peak in the pitch range refined by its
    phase advance, then the strongest peak that is not within 5 bins of a harmonic of the first. Tonality rises from
    0 to 1 as the peak stands 18 to 28 dB above the mean log level of the 41 bins around it, gated to 0 below
    -80 dBFS (and, for the second slot, more than 50 dB below the first)."""

    def __init__(self, config: HarmonicAutoencoderConfig):
        c = self.config = config
        self.k_lo = max(1, math.floor(c.pitch_min_hz * c.n_fft / c.sample_rate))
        self.k_hi = min(c.bins - 1 - LOBE, math.ceil(c.pitch_max_hz * c.n_fft / c.sample_rate))

    @torch.no_grad()
    def __call__(self, spec: Tensor, mag: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """[B, C, K, F] complex (and its magnitude, if at hand) -> (tonality [B, S, F], frequency in Hz [B, S, F])."""
        # the phase of the channels' sum: a panned source keeps its phase in both channels
        return self.from_phase(torch.angle(spec.sum(1)), spec.abs() if mag is None else mag)

    @torch.no_grad()
    def from_phase(self, phase: Tensor, mag: Tensor) -> tuple[Tensor, Tensor]:
        """The same from real tensors: the phase of the channels' summed spectrum [B, K, F] and the magnitudes
        [B, C, K, F] (what the exported encoder graph computes, ONNX having no complex tensors)."""
        c = self.config
        mag = mag.mean(1)
        logmag = torch.log(mag + 1e-7)
        local = F.avg_pool1d(logmag.transpose(1, 2).flatten(0, 1)[:, None], 41, 1, 20, count_include_pad=False)
        local = local.view(mag.shape[0], mag.shape[2], -1).transpose(1, 2)
        advance = phase[..., 1:] - phase[..., :-1]  # torch.diff, which ONNX export lacks
        advance = torch.cat([advance[..., :1], advance], dim=-1)  # frame 0 borrows frame 1's advance
        k_all = torch.arange(c.bins, dtype=torch.float32, device=mag.device)
        dev_all = torch.remainder(advance - 2 * math.pi * k_all[:, None] * c.hop / c.n_fft + math.pi, 2 * math.pi)
        dev_all = (dev_all - math.pi) * c.n_fft / (2 * math.pi * c.hop)  # bins, in (-n_fft/(2 hop), n_fft/(2 hop)]
        search = mag.clone()
        search[:, : self.k_lo] = 0
        search[:, self.k_hi + 1:] = 0
        taus, freqs = [], []
        first_db: Tensor | None = None
        for _ in range(c.slots):
            k = search.argmax(dim=1, keepdim=True)  # [B, 1, F]
            peak = mag.gather(1, k)
            prominence_db = 20 / math.log(10) * (torch.log(peak + 1e-7) - local.gather(1, k))
            level_db = 20 * torch.log10(peak / (c.n_fft / 4) + 1e-12)
            tau = ((prominence_db - 18) / 10).clamp(0, 1) * ((level_db + 80) / 10).clamp(0, 1)
            tau = tau * (search.gather(1, k) > 0)
            if first_db is None:
                first_db = level_db
            else:  # a second slot must stand within 40 dB of the first (beyond that: window side lobes)
                tau = tau * ((level_db - first_db + 50) / 10).clamp(0, 1)
            p = k.float() + dev_all.gather(1, k).clamp(-1, 1)
            taus.append(tau[:, 0])
            freqs.append((p[:, 0] * c.sample_rate / c.n_fft).clamp(min=c.pitch_min_hz))
            # suppress the harmonics of this slot for the next one
            p_safe = p.clamp(min=1.0)
            nearest = (k_all[None, :, None] / p_safe).round().clamp(min=1.0) * p_safe
            search = search.masked_fill((k_all[None, :, None] - nearest).abs() <= 5.0, 0.0)
        return torch.stack(taus, 1), torch.stack(freqs, 1)


class HarmonicAutoencoder(AudioCodec):
    def __init__(self, config: HarmonicAutoencoderConfig | None = None):
        super().__init__()
        c = self.config = config or HarmonicAutoencoderConfig()
        self.sample_rate, self.audio_channels, self.latent_dim = c.sample_rate, c.audio_channels, c.latent_dim
        self.samples_per_latent = c.samples_per_latent
        self.learned_dim = c.latent_dim - c.analytic_channels
        if c.balance and c.audio_channels != 2:
            raise ValueError("the balance channel needs stereo audio (audio_channels = 2)")
        h = c.hidden
        self.analyser = PitchAnalyser(c)

        def blocks(n: int, kernel_size: int = 7) -> nn.Sequential:
            return nn.Sequential(*[ConvNeXtBlock1d(h, kernel_size, layer_scale=c.layer_scale) for _ in range(n)])

        # encoder (learned channels)
        self.enc_in = nn.Conv1d(c.audio_channels * c.bins + c.pitch_channels, h, 1)
        self.enc_frame = blocks(c.encoder_blocks)
        self.enc_down = nn.Conv1d(h, h, c.frames_per_latent, stride=c.frames_per_latent)
        self.enc_latent = blocks(c.encoder_blocks, kernel_size=5)
        self.enc_out = nn.Conv1d(h, 2 * self.learned_dim, 1)
        with torch.no_grad():  # a narrow posterior from the start: the decoder should see the code, not noise
            self.enc_out.bias[self.learned_dim:] = -7.0
        # decoder
        self.dec_in = nn.Conv1d(c.latent_dim, h, 3, padding=1)
        self.dec_latent = blocks(c.decoder_latent_blocks, kernel_size=5)
        self.dec_up = nn.ConvTranspose1d(h, h, c.frames_per_latent, stride=c.frames_per_latent)
        self.dec_frame = blocks(c.decoder_frame_blocks)
        self.dec_norm = nn.LayerNorm(h)
        n_out = c.slots * c.slot_outputs + c.audio_channels * c.noise_bands
        self.dec_out = nn.Linear(h, n_out)
        with torch.no_grad():  # start quiet, with no pitch correction and a 1/h tail
            self.dec_out.weight.mul_(0.1)
            self.dec_out.bias.zero_()
            slots = self.dec_out.bias[: c.slots * c.slot_outputs].view(c.slots, c.slot_outputs)
            slots[:, 1: 1 + c.audio_channels] = math.log(1e-3)
            slots[:, 1 + c.audio_channels: 1 + c.audio_channels + c.harmonics] = -torch.log(
                torch.arange(1, c.harmonics + 1, dtype=torch.float32))
            self.dec_out.bias[c.slots * c.slot_outputs:] = math.log(1e-2)
        self.register_buffer("bands", band_matrix(c.bins, c.noise_bands, c.sample_rate), persistent=False)
        shift = torch.tensor(c.latent_shift or [0.0] * c.latent_dim)
        scale = torch.tensor(c.latent_scale or [1.0] * c.latent_dim)
        self.register_buffer("latent_shift", shift.view(1, -1, 1), persistent=False)
        self.register_buffer("latent_scale", scale.view(1, -1, 1), persistent=False)
        self._phasors: tuple[Tensor, Tensor] | None = None

    # ---------------------------------------------------------------- encoder
    def analyse(self, wave: Tensor) -> Tensor:
        """Complex STFT frames aligned with latents: [B, C, K, T * frames_per_latent]."""
        return analysis_spectrum(wave, self.config.n_fft, self.config.hop, self.config.samples_per_latent)

    def pitch_features(self, tau: Tensor, freq: Tensor) -> Tensor:
        """Per-frame analytic channels [B, 2S, F]: (tau_s, tau_s * pitch_scale * log(f_s / ref)) per slot."""
        c = self.config
        logf = c.pitch_scale * torch.log(freq / c.pitch_ref_hz)
        return torch.stack([tau, tau * logf], dim=2).flatten(1, 2)

    def encode_distribution(self, wave: Tensor, spec: Tensor | None = None,
                            pitch: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Unnormalised posterior (mean, logvar) [B, latent_dim, T]; the analytic channels have logvar -inf.
        ``spec`` and ``pitch`` (the analyser's output) may be passed in when the caller has them already."""
        spec = self.analyse(wave) if spec is None else spec
        mag = spec.abs()
        return self.posterior(mag, self.analyser(spec, mag) if pitch is None else pitch)

    def posterior(self, mag: Tensor, pitch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``encode_distribution`` from the STFT magnitudes [B, C, K, F] and the analyser's (tonality, frequency)."""
        c = self.config
        pitch = self.pitch_features(*pitch)
        h = self.enc_in(torch.cat([analysis_features(mag), pitch], dim=1))
        h = self.enc_latent(self.enc_down(self.enc_frame(h)))
        mean, logvar = self.enc_out(h).chunk(2, dim=1)
        analytic = F.avg_pool1d(pitch, c.frames_per_latent)
        if c.balance:
            floor = 1e-8 * (c.n_fft / 4) ** 2
            analytic = torch.cat([analytic, balance_feature(mag, c.frames_per_latent, floor)], dim=1)
        mean = torch.cat([analytic, mean], dim=1)
        logvar = torch.cat([torch.full_like(analytic, -float("inf")), logvar.clamp(-12, 4)], dim=1)
        return mean, logvar

    def normalize(self, raw: Tensor) -> Tensor:
        return (raw - self.latent_shift) / self.latent_scale

    def denormalize(self, latents: Tensor) -> Tensor:
        return latents * self.latent_scale + self.latent_shift

    @torch.no_grad()
    def encode(self, wave: Tensor) -> Tensor:
        return self.normalize(self.encode_distribution(wave)[0])

    @torch.no_grad()
    def encode_native(self, native: Tensor) -> Tensor:
        """``encode`` after its STFT, from ``native_from_wave``'s [B, C, K, F, 2] with real-valued operations only:
        what the ONNX encoder graph holds (the pitch analyser, the learned posterior, the analytic channels). ONNX
        has no complex tensors, and a runtime computes the STFT before the graph (manifest codec "native_head")."""
        real, imag = native[..., 0], native[..., 1]
        mag = torch.sqrt(real * real + imag * imag)
        pitch = self.analyser.from_phase(torch.atan2(imag.sum(1), real.sum(1)), mag)
        return self.normalize(self.posterior(mag, pitch)[0])

    @property
    def native_head(self) -> dict:
        return {"stft": {"n_fft": self.config.n_fft, "hop": self.config.hop}}

    def shift_pitch(self, latents: Tensor, ratio: float | Tensor) -> Tensor:
        """Normalised latents [B, D, T] of the same sound transposed by ``ratio`` (a scalar or one per clip, [B]):
        every pitch slot's frequency is multiplied by it, and nothing else changes. A slot channel holds
        ``tau * pitch_scale * log(f / ref)``, so the shift adds ``tau * pitch_scale * log(ratio)`` to it; the
        decoder's learned pitch correction and harmonic shapes are relative to the slot pitch and go along."""
        c = self.config
        ratio = torch.as_tensor(ratio, dtype=latents.dtype, device=latents.device).reshape(-1, 1, 1)
        raw = self.denormalize(latents)
        tau, logf = raw[:, 0: c.pitch_channels: 2], raw[:, 1: c.pitch_channels: 2]
        raw = raw.clone()
        raw[:, 1: c.pitch_channels: 2] = logf + tau * c.pitch_scale * torch.log(ratio)
        return self.normalize(raw)

    def latent_pitch(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised latents [B, D, T] -> (tonality, frequency in Hz) of each pitch slot per latent frame, [B, S, T]
        each: what the analytic channels state, before the decoder's learned pitch correction."""
        c = self.config
        raw = self.denormalize(latents)
        tau, scaled = raw[:, 0: c.pitch_channels: 2], raw[:, 1: c.pitch_channels: 2]
        return tau, torch.exp(self.stated_log_pitch(tau, scaled))

    def stated_log_pitch(self, tau: Tensor, scaled: Tensor) -> Tensor:
        """ln f (f in Hz) that a slot's unnormalised (tonality, tonality * scaled log pitch) states; the tonality is
        floored at 0.05 so that an unpitched slot gives a finite value."""
        c = self.config
        return scaled / (c.pitch_scale * tau.clamp(min=0.05)) + math.log(c.pitch_ref_hz)

    # ---------------------------------------------------------------- decoder
    def decode_params(self, raw: Tensor) -> dict[str, Tensor]:
        """Unnormalised latents [B, D, T] -> per STFT frame: log frequency per slot [B, S, F], log amplitudes of
        each slot per audio channel [B, S, C, F] and of each partial [B, S, H_max, F] (a partial's amplitude is the
        product of the two), and the noise level per bin [B, C, K, F] (log magnitude)."""
        c = self.config
        S, C, H = c.slots, c.audio_channels, c.harmonics
        h = self.dec_latent(self.dec_in(raw))
        h = self.dec_frame(self.dec_up(h))
        out = self.dec_out(self.dec_norm(h.transpose(1, 2))).transpose(1, 2)  # [B, n_out, F]
        B, F_ = out.shape[0], out.shape[-1]
        slot = out[:, : S * c.slot_outputs].view(B, S, c.slot_outputs, F_)
        noise = out[:, S * c.slot_outputs:].view(B, C, c.noise_bands, F_)

        analytic = F.interpolate(raw[:, : c.analytic_channels], scale_factor=c.frames_per_latent, mode="linear",
                                 align_corners=False)
        pitch = analytic[:, : c.pitch_channels].reshape(B, S, 2, F_)
        logf = self.stated_log_pitch(pitch[:, :, 0], pitch[:, :, 1]) + 0.1 * slot[:, :, 0]

        level = slot[:, :, 1: 1 + C]                           # [B, S, C, F]
        shape = slot[:, :, 1 + C: 1 + C + H]                   # [B, S, H, F]
        slope = F.softplus(slot[:, :, 1 + C + H] + 1.0)        # [B, S, F]
        odd = torch.sigmoid(slot[:, :, 2 + C + H])
        n = torch.arange(1, c.max_harmonics + 1, dtype=raw.dtype, device=raw.device)
        tail_n = n[H:]
        tail = shape[:, :, H - 1: H] - slope[:, :, None] * torch.log(tail_n / H)[None, None, :, None]
        even = (tail_n % 2 == 0).to(raw.dtype)[None, None, :, None]
        tail = tail + even * torch.log1p(-odd[:, :, None] * 0.999)
        partials = torch.cat([shape, tail], dim=2)              # [B, S, H_max, F]
        # a slot without a prominent peak has no partials: tonality gates them by construction, so a noise or a
        # click never grows a spurious hum at whatever pitch its slot holds
        gate = torch.log(((pitch[:, :, 0] - 0.1) / 0.9).clamp(min=1e-8, max=1.0))  # [B, S, F]
        noise_log = self.bands @ noise  # [K, bands] @ [B, C, bands, F] -> [B, C, K, F]
        if c.balance:  # stereo placement is analytic too: a constant-power pan of everything the frame holds
            gains = balance_gains(analytic[:, c.pitch_channels])  # [B, 2, F]
            level = level + gains[:, None]
            noise_log = noise_log + gains[:, :, None, :]
        # a partial's log amplitude is level[s, c] + partial[s, h]: the channel part is the same for every partial
        # of a slot, so ``render`` draws each slot's partials once and scales them per channel
        return {"logf": logf, "channel_log_amp": level, "partial_log_amp": partials + gate[:, :, None],
                "noise_log": noise_log}

    def noise_phasors(self, frames: int, device) -> tuple[Tensor, Tensor]:
        """cos and sin of a fixed uniform(-pi, pi) phase table [C, K, frames] from a seed: independent of batch and
        call order; computed once (an exported graph holds them as constants)."""
        c = self.config
        if self._phasors is None or self._phasors[0].shape[-1] < frames:
            n = max(frames, 4096)
            g = torch.Generator().manual_seed(c.phase_seed)
            phase = math.pi * (torch.rand(c.audio_channels, c.bins, n, generator=g) * 2 - 1)
            self._phasors = (torch.cos(phase), torch.sin(phase))
        return tuple(x[..., :frames].to(device) for x in self._phasors)

    def render(self, logf: Tensor, channel_log_amp: Tensor, partial_log_amp: Tensor, noise_log: Tensor) -> Tensor:
        """Draw the partials and the noise into a complex STFT [B, C, K, F] (arguments as ``decode_params``)."""
        return torch.complex(*self.render_parts(logf, channel_log_amp, partial_log_amp, noise_log))

    def render_parts(self, logf: Tensor, channel_log_amp: Tensor, partial_log_amp: Tensor,
                     noise_log: Tensor) -> tuple[Tensor, Tensor]:
        """``render`` as (real, imaginary) parts, with real-valued operations only (ONNX has no complex tensors;
        ``decode_native`` and the ONNX export use this). Each slot's partials are scattered into a spectrum of their
        own, once for all audio channels (laid out [B, S, H, lobe bin, F], so that the scatter's source is a view),
        then the slot spectra are summed with each channel's gains on top of the noise."""
        c = self.config
        B, S, Hm, F_ = partial_log_amp.shape
        f = torch.exp(logf)                                                    # [B, S, F] Hz
        # phase of the fundamental at each frame centre: trapezoidal integral of the frequency track, summed in
        # float64 and wrapped to [0, 2 pi) before it is multiplied by the harmonic number (n theta mod 2 pi only
        # needs theta mod 2 pi); a float32 running sum reaches 1e5 rad in 10 s and would smear the upper partials.
        # The integrand is capped at Nyquist: a frame whose fundamental lies above it draws nothing, but gated-off
        # slots of generated (or random) latents can hold 1e12 Hz, where one float32 rounding of f (ONNX Runtime vs
        # PyTorch, or a 1e-7 nudge of the latents) moves every later phase by radians. Below the cap: bit for bit
        # the same; above it, later frames keep their shapes and change only by a constant phase per partial
        f_phase = f.clamp(max=c.sample_rate / 2)
        step = math.pi * c.hop / c.sample_rate * (f_phase[..., 1:] + f_phase[..., :-1])
        theta = torch.remainder(torch.cumsum(step.double(), dim=-1), 2 * math.pi).to(f.dtype)
        theta = torch.cat([torch.zeros_like(f[..., :1]), theta], dim=-1)
        n = torch.arange(1, Hm + 1, dtype=f.dtype, device=f.device)[:, None]
        # fractional bin [B, S, Hm, F]; a fundamental above the sample rate only draws partials that are invalid
        pos = (n * f.clamp(max=c.sample_rate)[:, :, None]) * (c.n_fft / c.sample_rate)
        nearest = torch.round(pos)
        offsets = torch.arange(-LOBE, LOBE + 1, device=f.device, dtype=f.dtype)[:, None]
        bins = nearest[:, :, :, None] + offsets                                # [B, S, Hm, 2L+1, F]
        valid = (pos < c.bins - 1 - LOBE)[:, :, :, None] & (bins >= 0)
        # amplitude A -> |X| = A n_fft / 4 at the centre; the signed lobes carry (-1)^offset of the bin phase
        lobe = signed_hann_lobes(pos - nearest) * valid * (c.n_fft / 2)
        # a real sinusoid's STFT bin k (centred frames) has phase theta_h + pi k; pi k = pi nearest + pi offset, and
        # pi nearest is taken mod 2 pi exactly (nearest mod 2) so the angle stays small
        angle = torch.remainder(n * theta[:, :, None], 2 * math.pi) + math.pi * torch.remainder(nearest, 2)
        amp = torch.exp(partial_log_amp)                                       # [B, S, Hm, F]
        real = ((amp * torch.cos(angle))[:, :, :, None] * lobe).reshape(B, S, -1, F_)
        imag = ((amp * torch.sin(angle))[:, :, :, None] * lobe).reshape(B, S, -1, F_)
        index = bins.clamp(0, c.bins - 1).long().reshape(B, S, -1, F_)
        # in place where autograd allows (training backpropagates through this): each [B, C, K, F] temporary is
        # megabytes of fresh memory per call
        slot_re = real.new_zeros(B, S, c.bins, F_).scatter_add_(2, index, real)  # [B, S, K, F]
        slot_im = imag.new_zeros(B, S, c.bins, F_).scatter_add_(2, index, imag)
        gain = torch.exp(channel_log_amp)[:, :, :, None]                       # [B, S, C, 1, F]
        cos, sin = self.noise_phasors(F_, logf.device)
        noise_mag = torch.exp(noise_log)
        spec_re, spec_im = noise_mag * cos, noise_mag * sin  # not exp's output in place: its backward reads it
        for s in range(S):
            spec_re = spec_re.addcmul_(gain[:, s], slot_re[:, s, None])
            spec_im = spec_im.addcmul_(gain[:, s], slot_im[:, s, None])
        return spec_re, spec_im

    def synthesize(self, spec: Tensor) -> Tensor:
        return spectrum_to_wave(spec, self.config.n_fft, self.config.hop)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return wave_from_native(self.decode_native(latents), self.config.n_fft, self.config.hop)

    def decode_native(self, latents: Tensor) -> Tensor:
        """``decode`` up to the inverse STFT: the spectrum as [B, C, K, F, 2] (real, imaginary), computed with
        real-valued operations only. This is what the ONNX decoder graph holds: ONNX has no complex tensors, and
        ONNX Runtime's DFT took 25 times as long as torch.fft for this inverse transform, so a runtime finishes with
        ``wave_from_native`` (manifest codec "istft", ``native_tail``)."""
        return torch.stack(self.render_parts(**self.decode_params(self.denormalize(latents))), dim=-1)

    @property
    def native_tail(self) -> dict:
        return {"istft": {"n_fft": self.config.n_fft, "hop": self.config.hop}}

    def to_config(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_config(cls, config: dict) -> HarmonicAutoencoder:
        return cls(HarmonicAutoencoderConfig.from_dict(config))


def spectrum_to_wave(spec: Tensor, n_fft: int, hop: int) -> Tensor:
    """The codec's complex STFT [..., K, F] -> waveform [..., F * hop]: centred frames, the last one's right half
    completed by an empty frame."""
    spec = F.pad(spec, (0, 1))
    return istft(spec, n_fft, hop, length=spec.shape[-1] * hop - hop)


def analysis_spectrum(wave: Tensor, n_fft: int, hop: int, samples_per_latent: int) -> Tensor:
    """Waveform [..., N] -> the encoder's complex STFT frames [..., K, T * samples_per_latent / hop], T the latent
    frames of N samples (the clip zero-padded to a whole latent frame)."""
    wave = pad_to_multiple(wave, samples_per_latent)
    return stft(wave, n_fft, hop)[..., : wave.shape[-1] // hop]


def native_from_wave(wave: Tensor, n_fft: int, hop: int, samples_per_latent: int) -> Tensor:
    """Waveform [B, C, N] -> ``analysis_spectrum`` as [B, C, K, F, 2] (real, imaginary): the start of ``encode``,
    and what a runtime computes before the exported encoder graph (``HarmonicAutoencoder.encode_native``)."""
    return torch.view_as_real(analysis_spectrum(wave, n_fft, hop, samples_per_latent))


def wave_from_native(native: Tensor, n_fft: int, hop: int) -> Tensor:
    """``HarmonicAutoencoder.decode_native``'s [B, C, K, F, 2] -> the decoded waveform [B, C, F * hop] in [-1, 1]:
    the end of ``decode``, and what a runtime applies to the exported decoder graph's output."""
    return spectrum_to_wave(torch.view_as_complex(native.contiguous()), n_fft, hop).clamp(-1, 1)
