"""Train the embedded STFT autoencoder on the synthetic corpus.

Losses: multi-resolution STFT distance on the waveform; at the decoder's own STFT resolution, log-magnitude L1,
a magnitude-weighted phase-advance loss (1 - cos of the per-hop phase-advance error, so the decoder learns each
bin's instantaneous frequency directly) and a noisiness target (how incoherent the phase advance is over five
frames); a small KL term keeps the latent a smooth, near-Gaussian space for diffusion.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.audio.spectral import multi_resolution_stft_distance
from models.codec.stft_autoencoder import MAG_FLOOR, STFTAutoencoder, STFTAutoencoderConfig
from models.training.common import EMA, RunState, lr_at, progress, seed_everything, set_threads

# the decoder's own resolution (2048, 512) checks overlap-add consistency; (512, 128) checks transients
TRAIN_RESOLUTIONS = ((2048, 512), (512, 128))


@dataclass
class AutoencoderTrainConfig:
    steps: int = 3000
    batch_size: int = 6
    crop_latents: int = 32  # 32 * 2048 samples = 1.49 s
    lr: float = 1e-3
    warmup: int = 200
    kl_weight: float = 1e-2
    mag_weight: float = 1.0
    phase_weight: float = 2.0
    noisiness_weight: float = 0.5
    ema_decay: float = 0.998
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    stats_clips: int = 256
    threads: int | None = None


def crop_batch(corpus, rng: np.random.Generator, batch: int, length: int) -> torch.Tensor:
    out = np.zeros((batch, 2, length), dtype=np.float32)
    for b in range(batch):
        clip = corpus[int(rng.integers(0, 2**31 - 1))]
        n = clip.audio.shape[-1]
        if n > length:
            start = int(rng.integers(0, n - length))
            out[b] = clip.audio[:, start:start + length]
        else:
            out[b, :, :n] = clip.audio
    return torch.from_numpy(out)


def autoencoder_losses(model: STFTAutoencoder, wave: torch.Tensor, cfg: AutoencoderTrainConfig) -> dict[str, torch.Tensor]:
    mean, logvar = model.encode_distribution(wave)
    z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
    logmag, deviation, noisiness = model.decode_params(z)
    recon = model.synthesize(logmag, deviation, noisiness)[..., : wave.shape[-1]]

    target = model.analyse(wave)  # [B, 2, K, F]
    mag_t = target.abs()
    # squared error in the log domain: its gradient grows with the error, so the rare loud bins (a tone's partials,
    # ~12 nats above the floor) are pulled up at once; an L1 here is a median regression that leaves them at the
    # floor, and a loss on linear magnitude would vanish there (its gradient scales with exp(logmag))
    log_err = logmag - torch.log(mag_t + MAG_FLOOR)
    l_mag = log_err.pow(2).mean()
    c = model.config
    k = torch.arange(c.bins, dtype=torch.float32)[:, None]
    dphi_pred = 2 * math.pi * (k + deviation) * c.hop / c.n_fft
    phase_t = torch.angle(target)
    dphi_t = phase_t[..., 1:] - phase_t[..., :-1]
    w = torch.minimum(mag_t[..., 1:], mag_t[..., :-1])
    w = w / w.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-6)
    l_phase = (w * (1 - torch.cos(dphi_pred[..., 1:] - dphi_t))).sum(dim=(-2, -1)).mean()

    # phase-advance coherence over 5 frames: 1 for a steady partial, ~0.45 for noise
    flat = lambda x: x.flatten(0, 2)[:, None]  # noqa: E731
    cos_avg = F.avg_pool1d(flat(torch.cos(dphi_t)), 5, 1, 2, count_include_pad=False)
    sin_avg = F.avg_pool1d(flat(torch.sin(dphi_t)), 5, 1, 2, count_include_pad=False)
    coherence = torch.sqrt(cos_avg ** 2 + sin_avg ** 2).view_as(dphi_t)
    noisy_t = ((1 - coherence) / 0.55).clamp(0, 1)
    l_noise = (w * (noisiness[..., 1:] - noisy_t).abs()).sum(dim=(-2, -1)).mean()

    l_stft = multi_resolution_stft_distance(recon, wave, TRAIN_RESOLUTIONS, eps=1e-3, pooled=True)
    l_kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    total = (l_stft + cfg.mag_weight * l_mag + cfg.phase_weight * l_phase + cfg.noisiness_weight * l_noise
             + cfg.kl_weight * l_kl)
    return {"loss": total, "stft": l_stft, "mag": l_mag, "phase": l_phase, "noise": l_noise, "kl": l_kl}


@torch.no_grad()
def latent_statistics(model: STFTAutoencoder, corpus, n: int, seed: int) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed + 7)
    means = []
    for _ in range(n):
        clip = corpus[int(rng.integers(0, 2**31 - 1))]
        means.append(model.encode_distribution(torch.from_numpy(clip.audio)[None])[0][0])
    allz = torch.cat(means, dim=-1)
    return allz.mean(-1).tolist(), allz.std(-1).clamp(min=1e-3).tolist()


def train_autoencoder(out_dir: str | Path, run_dir: str | Path, cfg: AutoencoderTrainConfig,
                      model_config: STFTAutoencoderConfig | None = None) -> Path:
    from models.data.corpus import SyntheticCorpus

    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    run = RunState(run_dir)
    model = STFTAutoencoder(model_config)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.8, 0.99), weight_decay=0.01)
    step = 0
    if run.exists():
        step, _ = run.load({"model": model, "ema": ema.model}, {"opt": opt})
        print(f"resumed autoencoder training at step {step} from {run.path}")
    (run.dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    corpus = SyntheticCorpus("train", seed=cfg.seed)
    rng = np.random.default_rng([cfg.seed, step])  # a resumed run continues with a fresh, reproducible stream
    length = cfg.crop_latents * model.samples_per_latent
    bar = progress(cfg.steps, step, "autoencoder")
    model.train()
    while step < cfg.steps:
        wave = crop_batch(corpus, rng, cfg.batch_size, length)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, final=cfg.lr * 0.05)
        losses = autoencoder_losses(model, wave, cfg)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema.update(model, step)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {k: round(float(v.detach()), 5) for k, v in losses.items()}
            bar.set_postfix(loss=rec["loss"], stft=rec["stft"], phase=rec["phase"])
            run.log({"step": step, **rec, "grad_norm": round(float(gnorm), 3)})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save(step, {"model": model, "ema": ema.model}, {"opt": opt})
    bar.close()
    return export_autoencoder(ema.model, corpus, out_dir, cfg)


def export_autoencoder(model: STFTAutoencoder, corpus, out_dir: str | Path, cfg: AutoencoderTrainConfig) -> Path:
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
