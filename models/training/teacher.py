"""Train the embedded DiT teacher: v-prediction on the VP-cosine schedule, classifier-free guidance through
condition dropout (the empty prompt), random durations (batches padded with frame masks)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.bundle import BundleConfig, ModelBundle
from models.codec import STFTAutoencoder
from models.diffusion import VPCosineSchedule, VPrediction
from models.dit import DiT, DiTConfig
from models.text import load_text_encoder
from models.training.common import EMA, RunState, lr_at, progress, seed_everything, set_threads
from models.training.latent_cache import LatentCache, build_latent_cache, sample_batch


@dataclass
class TeacherTrainConfig:
    steps: int = 4000
    batch_size: int = 16
    lr: float = 5e-4
    warmup: int = 300
    weight_decay: float = 0.01
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    cache_clips: int = 3000
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 25
    threads: int | None = None
    width: int = 192
    depth: int = 6
    heads: int = 4


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over real frames only: [B]."""
    m = mask[:, None, :].to(pred.dtype)
    return ((pred - target) ** 2 * m).sum(dim=(1, 2)) / (m.sum(dim=(1, 2)) * pred.shape[1])


def load_codec(codec_dir: str | Path) -> STFTAutoencoder:
    from safetensors.torch import load_file

    codec_dir = Path(codec_dir)
    codec = STFTAutoencoder.from_config(json.loads((codec_dir / "config.json").read_text())["codec"])
    codec.load_state_dict(load_file(codec_dir / "codec.safetensors"))
    return codec.eval()


def train_teacher(out_dir: str | Path, run_dir: str | Path, codec_dir: str | Path, cfg: TeacherTrainConfig) -> Path:
    from models.data.corpus import SyntheticCorpus

    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    run = RunState(run_dir)
    codec = load_codec(codec_dir)
    cache_dir = build_latent_cache(codec, run.dir / "latents", cfg.cache_clips, seed=cfg.seed)
    cache = LatentCache.load(cache_dir)
    text_encoder = load_text_encoder({"name": "minilm"}, cache_size=2048)
    dit_config = DiTConfig(latent_dim=codec.latent_dim, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                           text_dim=text_encoder.dim, pooled_dim=text_encoder.pooled_dim)
    model = DiT(dit_config)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step = 0
    if run.exists():
        step, _ = run.load({"model": model, "ema": ema.model}, {"opt": opt})
        print(f"resumed teacher training at step {step}")
    (run.dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    schedule = VPCosineSchedule()
    param = VPrediction(schedule)
    corpus = SyntheticCorpus("train", seed=cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1, step])
    bar = progress(cfg.steps, step, "teacher")
    model.train()
    while step < cfg.steps:
        x0, mask, idx = sample_batch(cache, rng, cfg.batch_size)
        prompts = [corpus.caption(cache.params[i], rng) for i in idx]
        prompts = ["" if rng.random() < cfg.cond_dropout else p for p in prompts]
        text = text_encoder.encode(prompts)
        seconds = torch.tensor([cache.durations[i] for i in idx], dtype=torch.float32)
        t = torch.from_numpy(rng.random(cfg.batch_size)).float()
        eps = torch.randn_like(x0)
        z = schedule.add_noise(x0, eps, t)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, final=cfg.lr * 0.05)
        out = model(z, t, text.tokens, text.mask, text.pooled, seconds, mask)
        loss = masked_mse(out, param.target(x0, eps, t), mask).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema.update(model, step)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            bar.set_postfix(loss=round(float(loss), 4))
            run.log({"step": step, "loss": round(float(loss), 5), "grad_norm": round(float(gnorm), 3),
                     "lr": opt.param_groups[0]["lr"]})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            run.save(step, {"model": model, "ema": ema.model}, {"opt": opt})
            export_teacher(ema.model, codec, text_encoder, out_dir, codec_dir, cfg, step)
    bar.close()
    return Path(out_dir)


def export_teacher(model: DiT, codec, text_encoder, out_dir, codec_dir, cfg: TeacherTrainConfig, step: int) -> None:
    out = Path(out_dir)
    config = BundleConfig(
        name=out.name, kind="teacher", schedule=VPCosineSchedule().to_config(), parameterization="v",
        sampler="ddim", default_steps=200, default_guidance=3.0, default_duration=5.0, max_duration=10.0,
        codec_from=_relpath(codec_dir, out),
        description="DiT teacher (v-prediction, VP-cosine, 200-step DDIM with classifier-free guidance 3)",
        training={**asdict(cfg), "steps_done": step},
    )
    bundle = ModelBundle(config, model, codec, text_encoder)
    bundle.save(out, save_codec=False)


def _relpath(target, start) -> str:
    import os

    return os.path.relpath(Path(target).resolve(), Path(start).resolve())
