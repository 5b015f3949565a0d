"""Progressive distillation: loss weights, the two-step target, training, export and resumption."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_support import count_denoiser_rows

from models.bundle import ModelBundle
from models.data.corpus import SyntheticCorpus
from models.diffusion import DDIMSampler, RectifiedFlowSchedule, VPCosineSchedule
from models.diffusion.weighting import loss_weight
from models.dit import DiTConfig
from models.training.batches import sample_captioned_batch
from models.training.derived import codec_dir
from models.training.distill import (
    DistillConfig,
    Distiller,
    distill,
    halvings,
    step_times,
    two_step_target,
    with_guidance_embedding,
)

LATENT = DiTConfig.latent_dim  # the embedded codec's latent channels


# ------------------------------------------------------------------------------------------------ weights
SNR = torch.tensor([0.0, 0.25, 1.0, 4.0, 4.5, 10.0, 100.0], dtype=torch.float64)


@pytest.mark.parametrize("name, expected", [
    ("bsa", [1.0, 1.25, 2.0, 5.0, 5.0, 5.0, 5.0]),
    ("min-snr", [1.0, 0.25, 1.0, 4.0, 4.5, 5.0, 5.0]),
    ("truncated-snr", [1.0, 1.0, 1.0, 4.0, 4.5, 10.0, 100.0]),
    ("snr+1", [1.0, 1.25, 2.0, 5.0, 5.5, 11.0, 101.0]),
    ("snr", [0.0, 0.25, 1.0, 4.0, 4.5, 10.0, 100.0]),
])
def test_loss_weights_exact(name, expected):
    assert loss_weight(name, SNR).tolist() == expected
    # the same through logSNR (SNR = 0 has no finite logSNR: leave it out)
    got = loss_weight(name, logsnr=torch.log(SNR[1:]))
    assert torch.allclose(got, torch.tensor(expected[1:], dtype=torch.float64), rtol=1e-12)


def test_loss_weight_gamma_and_errors():
    snr = torch.tensor([0.5, 1.5, 3.0])
    assert loss_weight("bsa", snr, gamma=2.0).tolist() == [1.5, 2.0, 2.0]
    assert loss_weight("min-snr", snr, gamma=2.0).tolist() == [0.5, 1.5, 2.0]
    with pytest.raises(ValueError):
        loss_weight("eps", snr)
    with pytest.raises(ValueError):
        loss_weight("bsa")
    with pytest.raises(ValueError):
        loss_weight("bsa", snr, logsnr=torch.log(snr))


def test_halvings():
    assert halvings(200, 3) == [100, 50, 25]
    assert halvings(25, 2) == [12, 6]
    with pytest.raises(ValueError):
        halvings(2, 2)


# ------------------------------------------------------------------------------------------------ the target
def gaussian_x0(z, t, schedule, mu, s):
    """E[x0 | z_t] for data x0 ~ N(mu, s^2 I): a teacher whose x0 prediction is exact."""
    a, sig = schedule.alpha_sigma(t)
    a, sig = a[:, None, None], sig[:, None, None]
    return mu + a * s**2 / (a**2 * s**2 + sig**2) * (z - a * mu)


@pytest.mark.parametrize("schedule", [VPCosineSchedule(), RectifiedFlowSchedule()], ids=lambda s: s.name)
def test_target_reproduces_two_teacher_steps(schedule):
    """x~0 fed back through ONE DDIM step from t lands on the teacher's z_t'' after two steps, computed here
    independently with the formulas of Algorithm 1; at t'' = 0 the target is the teacher's x0 itself."""
    torch.manual_seed(0)
    n = 4
    mu, s = 0.4, 0.7
    i = torch.tensor([1, 2, 3, 4, 2])
    z = torch.randn(5, 3, 6, dtype=torch.float64)

    def teacher(zz, tt):
        return gaussian_x0(zz, tt, schedule, mu, s)

    sampler = DDIMSampler(schedule)
    target, z_end = two_step_target(teacher, sampler, z, i, n)

    t = i.double() / n
    t1, t2 = t - 0.5 / n, t - 1.0 / n
    a, sg = (v[:, None, None] for v in schedule.alpha_sigma(t))
    a1, s1 = (v[:, None, None] for v in schedule.alpha_sigma(t1))
    a2, s2 = (v[:, None, None] for v in schedule.alpha_sigma(t2))
    x_a = teacher(z, t)
    z1 = a1 * x_a + (s1 / sg) * (z - a * x_a)
    x_b = teacher(z1, t1)
    z2 = a2 * x_b + (s2 / s1) * (z1 - a1 * x_b)
    expected = (z2 - (s2 / sg) * z) / (a2 - (s2 / sg) * a)
    # t'' = 0: sampling ends on the teacher's x0 (a VP-cosine schedule still has sigma(0) = exp(-10) there)
    last = i == 1
    z2[last] = expected[last] = x_b[last]

    assert torch.allclose(z_end, z2, atol=1e-10)
    assert torch.allclose(target, expected, atol=1e-9)
    assert torch.allclose(sampler.step(z, target, t, t2), z2, atol=1e-9)
    assert torch.equal(t2[last], torch.zeros(1, dtype=torch.float64))
    assert torch.allclose(target[last], x_b[last], atol=1e-12)
    # the two-step target differs from what the teacher says in one step (else there is nothing to learn)
    assert not torch.allclose(target[~last], x_a[~last], atol=1e-3)


def test_step_times_are_exact():
    t, t1, t2 = step_times(torch.arange(1, 101), 100)
    assert t2[0].item() == 0.0 and t[-1].item() == 1.0
    assert torch.allclose(t1, (torch.arange(1, 101) - 0.5) / 100)


# ------------------------------------------------------------------------------------------------ training
def test_student_starts_as_teacher_conditional_model(teacher, text_encoder):
    student = with_guidance_embedding(teacher.denoiser)
    assert student.config.guidance_embed and not teacher.denoiser.config.guidance_embed
    text = text_encoder.encode(["a 440 Hz sine tone", "rain"])
    z, t = torch.randn(2, LATENT, 9), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        ref = teacher.denoiser(z, t, text.tokens, text.mask, text.pooled, torch.tensor([1.0, 2.0]))
        for w in (1.0, 3.0, 6.0):
            out = student(z, t, text.tokens, text.mask, text.pooled, torch.tensor([1.0, 2.0]),
                          guidance=torch.full((2,), w))
            assert torch.allclose(out, ref, atol=1e-6)


def test_training_steps_lower_the_error_against_the_two_step_teacher(teacher, cache, text_encoder):
    cfg = DistillConfig(weighting="bsa", lr=2e-3, ema_decay=0.9)
    before = {k: v.clone() for k, v in teacher.denoiser.state_dict().items()}
    student = with_guidance_embedding(teacher.denoiser)
    d = Distiller(teacher, student, 2, cfg, (1.0, 6.0))
    rng = np.random.default_rng(3)
    batch = sample_captioned_batch(cache, SyntheticCorpus("train"), text_encoder, rng, 4)
    assert not batch.mask.all()  # random durations: the batch is padded
    draw = d.draw(batch, rng, torch.Generator().manual_seed(0))
    draw.i = torch.tensor([1, 2, 1, 2])  # both the last step (t'' = 0) and an inner one
    target = d.target(batch, draw)
    loss0, mse0 = d.loss(batch, draw, target)
    # the loss is the BSA-weighted x0-MSE
    t = step_times(draw.i, 2)[0]
    w = loss_weight("bsa", logsnr=teacher.schedule.logsnr(t.double())).float()
    assert torch.allclose(loss0, (w * mse0).mean(), rtol=1e-5)
    for step in range(12):
        d.train_step(batch, draw, cfg.lr, step)
    loss1, mse1 = d.loss(batch, draw, d.target(batch, draw))
    assert loss1.item() < 0.5 * loss0.item()
    assert mse1.mean().item() < mse0.mean().item()
    # the teacher is untouched, and the target does not depend on the student
    assert all(torch.equal(v, teacher.denoiser.state_dict()[k]) for k, v in before.items())
    assert torch.equal(d.target(batch, draw), target)


def test_analytic_channels_can_weigh_more_in_the_distillation_loss(teacher, cache, text_encoder):
    analytic = teacher.codec.config.analytic_channels
    assert 0 < analytic < LATENT
    rng = np.random.default_rng(5)
    batch = sample_captioned_batch(cache, SyntheticCorpus("train"), text_encoder, rng, 3)
    rises = {}
    for aw in (1.0, 4.0):
        d = Distiller(teacher, with_guidance_embedding(teacher.denoiser), 2, DistillConfig(analytic_weight=aw),
                      (1.0, 6.0))
        assert (d.channel_weight is None) == (aw == 1.0)
        draw = d.draw(batch, np.random.default_rng(6), torch.Generator().manual_seed(1))
        target = d.target(batch, draw)
        base = d.loss(batch, draw, target)[1]
        for name, channel in (("analytic", analytic - 1), ("learned", analytic)):
            rise = 0.0
            for delta in (0.5, -0.5):  # the pair cancels the term linear in the student's current miss
                shifted = target.clone()
                shifted[:, channel] += delta
                rise += (d.loss(batch, draw, shifted)[1] - base).mean().item()
            rises[aw, name] = rise
    # the plain mean prices one channel like another; weight 4 makes an analytic-channel miss cost more than before
    # and more than the same miss on a learned channel (whose share of the normalised weights shrinks)
    assert rises[1.0, "analytic"] == pytest.approx(rises[1.0, "learned"], rel=1e-4)
    assert rises[4.0, "analytic"] > 2 * rises[1.0, "analytic"]
    assert rises[4.0, "learned"] < rises[1.0, "learned"]


def _weights(path):
    return load_file(path / "denoiser.safetensors")


@pytest.mark.slow
def test_distill_run_exports_halvings_and_resumes(tmp_path, teacher, cache, text_encoder):
    # with latent augmentation on (the cache holds tones and hard-panned clips): resuming replays it exactly
    cfg = DistillConfig(weighting="bsa", iterations=2, steps_per_halving=4, batch_size=3, lr=1e-3,
                        checkpoint_every=2, log_every=1, ema_decay=0.9, pitch_shift=0.5, placement_shift=0.5)
    full = distill(teacher, cache, tmp_path / "out-a", tmp_path / "run-a", cfg, name="s")
    assert [p.name for p in full] == ["s-4", "s-2"]

    # the same run, interrupted twice (mid-halving, then in the second halving) and resumed
    part = distill(teacher, cache, tmp_path / "out-b", tmp_path / "run-b", cfg, name="s", stop_at=2)
    assert part == [] and not (tmp_path / "out-b" / "s-4").exists()
    assert torch.load(tmp_path / "run-b" / "stage-4" / "state.pt", weights_only=True)["step"] == 2
    part = distill(teacher, cache, tmp_path / "out-b", tmp_path / "run-b", cfg, name="s", stop_at=6)
    assert [p.name for p in part] == ["s-4"]
    resumed = distill(teacher, cache, tmp_path / "out-b", tmp_path / "run-b", cfg, name="s")
    assert [p.name for p in resumed] == ["s-4", "s-2"]
    for name in ("s-4", "s-2"):
        a, b = _weights(tmp_path / "out-a" / name), _weights(tmp_path / "out-b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the students moved away from the teacher and from each other
    first, second = _weights(tmp_path / "out-a" / "s-4"), _weights(tmp_path / "out-a" / "s-2")
    assert not torch.equal(first["proj_out.weight"], teacher.denoiser.state_dict()["proj_out.weight"])
    assert not torch.equal(first["proj_out.weight"], second["proj_out.weight"])
    log = [json.loads(line) for line in (tmp_path / "run-a" / "stage-4" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    assert log[-1]["lr"] < log[0]["lr"]  # annealed within the halving

    for name, steps in (("s-4", 4), ("s-2", 2)):
        student = ModelBundle.load(tmp_path / "out-a" / name, text_encoder=text_encoder)
        c = student.config
        assert (c.kind, c.sampler, c.default_steps, c.guidance_in_model, c.default_guidance) == \
            ("bsa", "ddim", steps, True, 3.0)
        assert codec_dir(student) == codec_dir(teacher)
        rows = count_denoiser_rows(student)
        lat = student.pipeline.generate_latents(["a dog barks", "a 300 Hz square wave"], [1.0, 2.5], [1, 2])
        assert [x.shape for x in lat] == [(LATENT, student.latent_frames(1.0)), (LATENT, student.latent_frames(2.5))]
        assert rows == [2] * steps  # one forward row per sample per step, guidance included
        assert student.pipeline.forward_count(torch.tensor([3.0, 3.0])) == 2
        assert teacher.pipeline.forward_count(torch.tensor([3.0, 3.0])) == 4
