"""ARC post-training (Adversarial Relativistic-Contrastive; Novack et al. 2025) on the project's models.

A few-step generator is trained adversarially, without distillation targets: the generator denoises a noisy real
clip fully to x0 in one forward pass; the real clip and the generator's x0 are re-noised with the SAME noise to the
SAME level; a discriminator (a copy of the generator's transformer up to a hidden block, plus a small convolutional
head giving one logit per frame, averaged over real frames) scores both; relativistic losses
    generator:      softplus(D(real, c) - D(fake, c))
    discriminator:  softplus(-(D(real, c) - D(fake, c))) + lambda * softplus(-(D(real, c) - D(real, c_shuffled)))
    (+ gamma / 2 * (|grad_z D(real)|^2 + |grad_z D(fake)|^2) with ``gradient_penalty`` gamma > 0: R3GAN's R1 and R2)
where the contrastive term, on noisy REAL clips only, teaches the discriminator to tell a clip with its own prompt
from the same clip with another clip's prompt (``shuffled_prompts``: a derangement by index AND by text, correct
at batch size 2, that never touches the caller's conditioning), which is what pushes the generator towards prompt
adherence without guidance. Generator and discriminator updates alternate (discriminator on even steps); AdamW with
betas (0.9, 0.95); an EMA of the generator is exported as a bundle of kind "arc" with the ping-pong sampler,
8 steps and guidance 1 (no CFG, one forward per step).

ARC on a VP-cosine v-prediction model (the paper's model is rectified flow). Noise levels are chosen by SNR and
mapped through the model's own schedule, never by t: the generator's input level has half-logSNR l ~ U[-6, 2]
(for rectified flow t = sigmoid(-l), the paper's logSNR-uniform sampler), the discriminator's re-noising level
has half-logSNR ~ N(0, 1) (for rectified flow, the reference's logit-normal t_gan), each turned into t by
``schedule.t_from_logsnr(2 l)``. At equal SNR a VP latent is a rectified-flow latent divided by
sqrt(alpha_RF^2 + sigma_RF^2), so this is the paper's training distribution written on the model's schedule, and
it is the grid ``PingPongSampler`` samples on (half-logSNR linspace(-6, 2), t_0 = 1, t_N = 0), which only needs
alpha(t), sigma(t) and per-sample t and noise. The generator's "one Euler step to x0" is the parameterisation's
x0 (v-prediction: x0 = alpha z - sigma v; rectified flow: x0 = z - t v), and re-noising is
``schedule.add_noise``. A source that takes the guidance scale as an input (a distilled student) has that input
folded into a constant at the source's default scale (``fold_guidance``), so the generator starts from the guided
model and exports as a plain one-forward model.

Checkpoint sources (``models.checkpoints``): a Stable Audio DiT takes the place of the project's DiT (its first
layers, conditioning included, are the discriminator's trunk; on Stable Audio Open Small's rectified flow this is
the paper's own setting); a Tango UNet offers its encoder half (the first down blocks, their hidden state averaged
over mel bins and repeated back to the latent frame rate). The generator exports as a ``derived`` directory over
the original checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.bundle import ModelBundle
from models.dit import DiT
from models.text import TextEmbedding
from models.training.augment import latent_augment
from models.training.batches import CaptionedBatch, sample_captioned_batch
from models.training.common import (
    EMA,
    RunState,
    optimizer_step,
    seed_everything,
    set_threads,
    step_rngs,
    train_loop,
)
from models.registry import load_bundle
from models.training.derived import export_derived, source_cache, window_frames
from models.training.latent_cache import LatentCache
from models.training.validation import BestCheckpoint, Validator


@dataclass
class ARCConfig:
    train_steps: int = 2000  # updates, alternating discriminator (even) and generator (odd)
    steps: int = 8  # the exported model's default ping-pong steps
    batch_size: int = 16
    lr_g: float = 5e-5
    lr_d: float = 5e-5
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    contrastive_weight: float = 1.0
    gradient_penalty: float = 0.0  # gamma of R3GAN's R1 + R2 penalties, gamma / 2 * E|grad D|^2 on real and fake
    disc_layer: int = 0  # trunk depth of the discriminator; 0: two thirds of the generator's depth
    head_channels: int = 0  # 0: the trunk's width
    half_logsnr_min: float = -6.0
    half_logsnr_max: float = 2.0
    gan_half_logsnr_mean: float = 0.0
    gan_half_logsnr_std: float = 1.0
    fold_guidance: float = 0.0  # scale baked into a source with a guidance input; 0: the source's default
    cond_dropout: float = 0.0
    # latent augmentation as in the teacher's training (models.training.augment; harmonic codec only): the share of
    # pure tones transposed, and of hard-panned clips re-panned, at each draw
    pitch_shift: float = 0.0
    placement_shift: float = 0.0
    cache_clips: int = 3000
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 25
    threads: int | None = None
    device: str = "cpu"
    # validation at every checkpoint (models/training/validation.py): 0 clips = none; the best checkpoint by
    # ``val_select`` is kept in <run-dir>/best. "worst_ratio" weighs every axis against the source's own figures on
    # the validation set (measured once, kept in <run-dir>/reference.json): the checkpoint that lost least of what
    # the source does on its worst axis
    val_clips: int = 0
    val_duration: float = 3.0
    val_select: str = "fd_mfcc"


# ---------------------------------------------------------------------------------------------- prompt shuffling
def shuffled_prompts(prompts: list[str], rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """(perm [B] long, valid [B] bool): clip i is paired with prompt perm[i], where perm[i] != i AND
    prompts[perm[i]] != prompts[i] for every valid row. Rows are grouped by caption text and the groups laid out in
    a random order; moving every row by a shift at least as long as the longest group maps each row outside its
    own group. That works whenever no caption fills more than half the batch; otherwise the surplus rows of the
    largest group get no wrong prompt and are marked invalid (all rows when every caption is the same)."""
    n = len(prompts)
    groups: dict[str, list[int]] = {}
    for i in rng.permutation(n):
        groups.setdefault(prompts[int(i)], []).append(int(i))
    valid = torch.ones(n, dtype=torch.bool)
    biggest = max(groups.values(), key=len)
    surplus = 2 * len(biggest) - n
    if surplus > 0:
        valid[biggest[:surplus]] = False
        del biggest[:surplus]
    order = [i for g in groups.values() for i in g]
    perm = torch.arange(n)
    if order:
        m, longest = len(order), max(len(g) for g in groups.values())
        shift = int(rng.integers(longest, m - longest + 1))
        for k, i in enumerate(order):
            perm[i] = order[(k + shift) % m]
    return perm, valid


# ---------------------------------------------------------------------------------------------- networks
def fold_guidance(dit: DiT, scale: float) -> DiT:
    """A denoiser without a guidance input that computes what ``dit`` computes at guidance ``scale``: the guidance
    embedding of a fixed scale is a constant added to the conditioning vector, moved into the bias of the pooled-text
    projection's last layer (which is added to the same vector)."""
    if not dit.config.guidance_embed:
        return copy.deepcopy(dit)
    src = copy.deepcopy(dit).eval()
    p = next(src.parameters())
    with torch.no_grad():
        t = torch.zeros(1, device=p.device)
        pooled = torch.zeros(1, src.config.pooled_dim, device=p.device)
        with_g = src.condition(t, pooled, t, torch.full((1,), float(scale), device=p.device))
        mlp, src.guidance_mlp = src.guidance_mlp, None
        without = src.condition(t, pooled, t, None)
        src.guidance_mlp = mlp
    folded = DiT(dataclasses.replace(src.config, guidance_embed=False)).to(p.device)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("guidance_mlp.")}
    key = f"pooled_proj.{len(src.pooled_proj) - 1}.bias"
    state[key] = state[key] + (with_g - without)[0]
    folded.load_state_dict(state)
    return folded


def check_trunk(denoiser: nn.Module) -> None:
    """ARC's discriminator is the generator's own trunk: the denoiser must offer ``depth``, ``width``,
    ``trunk(depth)`` and ``features(...)`` (the project's DiT and the Stable Audio DiT do with their first transformer
    blocks, Tango's UNet with its first encoder stages)."""
    if not all(hasattr(denoiser, a) for a in ("depth", "width", "trunk", "features")):
        raise ValueError(f"ARC post-training needs a denoiser whose first blocks can serve as the discriminator "
                         f"(the project's DiT, Stable Audio's DiT, a UNet); {type(denoiser).__name__} is not one")


class Discriminator(nn.Module):
    """A copy of the generator's trunk up to block ``layer`` (for a transformer: input projection, conditioning, text
    projection and the first blocks; weights shared at initialisation, trained afterwards) and a small convolutional
    head giving one logit per latent frame; the clip's score is the mean over its real frames. Padded frames are
    zeroed before and inside the head, so a clip's score does not depend on its batch companions."""

    def __init__(self, dit: nn.Module, layer: int = 0, head_channels: int = 0):
        super().__init__()
        check_trunk(dit)
        depth = dit.depth
        self.layer = layer or max(1, round(2 * depth / 3))
        if not 1 <= self.layer <= depth:
            raise ValueError(f"discriminator layer {self.layer} outside 1..{depth}")
        self.trunk = dit.trunk(self.layer)
        width = self.trunk.width
        hidden = head_channels or width
        self.norm = nn.LayerNorm(width)
        self.conv1 = nn.Conv1d(width, hidden, 3, padding=1)
        self.conv2 = nn.Conv1d(hidden, 1, 3, padding=1)

    def frame_logits(self, z: Tensor, t: Tensor, text: TextEmbedding, seconds: Tensor, frame_mask: Tensor,
                     guidance: Tensor | None = None) -> Tensor:
        """[B, T] logits (zero on padded frames)."""
        keep = frame_mask[:, :, None].to(z.dtype)
        x, _ = self.trunk.features(z, t, text.tokens, text.mask, text.pooled, seconds, frame_mask, guidance)
        h = (self.norm(x) * keep).transpose(1, 2)
        h = F.silu(self.conv1(h)) * frame_mask[:, None].to(z.dtype)
        return self.conv2(h)[:, 0] * frame_mask.to(z.dtype)

    def forward(self, z: Tensor, t: Tensor, text: TextEmbedding, seconds: Tensor, frame_mask: Tensor) -> Tensor:
        """[B] one logit per clip: the mean of its frames' logits over real frames."""
        m = frame_mask.to(z.dtype)
        return (self.frame_logits(z, t, text, seconds, frame_mask) * m).sum(1) / m.sum(1).clamp(min=1)


def gradient_penalty(score: Tensor, z: Tensor) -> Tensor:
    """E_b |d score_b / d z_b|^2 (R1 on real inputs, R2 on generated ones; R3GAN, Huang et al. 2024): the
    regulariser that keeps the relativistic game from diverging. Differentiable (create_graph) so that it trains D."""
    (grad,) = torch.autograd.grad(score.sum(), z, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


# ---------------------------------------------------------------------------------------------- training
@dataclass
class ARCDraw:
    """The random part of one ARC example."""

    t: Tensor  # [B] generator input time
    eps: Tensor  # [B, C, T] generator input noise
    t_gan: Tensor  # [B] re-noising time, shared by real and fake
    eps_gan: Tensor  # [B, C, T] re-noising noise, shared by real and fake
    perm: Tensor  # [B] prompt index paired with each clip in the contrastive term
    valid: Tensor  # [B] rows that have a wrong prompt


class ARCTrainer:
    def __init__(self, source: ModelBundle, cfg: ARCConfig):
        self.cfg = cfg
        self.schedule, self.param = source.schedule, source.pipeline.parameterization
        dit = source.denoiser
        check_trunk(dit)
        if isinstance(dit, DiT) and dit.config.guidance_embed:
            dit = fold_guidance(dit, cfg.fold_guidance or source.config.default_guidance)
        self.gen = copy.deepcopy(dit).to(cfg.device).train()
        self.disc = Discriminator(self.gen, cfg.disc_layer, cfg.head_channels).to(cfg.device).train()
        self.ema = EMA(self.gen, cfg.ema_decay)
        betas = (0.9, 0.95)
        self.opt_g = torch.optim.AdamW(self.gen.parameters(), lr=cfg.lr_g, betas=betas, weight_decay=cfg.weight_decay)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr_d, betas=betas,
                                       weight_decay=cfg.weight_decay)

    def modules(self) -> dict[str, nn.Module]:
        return {"gen": self.gen, "ema": self.ema.model, "disc": self.disc}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"gen": self.opt_g, "disc": self.opt_d}

    def _t_of_half_logsnr(self, half: np.ndarray) -> Tensor:
        return self.schedule.t_from_logsnr(2 * torch.from_numpy(half)).clamp(0, 1).float().to(self.cfg.device)

    def draw(self, batch: CaptionedBatch, rng: np.random.Generator, gen: torch.Generator) -> ARCDraw:
        b, c = len(batch), self.cfg
        t = self._t_of_half_logsnr(rng.uniform(c.half_logsnr_min, c.half_logsnr_max, b))
        t_gan = self._t_of_half_logsnr(rng.normal(c.gan_half_logsnr_mean, c.gan_half_logsnr_std, b))
        keep = batch.mask[:, None].to(batch.x0.dtype)
        eps = torch.randn(batch.x0.shape, generator=gen).to(c.device) * keep
        eps_gan = torch.randn(batch.x0.shape, generator=gen).to(c.device) * keep
        perm, valid = shuffled_prompts(batch.prompts, rng)
        return ARCDraw(t, eps, t_gan, eps_gan, perm.to(c.device), valid.to(c.device))

    def fake_x0(self, batch: CaptionedBatch, d: ARCDraw) -> Tensor:
        """The generator's one-pass x0 from the noisy real clip."""
        z = self.schedule.add_noise(batch.x0, d.eps, d.t)
        text = batch.text
        out = self.gen(z, d.t, text.tokens, text.mask, text.pooled, batch.seconds, batch.mask)
        return self.param.to_x0(out, z, d.t) * batch.mask[:, None].to(z.dtype)

    def renoise(self, x0: Tensor, d: ARCDraw) -> Tensor:
        """x0 re-noised with the draw's shared (eps_gan, t_gan): what the discriminator sees."""
        return self.schedule.add_noise(x0, d.eps_gan, d.t_gan)

    def score(self, x0: Tensor, batch: CaptionedBatch, d: ARCDraw, text: TextEmbedding | None = None,
              z: Tensor | None = None) -> Tensor:
        """D of x0 re-noised (or of ``z``, the re-noised input already made)."""
        z = self.renoise(x0, d) if z is None else z
        return self.disc(z, d.t_gan, batch.text if text is None else text, batch.seconds, batch.mask)

    def generator_loss(self, batch: CaptionedBatch, d: ARCDraw) -> tuple[Tensor, dict]:
        fake = self.fake_x0(batch, d)
        real_score, fake_score = self.score(batch.x0, batch, d), self.score(fake, batch, d)
        loss = F.softplus(real_score - fake_score).mean()
        return loss, {"g_loss": loss.item(), "d_real": real_score.mean().item(), "d_fake": fake_score.mean().item()}

    def discriminator_loss(self, batch: CaptionedBatch, d: ARCDraw) -> tuple[Tensor, dict]:
        with torch.no_grad():
            fake = self.fake_x0(batch, d)
        penalise = self.cfg.gradient_penalty > 0
        z_real = self.renoise(batch.x0, d).requires_grad_(penalise)
        z_fake = self.renoise(fake, d).requires_grad_(penalise)
        # the penalty differentiates through the attention's backward, which only the math kernel implements
        with sdpa_kernel([SDPBackend.MATH]) if penalise else nullcontext():
            real_score, fake_score = self.score(batch.x0, batch, d, z=z_real), self.score(fake, batch, d, z=z_fake)
        adversarial = F.softplus(-(real_score - fake_score)).mean()
        loss, metrics = adversarial, {}
        if penalise:
            r1, r2 = gradient_penalty(real_score, z_real), gradient_penalty(fake_score, z_fake)
            loss = loss + self.cfg.gradient_penalty / 2 * (r1 + r2)
            metrics.update({"r1": r1.item(), "r2": r2.item()})
        if self.cfg.contrastive_weight and bool(d.valid.any()):
            wrong = self.score(batch.x0, batch, d, text=batch.text.select(d.perm), z=z_real.detach())
            contrastive = F.softplus(-(real_score - wrong))[d.valid].mean()
            loss = loss + self.cfg.contrastive_weight * contrastive
            metrics["contrastive"] = contrastive.item()
        metrics.update({"d_loss": loss.item(), "d_adv": adversarial.item(), "d_real": real_score.mean().item(),
                        "d_fake": fake_score.mean().item()})
        return loss, metrics

    def train_step(self, batch: CaptionedBatch, d: ARCDraw, step: int) -> dict:
        """Even steps update the discriminator, odd steps the generator (then its EMA)."""
        if step % 2 == 0:
            loss, metrics = self.discriminator_loss(batch, d)
            metrics["d_grad_norm"] = optimizer_step(self.disc, self.opt_d, loss, clip=1.0)
        else:
            self.disc.requires_grad_(False)
            try:
                loss, metrics = self.generator_loss(batch, d)
                metrics["g_grad_norm"] = optimizer_step(self.gen, self.opt_g, loss, clip=1.0)
            finally:
                self.disc.requires_grad_(True)
            self.ema.update(self.gen, (step + 1) // 2)
        return metrics


def train_arc(source: ModelBundle, cache: LatentCache, out_dir: str | Path, run_dir: str | Path, cfg: ARCConfig,
              stop_at: int | None = None) -> Path:
    """ARC post-training of ``source`` (a loaded teacher or student); exports the generator's EMA to ``out_dir``
    at every checkpoint. Resumable from ``run_dir``; ``stop_at`` ends this invocation early."""
    from models.data.corpus import SyntheticCorpus

    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    trainer = ARCTrainer(source, cfg)
    run = RunState(run_dir)
    step = 0
    if run.exists():
        step, _ = run.load(trainer.modules(), trainer.optimizers())
        print(f"resumed ARC post-training at step {step}")
    (run.dir / "arc_config.json").write_text(json.dumps({**asdict(cfg), "source": source.name}, indent=2))
    corpus = SyntheticCorpus("train", seed=cfg.seed)
    augment = latent_augment(source.codec, corpus, cfg.pitch_shift, cfg.placement_shift)

    def train_step(step: int) -> dict:
        rng, gen = step_rngs(cfg.seed, 2, step)
        batch = sample_captioned_batch(cache, corpus, source.text_encoder, rng, cfg.batch_size, cfg.cond_dropout,
                                       null_text=source.unconditional_text,
                                       max_frames=window_frames(source), augment=augment)
        batch = batch.to(cfg.device)
        return trainer.train_step(batch, trainer.draw(batch, rng, gen), step)

    def export(dest: Path, step: int) -> Path:
        return export_derived(
            source, trainer.ema.model, dest, kind="arc", sampler="pingpong", default_steps=cfg.steps,
            default_guidance=1.0, guidance_in_model=False,
            description=(f"ARC post-trained from {source.name}: ping-pong sampling, {cfg.steps} steps by default "
                         "(1 to 8 work), no classifier-free guidance (one forward per step)"),
            training={**asdict(cfg), "source": source.name, "steps_done": step})

    validator = Validator(cfg.val_clips, cfg.val_duration, seed=cfg.seed) if cfg.val_clips else None
    best = BestCheckpoint(run.dir, cfg.val_select) if validator else None
    reference = None
    if validator is not None and cfg.val_select == "worst_ratio":
        reference = source_reference(validator, source, run.dir)

    def checkpoint(step: int) -> None:
        run.save(step, trainer.modules(), trainer.optimizers())
        export(Path(out_dir), step)
        if validator is not None:
            result = validator.evaluate(load_bundle(out_dir, text_encoder=source.text_encoder), step,
                                        reference=reference)
            kept = best.offer(result, lambda dest: export(dest, step))
            print(f"validation at {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.figures.items()
                                                           if v is not None) + (" (best so far)" if kept else ""))

    train_loop(run, "arc", step, cfg.train_steps, train_step, checkpoint, cfg.log_every, cfg.checkpoint_every,
               stop_at=stop_at, postfix=("d_loss", "g_loss"))
    return Path(out_dir)


def source_reference(validator: Validator, source: ModelBundle, run_dir: Path) -> dict:
    """The source's validation figures at its own default steps and guidance (what ``worst_ratio`` compares
    against), measured once per run and read back on resume."""
    path = Path(run_dir) / "reference.json"
    if path.exists():
        return json.loads(path.read_text())["figures"]
    figures = validator.evaluate(source, 0).figures
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": source.name, "figures": figures}, indent=2))
    print("validation reference (the source): " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()
                                                            if v is not None))
    return figures


def run_arc(source: str | Path, out_dir: str | Path, run_dir: str | Path, cfg: ARCConfig,
            cache_dir: str | Path | None = None, stop_at: int | None = None) -> Path:
    """The CLI's entry: load the source (a directory or a zoo name), encode the training clips with its codec
    (or reuse ``cache_dir``), post-train."""
    set_threads(cfg.threads)
    bundle = load_bundle(source, device=cfg.device)
    cache = source_cache(bundle, cache_dir or Path(run_dir) / "latents", cfg.cache_clips, cfg.seed)
    return train_arc(bundle, cache, out_dir, run_dir, cfg, stop_at=stop_at)
