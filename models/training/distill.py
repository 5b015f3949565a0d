"""Progressive distillation (Salimans & Ho 2022) as Algorithm 1 of the BSA paper, with classifier-free guidance
folded into the student.

One halving, student with N steps: the student starts from the teacher's (EMA) weights; a training clip x0 and its
caption, i ~ U{1..N}, t = i/N, z_t = alpha_t x0 + sigma_t eps; the guided teacher takes two DDIM steps
t -> t - 0.5/N -> t - 1/N; the target x~0 is the x0 from which ONE DDIM step of the student from z_t lands on the
teacher's z_t'' (``DDIMSampler.x0_for_step``; at t'' = 0 it is the teacher's own x0 prediction); the loss is
w(SNR_t) * ||x~0 - x_theta(z_t)||^2 over real frames with w picked by name (``models.diffusion.weighting``; the BSA
paper's point is w = min(SNR + 1, 5)); ``analytic_weight`` > 1 weighs the codec's analytic latent channels (pitch,
tonality, stereo balance) more within that squared norm, as the teacher's own training does. Adam, learning rate
annealed linearly to 0 within each halving, gradient clipping at 1, an EMA of the student; the EMA student is
exported (``<name>-<N>``, DDIM, ``default_steps = N``) and becomes the next halving's teacher: 200 -> 100 -> 50 -> 25
in three halvings.

Guidance (stage one of Meng et al.'s guided distillation, folded into the first halving). The teacher is a
classifier-free-guidance model: each of its guided steps runs a conditional and an unconditional row. The student
takes the guidance scale w as an input instead (``DiTConfig.guidance_embed``: a Fourier embedding of w added to the
time embedding, as ConsistencyTTA does on Tango) and learns the GUIDED teacher's two-step result with w drawn per
sample from U[guidance_min, guidance_max] (default [1, 2 x the teacher's default], so the default 3 sits inside the
range and w = 1 still gives the plain conditional model). Meng et al. first train a one-step-per-step guided
student and only then halve; here the first halving already has the guided teacher as its target, so the separate
stage would only add a training run with no new information: the first halving learns guidance and the halved step
together, and later halvings keep drawing w from the same range, the teacher being the previous student with w as
its input. The embedding's output layer is zero-initialised, so the student starts exactly as the teacher's
conditional model. What this buys: a student step is one forward row whatever the guidance (half the teacher's
cost per step on top of halving the steps), and the service keeps guidance as a per-request knob. What it costs:
the first halving's loss starts higher (it learns two things), and scales outside the trained range extrapolate.

Checkpoint teachers (Stable Audio, Tango; ``models.checkpoints``). Their networks have no guidance input, so the
student keeps classifier-free guidance as it is sampled: it learns the teacher's conditional two-step result
(guidance 1) and, on a ``cond_dropout`` share of rows (default 0.1 when the teacher samples with guidance), its
unconditional one (the teacher's own null condition: for Stable Audio the zeroed cross-attention input, not the
empty prompt), and is served with the teacher's guidance scale, two rows per guided step. This is progressive
distillation of each branch (Salimans & Ho's setting) rather than of the guided model; the students export as
``derived`` directories over the original checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from models.bundle import ModelBundle
from models.checkpoints import is_checkpoint_dir
from models.diffusion.samplers import DDIMSampler
from models.diffusion.weighting import WEIGHTINGS, loss_weight
from models.dit import DiT
from models.training.augment import latent_augment
from models.training.batches import CaptionedBatch, latent_channel_weight, masked_mse, sample_captioned_batch
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
from models.registry import is_model_dir, load_bundle
from models.training.derived import export_derived, source_cache, window_frames
from models.training.latent_cache import LatentCache


@dataclass
class DistillConfig:
    weighting: str = "bsa"
    iterations: int = 3
    steps_per_halving: int = 2000
    batch_size: int = 16
    lr: float = 1e-4
    gamma: float = 5.0
    ema_decay: float = 0.999
    guidance_min: float = 1.0
    guidance_max: float = 0.0  # 0: twice the teacher's default guidance
    cond_dropout: float | None = None  # None: 0 for a guidance-input student, 0.1 for one that keeps CFG
    # x0-MSE weight of the codec's analytic channels (tonality, pitch, balance; ``latent_channel_weight``) against 1
    # for the learned ones, as in the teacher's training: with the plain mean a 1 % pitch drift is almost free.
    analytic_weight: float = 1.0
    # latent augmentation as in the teacher's training (models.training.augment; harmonic codec only): the share of
    # pure tones transposed, and of hard-panned clips re-panned, at each draw
    pitch_shift: float = 0.0
    placement_shift: float = 0.0
    start_steps: int = 0  # the teacher's step count N_0; 0: its default_steps
    cache_clips: int = 3000
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 25
    threads: int | None = None
    device: str = "cpu"


def halvings(teacher_steps: int, iterations: int) -> list[int]:
    """The students' step counts: 200, 3 -> [100, 50, 25]."""
    steps, n = [], int(teacher_steps)
    for _ in range(iterations):
        if n < 2:
            raise ValueError(f"cannot halve {teacher_steps} steps {iterations} times")
        n //= 2
        steps.append(n)
    return steps


def takes_guidance(denoiser: nn.Module) -> bool:
    """Whether a student of ``denoiser`` gets the guidance scale as an input (the project's DiT can have one added;
    checkpoint networks cannot)."""
    return isinstance(denoiser, DiT)


def make_student(denoiser: nn.Module) -> nn.Module:
    return with_guidance_embedding(denoiser) if takes_guidance(denoiser) else copy.deepcopy(denoiser)


def with_guidance_embedding(dit: DiT) -> DiT:
    """A copy of ``dit`` that takes the guidance scale as an input. A denoiser without one gets a new embedding
    whose output projection is zero, so the copy computes exactly what ``dit`` computes, for every scale."""
    if dit.config.guidance_embed:
        return copy.deepcopy(dit)
    device = next(dit.parameters()).device
    student = DiT(dataclasses.replace(dit.config, guidance_embed=True)).to(device)
    missing, unexpected = student.load_state_dict(dit.state_dict(), strict=False)
    if unexpected or not all(k.startswith("guidance_mlp.") for k in missing):
        raise RuntimeError(f"unexpected state-dict mismatch: missing {missing}, unexpected {unexpected}")
    return student


def step_times(i: Tensor, n_steps: int, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """t = i/N, t' = t - 0.5/N, t'' = t - 1/N, computed from the integers so that t'' = 0 exactly when i = 1."""
    i = i.to(torch.float64)
    return (i / n_steps).to(dtype), ((2 * i - 1) / (2 * n_steps)).to(dtype), ((i - 1) / n_steps).to(dtype)


@torch.no_grad()
def two_step_target(teacher_x0, sampler: DDIMSampler, z: Tensor, i: Tensor, n_steps: int) -> tuple[Tensor, Tensor]:
    """The distillation target for a student with ``n_steps`` steps at t = i/N: the teacher (``teacher_x0(z, t)``
    -> its x0 prediction, guidance included) takes DDIM steps t -> t' -> t''; returns (x~0, z_t'')."""
    t, t_mid, t_end = step_times(i, n_steps, z.dtype)
    z_mid = sampler.step(z, teacher_x0(z, t), t, t_mid)
    z_end = sampler.step(z_mid, teacher_x0(z_mid, t_mid), t_mid, t_end)
    return sampler.x0_for_step(z, z_end, t, t_end), z_end


@dataclass
class Draw:
    """The random part of one distillation example: step index i in 1..N, noise, guidance scale."""

    i: Tensor  # [B] int
    eps: Tensor  # [B, C, T]
    guidance: Tensor  # [B]


class Distiller:
    """One halving: a teacher bundle, the student (a DiT with a guidance input, or a checkpoint network trained per
    guidance branch), its EMA and optimizer."""

    def __init__(self, teacher: ModelBundle, student: nn.Module, n_steps: int, cfg: DistillConfig,
                 guidance_range: tuple[float, float]):
        if cfg.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {cfg.weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
        self.teacher, self.student, self.n, self.cfg = teacher, student, int(n_steps), cfg
        self.guidance_range = guidance_range
        self.schedule, self.param = teacher.schedule, teacher.pipeline.parameterization
        self.sampler = DDIMSampler(teacher.schedule)
        self.device = next(student.parameters()).device
        self.ema = EMA(student, cfg.ema_decay)
        self.opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        self.channel_weight = latent_channel_weight(teacher.codec, cfg.analytic_weight)

    def draw(self, batch: CaptionedBatch, rng, gen: torch.Generator) -> Draw:
        b = len(batch)
        i = torch.from_numpy(rng.integers(1, self.n + 1, b))
        lo, hi = self.guidance_range
        w = torch.from_numpy(rng.uniform(lo, hi, b)).float()
        eps = torch.randn(batch.x0.shape, generator=gen).to(self.device) * batch.mask[:, None].to(batch.x0.dtype)
        return Draw(i, eps, w.to(self.device))

    def noisy(self, batch: CaptionedBatch, d: Draw) -> tuple[Tensor, Tensor]:
        t = step_times(d.i, self.n, batch.x0.dtype)[0].to(self.device)
        return self.schedule.add_noise(batch.x0, d.eps, t), t

    def target(self, batch: CaptionedBatch, d: Draw) -> Tensor:
        z, _ = self.noisy(batch, d)
        cond = batch.conditioning

        def teacher_x0(zz, tt):
            return self.teacher.pipeline.predict_x0(zz, tt, cond, d.guidance, batch.mask).clone()

        return two_step_target(teacher_x0, self.sampler, z, d.i.to(self.device), self.n)[0]

    def loss(self, batch: CaptionedBatch, d: Draw, target: Tensor) -> tuple[Tensor, Tensor]:
        """(weighted loss, per-sample x0-MSE against the two-step teacher, weighted over channels only)."""
        z, t = self.noisy(batch, d)
        text = batch.text
        out = self.student(z, t, text.tokens, text.mask, text.pooled, batch.seconds, batch.mask, guidance=d.guidance)
        mse = masked_mse(self.param.to_x0(out, z, t), target, batch.mask, self.channel_weight)
        weight = loss_weight(self.cfg.weighting, logsnr=self.schedule.logsnr(t.double()), gamma=self.cfg.gamma)
        return (weight.to(mse.dtype) * mse).mean(), mse

    def train_step(self, batch: CaptionedBatch, d: Draw, lr: float, step: int) -> dict:
        self.student.train()
        target = self.target(batch, d)
        loss, mse = self.loss(batch, d, target)
        set_lr(self.opt, lr)
        gnorm = optimizer_step(self.student, self.opt, loss, clip=1.0)
        self.ema.update(self.student, step + 1)
        return {"loss": loss.item(), "x0_mse": mse.mean().item(), "grad_norm": gnorm, "lr": lr}


def distill(teacher: ModelBundle, cache: LatentCache, out_root: str | Path, run_dir: str | Path, cfg: DistillConfig,
            name: str | None = None, stop_at: int | None = None) -> list[Path]:
    """K halvings from ``teacher`` (a loaded bundle); returns the exported students' directories. Resumable: a
    finished halving is skipped (its export is the next teacher), an unfinished one continues from its last
    checkpoint. ``stop_at`` ends this invocation after that many steps over all halvings (then resume)."""
    from models.data.corpus import SyntheticCorpus

    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    name = name or (f"{teacher.name}-{cfg.weighting}" if is_checkpoint_dir(teacher.path or "") else
                    f"tta-{cfg.weighting}")
    corpus = SyntheticCorpus("train", seed=cfg.seed)
    augment = latent_augment(teacher.codec, corpus, cfg.pitch_shift, cfg.placement_shift)
    text_encoder = teacher.text_encoder
    default_guidance = float(teacher.config.default_guidance)
    folded = takes_guidance(teacher.denoiser)
    g_range = (cfg.guidance_min, cfg.guidance_max or 2.0 * default_guidance) if folded else (1.0, 1.0)
    dropout = cfg.cond_dropout
    if dropout is None:
        dropout = 0.1 if not folded and default_guidance != 1.0 else 0.0
    stages = halvings(cfg.start_steps or teacher.config.default_steps, cfg.iterations)
    exported: list[Path] = []
    current = teacher
    for k, n in enumerate(stages):
        out = Path(out_root) / f"{name}-{n}"
        run = RunState(Path(run_dir) / f"stage-{n}")
        done = run.dir / "done.json"
        if done.is_file() and is_model_dir(out):
            exported.append(out)
            current = load_bundle(out, device=cfg.device, text_encoder=text_encoder)
            continue
        budget = None if stop_at is None else stop_at - k * cfg.steps_per_halving
        if budget is not None and budget <= 0:
            break
        student = make_student(current.denoiser).to(cfg.device)
        distiller = Distiller(current, student, n, cfg, g_range)
        step = 0
        if run.exists():
            step, _ = run.load({"student": student, "ema": distiller.ema.model}, {"opt": distiller.opt})
            print(f"resumed distillation to {n} steps at step {step}")
        (run.dir / "distill_config.json").write_text(json.dumps({**asdict(cfg), "student_steps": n}, indent=2))
        steps_before = k * cfg.steps_per_halving

        def train_step(step: int, distiller=distiller, n=n, teacher=current) -> dict:
            rng, gen = step_rngs(cfg.seed, 1000 + n, step)
            batch = sample_captioned_batch(cache, corpus, text_encoder, rng, cfg.batch_size, dropout,
                                           null_text=teacher.unconditional_text, max_frames=window_frames(teacher),
                                           augment=augment)
            batch = batch.to(cfg.device)
            lr = lr_at(step, cfg.steps_per_halving, cfg.lr, 0, schedule="linear", final=0.0)
            return distiller.train_step(batch, distiller.draw(batch, rng, gen), lr, step)

        def checkpoint(step: int, run=run, distiller=distiller, student=student) -> None:
            run.save(step, {"student": student, "ema": distiller.ema.model}, {"opt": distiller.opt})

        step = train_loop(run, f"distill {2 * n}->{n} ({cfg.weighting})", step, cfg.steps_per_halving, train_step,
                          checkpoint, cfg.log_every, cfg.checkpoint_every, stop_at=budget)
        if step < cfg.steps_per_halving:
            break
        guidance_note = ("guidance scale as a model input (one forward per step)" if folded else
                         f"classifier-free guidance {default_guidance:g} as sampled by the teacher")
        export_derived(
            current, distiller.ema.model, out, kind="bsa" if cfg.weighting == "bsa" else "distilled",
            sampler="ddim", default_steps=n, default_guidance=default_guidance, guidance_in_model=folded,
            description=(f"progressive-distillation student ({cfg.weighting} weighting), {n}-step DDIM, "
                         f"{guidance_note}, distilled from {current.name}"),
            training={**asdict(cfg), "cond_dropout": dropout, "student_steps": n, "teacher": current.name,
                      "guidance_range": list(g_range), "steps_done": steps_before + step})
        done.write_text(json.dumps({"out": str(out), "steps": step}) + "\n")
        exported.append(out)
        current = load_bundle(out, device=cfg.device, text_encoder=text_encoder)
    return exported


def run_distill(source: str | Path, out_root: str | Path, run_dir: str | Path, cfg: DistillConfig,
                name: str | None = None, cache_dir: str | Path | None = None, stop_at: int | None = None) -> list[Path]:
    """The CLI's entry: load the teacher (a directory or a zoo name), encode the training clips with its codec
    (or reuse ``cache_dir``), distil."""
    set_threads(cfg.threads)
    teacher = load_bundle(source, device=cfg.device)
    cache = source_cache(teacher, cache_dir or Path(run_dir) / "latents", cfg.cache_clips, cfg.seed)
    return distill(teacher, cache, out_root, run_dir, cfg, name=name, stop_at=stop_at)
