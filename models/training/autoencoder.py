"""Train the embedded harmonic-plus-noise autoencoder on the synthetic corpus.

Losses: multi-resolution STFT distance on the waveform; at the decoder's own STFT resolution a squared log-magnitude
error (its gradient grows with the error, so a tone's partials, ~12 nats above the floor, are pulled up at once)
and a squared error of log energies in the codec's mel-spaced bands; a tonality-weighted error of the decoded pitch
track against the analysed one; a small KL term on the learned latent channels keeps them a smooth, near-Gaussian
space for diffusion.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from models.audio.spectral import multi_resolution_stft_distance
from models.codec.harmonic import (
    MAG_FLOOR,
    HarmonicAutoencoder,
    HarmonicAutoencoderConfig,
)
from models.training.common import (
    EMA,
    RunState,
    lr_at,
    progress,
    seed_everything,
    set_threads,
)
from models.training.warm_start import warm_start_codec

# the decoder's own resolution (2048, 512) checks overlap-add consistency; (512, 128) checks transients
TRAIN_RESOLUTIONS = ((2048, 512), (512, 128))


@dataclass
class AutoencoderTrainConfig:
    steps: int = 1500
    batch_size: int = 8
    crop_latents: int = 24  # 24 * 2048 samples = 1.11 s
    lr: float = 5e-4
    warmup: int = 50
    kl_weight: float = 1e-4
    mag_weight: float = 1.0
    band_weight: float = 0.5
    pitch_weight: float = 10.0
    ema_decay: float = 0.995
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    stats_clips: int = 256
    threads: int | None = None
    init_from: str = ""         # warm start from this codec directory (an older latent layout is fine)
    train_encoder: bool = True  # False keeps the encoder, so the learned latents of init_from stay valid


class ClipPool:
    """Rendering a corpus clip costs ~0.15 s on a 2-core CPU, more than a training step's compute, and a step needs
    only a 1 s crop of each: keep ``size`` rendered clips, crop batches from them and replace ``refresh`` clips with
    fresh ones every step, so the stream still sees a new clip every few crops."""

    def __init__(self, corpus, rng: np.random.Generator, size: int = 192, refresh: int = 2):
        self.corpus, self.rng, self.refresh = corpus, rng, refresh
        self.clips = [self._render() for _ in range(size)]

    def _render(self) -> np.ndarray:
        return self.corpus[int(self.rng.integers(0, 2**31 - 1))].audio

    def batch(self, batch: int, length: int) -> torch.Tensor:
        for _ in range(self.refresh):
            self.clips[int(self.rng.integers(0, len(self.clips)))] = self._render()
        out = np.zeros((batch, 2, length), dtype=np.float32)
        for b in range(batch):
            audio = self.clips[int(self.rng.integers(0, len(self.clips)))]
            n = audio.shape[-1]
            if n > length:
                start = int(self.rng.integers(0, n - length))
                out[b] = audio[:, start:start + length]
            else:
                out[b, :, :n] = audio
        return torch.from_numpy(out)


def autoencoder_losses(model: HarmonicAutoencoder, wave: torch.Tensor, cfg: AutoencoderTrainConfig) -> dict[str, torch.Tensor]:
    target = model.analyse(wave)  # [B, C, K, F]
    target_mag = target.abs()
    tau, freq = model.analyser(target, target_mag)
    mean, logvar = model.encode_distribution(wave, target, (tau, freq))
    learned = slice(model.config.analytic_channels, None)
    z = mean.clone()
    z[:, learned] = mean[:, learned] + torch.randn_like(mean[:, learned]) * torch.exp(0.5 * logvar[:, learned])
    p = model.decode_params(z)
    spec = model.render(**p)
    recon = model.synthesize(spec)[..., : wave.shape[-1]]

    mag = spec.abs()
    log_err = torch.log(mag + MAG_FLOOR) - torch.log(target_mag + MAG_FLOOR)
    l_mag = log_err.pow(2).mean()
    # band energies on the codec's mel-spaced bands: every band counts alike (a linear-frequency mean leaves the
    # few low bins that carry brown noise or a rumble nearly unweighted), and the energy of many bins is not the
    # mean of their log (which sits ~0.6 nats below the log-energy for noise)
    weights = model.bands / model.bands.sum(0, keepdim=True)  # [K, bands]
    band = lambda m: torch.log(torch.einsum("bckf,kx->bcxf", m.pow(2), weights) + MAG_FLOOR ** 2)
    l_band = (band(mag) - band(target_mag)).pow(2).mean()
    l_pitch = (tau * (p["logf"] - torch.log(freq)).pow(2)).sum() / tau.sum().clamp(min=1.0)
    l_stft = multi_resolution_stft_distance(recon, wave, TRAIN_RESOLUTIONS, eps=1e-3, pooled=True)
    m, lv = mean[:, learned], logvar[:, learned]
    l_kl = 0.5 * (m.pow(2) + lv.exp() - 1 - lv).mean()
    total = (l_stft + cfg.mag_weight * l_mag + cfg.band_weight * l_band + cfg.pitch_weight * l_pitch
             + cfg.kl_weight * l_kl)
    return {"loss": total, "stft": l_stft, "mag": l_mag, "band": l_band, "pitch": l_pitch, "kl": l_kl}


@torch.no_grad()
def latent_statistics(model: HarmonicAutoencoder, corpus, n: int, seed: int) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed + 7)
    means = []
    for _ in range(n):
        clip = corpus[int(rng.integers(0, 2**31 - 1))]
        means.append(model.encode_distribution(torch.from_numpy(clip.audio)[None])[0][0])
    allz = torch.cat(means, dim=-1)
    return allz.mean(-1).tolist(), allz.std(-1).clamp(min=1e-3).tolist()


def train_autoencoder(out_dir: str | Path, run_dir: str | Path, cfg: AutoencoderTrainConfig,
                      model_config: HarmonicAutoencoderConfig | None = None) -> Path:
    from models.data.corpus import SyntheticCorpus

    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    run = RunState(run_dir)
    model = HarmonicAutoencoder(model_config)
    if cfg.init_from:
        added = warm_start_codec(model, cfg.init_from)
        print(f"warm start from {cfg.init_from}; new latent channels: {', '.join(added) or 'none'}")
    if not cfg.train_encoder:
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith("enc_"))
    ema = EMA(model, cfg.ema_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.8, 0.99), weight_decay=0.01)
    step = 0
    if run.exists():
        step, _ = run.load({"model": model, "ema": ema.model}, {"opt": opt})
        print(f"resumed autoencoder training at step {step} from {run.path}")
    (run.dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    corpus = SyntheticCorpus("train", seed=cfg.seed)
    rng = np.random.default_rng([cfg.seed, step])  # a resumed run continues with a fresh, reproducible stream
    pool = ClipPool(corpus, rng)
    length = cfg.crop_latents * model.samples_per_latent
    bar = progress(cfg.steps, step, "autoencoder")
    model.train()
    while step < cfg.steps:
        wave = pool.batch(cfg.batch_size, length)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, final=cfg.lr * 0.05)
        losses = autoencoder_losses(model, wave, cfg)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema.update(model, step)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {k: round(float(v.detach()), 5) for k, v in losses.items()}
            bar.set_postfix(loss=rec["loss"], stft=rec["stft"], mag=rec["mag"])
            run.log({"step": step, **rec, "grad_norm": round(float(gnorm), 3)})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save(step, {"model": model, "ema": ema.model}, {"opt": opt})
    bar.close()
    return export_autoencoder(ema.model, corpus, out_dir, cfg)


def export_autoencoder(model: HarmonicAutoencoder, corpus, out_dir: str | Path, cfg: AutoencoderTrainConfig) -> Path:
    """Measure latent statistics, then write codec.safetensors + config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    shift, scale = latent_statistics(model, corpus, cfg.stats_clips, cfg.seed)
    model.config.latent_shift, model.config.latent_scale = shift, scale
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "codec.safetensors")
    (out / "config.json").write_text(json.dumps({"codec": asdict(model.config), "training": asdict(cfg)}, indent=2))
    print(f"wrote {out / 'codec.safetensors'}")
    return out
