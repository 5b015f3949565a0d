"""Train the embedded DiT teacher: v-prediction on the VP-cosine schedule, classifier-free guidance through
condition dropout (the empty prompt), random durations (batches padded with frame masks)."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.bundle import ModelBundle
from models.config import BundleConfig, drop_retired_keys
from models.codec import load_codec
from models.data.corpus import PITCH_RANGE_HZ
from models.diffusion import VPCosineSchedule, VPrediction
from models.dit import DiT, DiTConfig
from models.text import NumberChannels, load_text_encoder
from models.training.augment import latent_augment
from models.training.batches import latent_channel_weight, masked_mse, sample_captioned_batch
from models.training.common import (
    EMA,
    RunState,
    lr_at,
    optimizer_step,
    seed_everything,
    set_lr,
    set_threads,
    step_rngs,
    train_loop,
)
from models.training.latent_cache import LatentCache, build_latent_cache
from models.training.warm_start import warm_start_dit

__all__ = ["TeacherTrainConfig", "export_teacher", "latent_channel_weight", "load_codec", "masked_mse", "train_teacher"]

# TeacherTrainConfig keys of options that were measured and removed (a value head on the stated values, filler-word
# caption augmentation, a phrasing-consistency loss term): a training config that still has one loads without it
RETIRED_TEACHER_KEYS = ("value_head", "value_head_lr_scale", "filler_words", "filler_max_words",
                        "phrasing_consistency")


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
    number_freqs: int = 16  # the text encoder's number channels (models.text.encoders.number_features)
    number_linear: bool = False  # and its two linear ones (a number is here, log of its value)
    # the encoder reads every stated number as one placeholder, the value only in the number channels
    # (models.text.encoders.number_spans)
    number_masked: bool = False
    # beat-phase features of the stated tempi (models.dit.RhythmConditioner); needs number_linear
    rhythm: bool = False
    # the log of every stated value added to the frames (models.dit.ValueConditioner); needs number_linear
    number_values: bool = False
    # and the values reach the denoiser through the value and rhythm conditioners alone, hidden from cross-attention
    # and the pooled condition (models.dit.DiTConfig.values_only); needs number_values
    values_only: bool = False
    init_from: str = ""  # warm start from this teacher directory (its codec may have another latent layout)
    # v-MSE weight of the codec's analytic channels (tonality, pitch, balance) against 1 for the learned ones: a 1 %
    # pitch step is 0.015 of the pitch channel's standard deviation, so its errors count for more than their share.
    analytic_weight: float = 1.0
    # latent augmentation (models.training.augment): the share of pure tones transposed to another stated pitch,
    # and of the clips panned hard left or right re-panned to another stated placement, at each draw
    pitch_shift: float = 0.0
    placement_shift: float = 0.0
    # where transposition takes a tone: within this many octaves of its pitch, inside [low, high] Hz (wider than the
    # corpus' own range flattens the training prior over the range captions state: models.training.augment)
    pitch_shift_octaves: float = 1.0
    pitch_shift_low_hz: float = PITCH_RANGE_HZ[0]
    pitch_shift_high_hz: float = PITCH_RANGE_HZ[1]
    # the exported model's default classifier-free guidance (the embedded teacher's 2 was chosen on the training
    # split)
    guidance: float = 3.0
    # where the denoiser trains ("cpu", "cuda", "cuda:1"); the latent cache, the text encoder and the batches' making
    # stay on the CPU, and the checkpoints and exported model are the same files whatever the device
    device: str = "cpu"

    def __post_init__(self) -> None:
        # which conditioners the denoiser gets is all that matters here, not its sizes
        denoiser = self.dit_config(latent_dim=1, latent_rate=1.0, text_dim=1, pooled_dim=1)
        denoiser.check_numbers(self.numbers(), "teacher config: ")

    @classmethod
    def from_config(cls, config: dict) -> TeacherTrainConfig:
        """The settings of a saved training config (the ``training`` block of an exported teacher's config.json, or
        a run's train_config.json): its ``steps_done`` record is left out and retired keys are dropped with a
        warning."""
        config = drop_retired_keys(config, RETIRED_TEACHER_KEYS, "teacher training config")
        return cls(**{k: v for k, v in config.items() if k != "steps_done"})

    def numbers(self) -> NumberChannels:
        return NumberChannels(self.number_freqs, self.number_linear, self.number_masked)

    def dit_config(self, latent_dim: int, latent_rate: float, text_dim: int, pooled_dim: int) -> DiTConfig:
        """The denoiser these settings train, for a codec of ``latent_dim`` channels at ``latent_rate`` frames/s and
        a text encoder of ``text_dim`` token / ``pooled_dim`` pooled channels."""
        return DiTConfig(latent_dim=latent_dim, width=self.width, depth=self.depth, heads=self.heads,
                         text_dim=text_dim, pooled_dim=pooled_dim,
                         rhythm_frame_rate=latent_rate if self.rhythm else 0.0, number_values=self.number_values,
                         number_width=self.numbers().width, values_only=self.values_only)

    def text_encoder_config(self) -> dict:
        return {"name": "minilm", **self.numbers().to_config()}


def train_teacher(out_dir: str | Path, run_dir: str | Path, codec_dir: str | Path, cfg: TeacherTrainConfig,
                  stop_at: int | None = None) -> Path:
    from models.data.corpus import SyntheticCorpus

    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    run = RunState(run_dir)
    codec = load_codec(codec_dir)
    text_encoder = load_text_encoder(cfg.text_encoder_config(), cache_size=2048)  # a config error before the cache
    cache_dir = build_latent_cache(codec, run.dir / "latents", cfg.cache_clips, seed=cfg.seed)
    cache = LatentCache.load(cache_dir)
    model = DiT(cfg.dit_config(codec.latent_dim, codec.latent_rate, text_encoder.dim, text_encoder.pooled_dim))
    if cfg.init_from:
        added = warm_start_dit(model, cfg.init_from, codec.config.channel_names())
        print(f"warm start from {cfg.init_from}; new latent channels: {', '.join(added) or 'none'}")
    device = torch.device(cfg.device)
    model.to(device)
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
    weight = latent_channel_weight(codec, cfg.analytic_weight)
    augment = latent_augment(codec, corpus, cfg.pitch_shift, cfg.placement_shift, cfg.pitch_shift_octaves,
                             (cfg.pitch_shift_low_hz, cfg.pitch_shift_high_hz))
    model.train()

    def train_step(step: int) -> dict:
        rng, gen = step_rngs(cfg.seed, 1, step)
        b = sample_captioned_batch(cache, corpus, text_encoder, rng, cfg.batch_size, cfg.cond_dropout,
                                  augment=augment).to(device)
        t = torch.from_numpy(rng.random(cfg.batch_size)).float().to(device)
        eps = torch.randn(b.x0.shape, generator=gen).to(device)  # drawn on the CPU: one run's draws on any device
        z = schedule.add_noise(b.x0, eps, t)
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, final=cfg.lr * 0.05)
        set_lr(opt, lr)
        out = model(z, t, b.text.tokens, b.text.mask, b.text.pooled, b.seconds, b.mask)
        loss = masked_mse(out, param.target(b.x0, eps, t), b.mask, weight).mean()
        gnorm = optimizer_step(model, opt, loss, clip=1.0)
        ema.update(model, step + 1)
        return {"loss": loss.item(), "grad_norm": gnorm, "lr": lr}

    def checkpoint(step: int) -> None:
        run.save(step, {"model": model, "ema": ema.model}, {"opt": opt})
        export_teacher(ema.model, codec, text_encoder, out_dir, codec_dir, cfg, step)

    train_loop(run, "teacher", step, cfg.steps, train_step, checkpoint, cfg.log_every, cfg.checkpoint_every,
               stop_at=stop_at)
    return Path(out_dir)


def export_teacher(model: DiT, codec, text_encoder, out_dir, codec_dir, cfg: TeacherTrainConfig, step: int) -> None:
    out = Path(out_dir)
    config = BundleConfig(
        name=out.name, kind="teacher", schedule=VPCosineSchedule().to_config(), parameterization="v",
        sampler="ddim", default_steps=200, default_guidance=cfg.guidance, default_duration=5.0, max_duration=10.0,
        text_encoder=cfg.text_encoder_config(), codec_from=_relpath(codec_dir, out),
        description=("DiT teacher (v-prediction, VP-cosine, 200-step DDIM with classifier-free guidance "
                     f"{cfg.guidance:g})"),
        training={**asdict(cfg), "steps_done": step},
    )
    # the bundle moves its modules to the CPU: hand it a copy, so a model training on another device stays there
    ModelBundle(config, copy.deepcopy(model), codec, text_encoder).save(out, save_codec=False)


def _relpath(target, start) -> str:
    import os

    return os.path.relpath(Path(target).resolve(), Path(start).resolve())
