"""ARC post-training: prompt shuffling, discriminator construction, loss directions, training, export, resume."""
import copy
import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_support import count_denoiser_rows, randomise

from models.bundle import ModelBundle
from models.data.corpus import SyntheticCorpus
from models.diffusion import PingPongSampler
from models.dit import DiT, DiTConfig
from models.training.arc import (
    ARCConfig,
    ARCTrainer,
    Discriminator,
    fold_guidance,
    gradient_penalty,
    shuffled_prompts,
    train_arc,
)
from models.training.batches import sample_captioned_batch
from models.training.validation import BestCheckpoint, ValidationResult

LATENT = DiTConfig.latent_dim  # the embedded codec's latent channels


def _batch(cache, text_encoder, n=4, seed=3):
    return sample_captioned_batch(cache, SyntheticCorpus("train"), text_encoder, np.random.default_rng(seed), n)


# ------------------------------------------------------------------------------------------------ prompt shuffling
def _check_shuffle(prompts, perm, valid):
    n = len(prompts)
    biggest = max(prompts.count(p) for p in prompts)
    assert int(valid.sum()) == n - max(0, 2 * biggest - n)  # every row that can get a wrong prompt gets one
    rows = torch.nonzero(valid).flatten().tolist()
    for i in rows:
        assert perm[i] != i  # by index
        assert prompts[perm[i]] != prompts[i]  # by text
    assert sorted(perm[rows].tolist()) == rows  # a permutation of the valid rows: every wrong prompt used once


def test_shuffle_at_batch_size_two():
    rng = np.random.default_rng(0)
    for _ in range(20):
        perm, valid = shuffled_prompts(["a dog barks", "a cat meows"], rng)
        assert perm.tolist() == [1, 0] and valid.all()
    perm, valid = shuffled_prompts(["rain", "rain"], rng)
    assert not valid.any()  # the only other prompt is the same text: no wrong prompt exists


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9])
def test_shuffle_never_pairs_a_clip_with_its_own_prompt(n):
    rng = np.random.default_rng(n)
    vocab = ["a dog barks", "rain", "a 440 Hz sine tone", ""]
    for trial in range(200):
        prompts = [vocab[int(k)] for k in rng.integers(0, 1 + trial % 4, n)]  # many duplicates, sometimes all equal
        _check_shuffle(prompts, *shuffled_prompts(prompts, rng))
    for prompts in itertools.product(vocab[:3], repeat=min(n, 5)):  # every pattern of duplicates, small batches
        _check_shuffle(list(prompts), *shuffled_prompts(list(prompts), rng))


def test_shuffle_is_random():
    rng = np.random.default_rng(1)
    prompts = [f"prompt {i}" for i in range(6)]
    seen = {tuple(shuffled_prompts(prompts, rng)[0].tolist()) for _ in range(50)}
    assert len(seen) > 5


# ------------------------------------------------------------------------------------------------ networks
def test_discriminator_shares_the_trunk_at_init(teacher, text_encoder):
    gen = teacher.denoiser
    disc = Discriminator(gen)
    assert disc.layer == 2 and len(disc.trunk.blocks) == 2  # two thirds of depth 3
    g_params = dict(gen.named_parameters())
    trunk = dict(disc.trunk.named_parameters())
    assert trunk and all(name in g_params for name in trunk)
    for name, p in trunk.items():
        assert torch.equal(p, g_params[name]) and p.data_ptr() != g_params[name].data_ptr()  # copied, not tied
    assert not any(n.startswith(("blocks.2.", "proj_out", "ada_out")) for n in trunk)
    # one logit per clip, independent of padding and batch companions
    text = text_encoder.encode(["a dog barks", "a 300 Hz square wave"])
    z, t, sec = torch.randn(2, LATENT, 12), torch.tensor([0.4, 0.7]), torch.tensor([1.0, 0.5])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    z[1, :, 7:] = 50.0
    with torch.no_grad():
        both = disc(z, t, text, sec, mask)
        alone = disc(z[1:, :, :7], t[1:], text.select([1]), sec[1:], mask[1:, :7])
    assert both.shape == (2,) and torch.allclose(both[1], alone[0], atol=1e-5)


def test_fold_guidance_is_exact(text_encoder):
    torch.manual_seed(0)
    dit = DiT(DiTConfig(width=32, depth=2, heads=2, guidance_embed=True))
    randomise(dit, 1)
    folded = fold_guidance(dit, 4.0)
    assert not folded.config.guidance_embed
    text = text_encoder.encode(["wind", "a kick drum"])
    z, t, sec = torch.randn(2, LATENT, 9), torch.tensor([0.2, 0.95]), torch.tensor([1.0, 3.0])
    with torch.no_grad():
        ref = dit(z, t, text.tokens, text.mask, text.pooled, sec, guidance=torch.full((2,), 4.0))
        other = dit(z, t, text.tokens, text.mask, text.pooled, sec, guidance=torch.full((2,), 1.0))
        out = folded(z, t, text.tokens, text.mask, text.pooled, sec)
    assert torch.allclose(out, ref, atol=1e-5) and not torch.allclose(out, other, atol=1e-3)


# ------------------------------------------------------------------------------------------------ losses
def test_losses_move_the_right_way_and_conditioning_is_not_mutated(teacher, cache, text_encoder):
    """Discriminator updates make real clips outscore fakes: its loss falls, the generator's loss rises."""
    torch.manual_seed(0)
    cfg = ARCConfig(lr_d=1e-3, contrastive_weight=1.0)
    tr = ARCTrainer(teacher, cfg)
    batch = _batch(cache, text_encoder)
    draw = tr.draw(batch, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert bool(draw.valid.all()) and bool((draw.perm != torch.arange(4)).all())
    saved = copy.deepcopy(batch)
    g0 = tr.generator_loss(batch, draw)[0].item()
    d0, m0 = tr.discriminator_loss(batch, draw)
    gen_before = copy.deepcopy(tr.gen.state_dict())
    for step in range(0, 16, 2):  # even steps: discriminator updates only
        tr.train_step(batch, draw, step)
    d1, m1 = tr.discriminator_loss(batch, draw)
    g1 = tr.generator_loss(batch, draw)[0].item()
    assert d1.item() < d0.item() and m1["d_real"] - m1["d_fake"] > m0["d_real"] - m0["d_fake"]
    assert m1["contrastive"] < m0["contrastive"]
    assert g1 > g0
    assert all(torch.equal(v, tr.gen.state_dict()[k]) for k, v in gen_before.items())
    # the shuffled prompts went to the discriminator in a copy: the caller's batch is untouched
    assert batch.prompts == saved.prompts
    for a, b in ((batch.text.tokens, saved.text.tokens), (batch.text.mask, saved.text.mask),
                 (batch.text.pooled, saved.text.pooled), (batch.seconds, saved.seconds), (batch.x0, saved.x0)):
        assert torch.equal(a, b)


def test_generator_step_updates_only_the_generator(teacher, cache, text_encoder):
    tr = ARCTrainer(teacher, ARCConfig(lr_g=1e-3))
    batch = _batch(cache, text_encoder, seed=5)
    draw = tr.draw(batch, np.random.default_rng(1), torch.Generator().manual_seed(1))
    disc_before = copy.deepcopy(tr.disc.state_dict())
    gen_before = copy.deepcopy(tr.gen.state_dict())
    m = tr.train_step(batch, draw, 1)
    assert "g_loss" in m and m["g_grad_norm"] > 0
    assert all(torch.equal(v, tr.disc.state_dict()[k]) for k, v in disc_before.items())
    assert not torch.equal(gen_before["proj_out.weight"], tr.gen.state_dict()["proj_out.weight"])
    assert all(p.requires_grad for p in tr.disc.parameters())


def test_gradient_penalty_is_the_squared_input_gradient():
    """score_b = <w, z_b> + |z_b|^2 / 2 has input gradient w + z_b: the penalty is its mean squared norm, and it is
    differentiable in the scorer's parameters (d/dw = 2 mean_b (w + z_b))."""
    z = torch.randn(3, 4, 5, requires_grad=True)
    w = torch.randn(4, 5, requires_grad=True)
    score = (z * w).sum((1, 2)) + z.pow(2).sum((1, 2)) / 2
    penalty = gradient_penalty(score, z)
    expected = (w + z).pow(2).sum((1, 2)).mean()
    torch.testing.assert_close(penalty, expected)
    (grad_w,) = torch.autograd.grad(penalty, w)
    torch.testing.assert_close(grad_w, 2 * (w + z).mean(0))


@pytest.mark.slow
def test_gradient_penalty_enters_the_loss_and_flattens_the_discriminator(teacher, cache, text_encoder):
    """With gamma > 0 the discriminator's loss is adversarial + contrastive + gamma / 2 (R1 + R2); with the penalty
    dominating (gamma 1e4) the same updates leave a far smaller input gradient on real clips than without it."""
    batch = _batch(cache, text_encoder, seed=7)
    r1_after = {}
    for gamma in (0.0, 1e4):
        torch.manual_seed(0)
        tr = ARCTrainer(teacher, ARCConfig(lr_d=1e-3, gradient_penalty=gamma))
        draw = tr.draw(batch, np.random.default_rng(2), torch.Generator().manual_seed(2))
        for step in range(0, 16, 2):
            tr.train_step(batch, draw, step)
        probe = ARCTrainer(teacher, ARCConfig(gradient_penalty=1.0))
        probe.disc.load_state_dict(tr.disc.state_dict())
        loss, m = probe.discriminator_loss(batch, draw)
        assert loss.item() == pytest.approx(m["d_adv"] + m["contrastive"] + (m["r1"] + m["r2"]) / 2, rel=1e-5)
        r1_after[gamma] = m["r1"]
    assert r1_after[1e4] < 0.5 * r1_after[0.0]


# ------------------------------------------------------------------------------------------------ training run
@pytest.mark.slow
def test_arc_run_updates_both_nets_exports_and_resumes(tmp_path, teacher, cache, text_encoder):
    # with latent augmentation on (the cache holds tones and hard-panned clips): resuming replays it exactly
    cfg = ARCConfig(train_steps=6, batch_size=3, lr_g=1e-3, lr_d=1e-3, checkpoint_every=2, log_every=1,
                    ema_decay=0.5, pitch_shift=0.5, placement_shift=0.5)
    out = train_arc(teacher, cache, tmp_path / "arc-a", tmp_path / "run-a", cfg)
    state = torch.load(tmp_path / "run-a" / "state.pt", weights_only=True)
    assert state["step"] == 6
    source = teacher.denoiser.state_dict()
    gen, disc = state["modules"]["gen"], state["modules"]["disc"]
    assert not torch.equal(gen["proj_out.weight"], source["proj_out.weight"])
    assert not torch.equal(disc["trunk.blocks.0.ada.weight"], source["blocks.0.ada.weight"])

    # interrupted after 3 steps (mid-way between checkpoints: it checkpoints where it stops) and resumed
    train_arc(teacher, cache, tmp_path / "arc-b", tmp_path / "run-b", cfg, stop_at=3)
    train_arc(teacher, cache, tmp_path / "arc-b", tmp_path / "run-b", cfg)
    a, b = load_file(out / "denoiser.safetensors"), load_file(tmp_path / "arc-b" / "denoiser.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    arc = ModelBundle.load(out, text_encoder=text_encoder)
    c = arc.config
    assert (c.kind, c.sampler, c.default_steps, c.default_guidance, c.guidance_in_model) == \
        ("arc", "pingpong", 8, 1.0, False)
    assert c.schedule["name"] == "vp-cosine" and c.parameterization == "v"
    rows = count_denoiser_rows(arc)
    for steps in (1, 2, 4, 8):
        rows.clear()
        lat = arc.pipeline.generate_latents(["a dog barks", "rain on a roof"], [1.0, 2.0], [4, 5], steps=steps)
        assert [x.shape for x in lat] == [(LATENT, arc.latent_frames(1.0)), (LATENT, arc.latent_frames(2.0))]
        assert all(torch.isfinite(x).all() for x in lat)
        assert rows == [2] * steps  # one forward row per sample per step, no CFG
    wave = arc.pipeline.generate(["a dog barks"], [1.0], [4], steps=2)[0]
    assert wave.shape == (2, 44100)


def test_arc_from_a_guidance_embedded_student(tmp_path, teacher, cache, text_encoder):
    """A distilled student (guidance as an input) is folded at its default scale; the export needs no guidance."""
    from models.training.derived import export_derived
    from models.training.distill import with_guidance_embedding

    student = with_guidance_embedding(teacher.denoiser)
    randomise(student.guidance_mlp, 7, scale=0.1)
    path = export_derived(teacher, student, tmp_path / "student", kind="bsa", guidance_in_model=True)
    student_bundle = ModelBundle.load(path, text_encoder=text_encoder)
    tr = ARCTrainer(student_bundle, ARCConfig())
    assert not tr.gen.config.guidance_embed and tr.disc.trunk.guidance_mlp is None
    text = text_encoder.encode(["a siren"])
    z, t, sec = torch.randn(1, LATENT, 8), torch.tensor([0.6]), torch.tensor([1.0])
    with torch.no_grad():
        ref = student_bundle.denoiser(z, t, text.tokens, text.mask, text.pooled, sec, guidance=torch.tensor([3.0]))
        out = tr.gen(z, t, text.tokens, text.mask, text.pooled, sec)
    assert torch.allclose(out, ref, atol=1e-5)
    out_dir = train_arc(student_bundle, cache, tmp_path / "arc", tmp_path / "run",
                        ARCConfig(train_steps=2, batch_size=2, checkpoint_every=2))
    arc = ModelBundle.load(out_dir, text_encoder=text_encoder)
    assert not arc.config.guidance_in_model and arc.pipeline.forward_count(torch.tensor([1.0])) == 1


def test_pingpong_grid_on_the_vp_schedule(teacher):
    grid = PingPongSampler(teacher.schedule).timesteps(8)
    assert grid[0] == 1 and grid[-1] == 0 and torch.all(grid[1:] < grid[:-1])
    half = teacher.schedule.logsnr(grid[1:-1]) / 2
    assert torch.allclose(half, torch.linspace(-6, 2, 9, dtype=torch.float64)[1:-1], atol=1e-6)


@pytest.mark.slow
def test_arc_run_validates_each_checkpoint_and_keeps_the_best(tmp_path, teacher, cache, text_encoder):
    cfg = ARCConfig(train_steps=4, batch_size=2, lr_g=1e-3, lr_d=1e-3, checkpoint_every=2, log_every=1,
                    val_clips=4, val_duration=0.5)
    train_arc(teacher, cache, tmp_path / "arc", tmp_path / "run", cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    assert all(r["fd_mfcc"] >= 0 for r in log)
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["value"] == min(r["fd_mfcc"] for r in log)
    kept = ModelBundle.load(tmp_path / "run" / "best", text_encoder=text_encoder)
    assert kept.config.kind == "arc" and kept.config.training["steps_done"] == best["step"]
    assert kept.pipeline.generate(["a dog barks"], [0.5], [1], steps=1)[0].shape == (2, 22050)


def test_best_checkpoint_keeps_the_better_figure_and_survives_a_restart(tmp_path):
    exports = []
    keep = BestCheckpoint(tmp_path, "fd_mfcc")
    assert keep.offer(ValidationResult(2, {"fd_mfcc": 50.0}), exports.append)
    assert not keep.offer(ValidationResult(4, {"fd_mfcc": 60.0}), exports.append)
    assert not keep.offer(ValidationResult(5, {"fd_mfcc": None}), exports.append)
    again = BestCheckpoint(tmp_path, "fd_mfcc")  # a resumed run reads the record back
    assert again.offer(ValidationResult(6, {"fd_mfcc": 40.0}), exports.append)
    assert exports == [tmp_path / "best"] * 2 and again.best["step"] == 6
    higher = BestCheckpoint(tmp_path / "p", "placement_accuracy")  # higher is better there
    assert higher.offer(ValidationResult(2, {"placement_accuracy": 0.5}), exports.append)
    assert higher.offer(ValidationResult(4, {"placement_accuracy": 0.7}), exports.append)
    assert not higher.offer(ValidationResult(6, {"placement_accuracy": 0.6}), exports.append)
    with pytest.raises(ValueError, match="unknown validation figure"):
        BestCheckpoint(tmp_path, "loss")


def test_worst_ratio_scores_a_checkpoint_by_the_axis_it_lost_most():
    from models.training.validation import worst_ratio

    ref = {"fd_mfcc": 10.0, "pitch_error_median": 0.05, "placement_accuracy": 0.9, "tempo_within_5pct": 0.8}
    assert worst_ratio(dict(ref), ref) == pytest.approx(1.0)
    # better FD, tempo lost: scored by the tempo (0.8 / 0.4 = 2)
    assert worst_ratio(dict(ref, fd_mfcc=5.0, tempo_within_5pct=0.4), ref) == pytest.approx(2.0)
    # pitch error 15 % worse, everything else better
    assert worst_ratio({"fd_mfcc": 8.0, "pitch_error_median": 0.0575, "placement_accuracy": 1.0,
                        "tempo_within_5pct": 0.9}, ref) == pytest.approx(1.15)
    assert worst_ratio(dict(ref, tempo_within_5pct=0.0), ref) == float("inf")
    assert worst_ratio(dict(ref, pitch_error_median=None), {"fd_mfcc": 10.0}) == pytest.approx(1.0)
    assert worst_ratio({}, ref) is None
    keep = BestCheckpoint("/nonexistent-run-dir", "worst_ratio")  # lower is better
    assert keep.better(1.3) and keep.lower_is_better


@pytest.mark.slow
def test_arc_run_selects_on_every_axis_against_its_source(tmp_path, teacher, cache):
    """val_select worst_ratio: the source's own figures are measured once (reference.json) and every checkpoint's
    worst ratio to them is logged and selects the best."""
    cfg = ARCConfig(train_steps=4, batch_size=2, lr_g=1e-3, lr_d=1e-3, checkpoint_every=2, log_every=1,
                    val_clips=4, val_duration=0.5, val_select="worst_ratio")
    train_arc(teacher, cache, tmp_path / "arc", tmp_path / "run", cfg)
    reference = json.loads((tmp_path / "run" / "reference.json").read_text())
    assert reference["model"] == teacher.name and reference["figures"]["fd_mfcc"] >= 0
    log = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(r["worst_ratio"] > 0 for r in log)
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["key"] == "worst_ratio" and best["value"] == min(r["worst_ratio"] for r in log)
