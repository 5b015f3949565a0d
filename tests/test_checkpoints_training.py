"""Checkpoints as teachers: BSA distillation and ARC post-training of a Stable Audio checkpoint (the tiny random
Stable Audio Open Small of models.checkpoints.sized), written as ``derived`` directories that the registry, the
service's loader and later training runs read back."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import float32_default
from safetensors.torch import load_file, save_file

from models.checkpoints import CheckpointError, detect_format, load_checkpoint_dir
from models.data.corpus import SyntheticCorpus
from models.training.arc import ARCConfig, Discriminator, check_trunk, run_arc
from models.training.batches import sample_captioned_batch
from models.registry import load_bundle
from models.training.derived import source_cache, window_frames
from models.training.distill import DistillConfig, make_student, run_distill
from models.training.latent_cache import LatentCache, sample_batch


@pytest.fixture(scope="module")
def sao(sao_tiny):
    return sao_tiny


@pytest.fixture(scope="module")
def distilled(sao, tmp_path_factory):
    """One BSA halving of the checkpoint (8 -> 4 steps), 6 updates on a 4-clip cache."""
    work = tmp_path_factory.mktemp("distill")
    cfg = DistillConfig(iterations=1, steps_per_halving=6, batch_size=2, cache_clips=4, lr=1e-3, checkpoint_every=3,
                        log_every=3, threads=1)
    with float32_default():
        (student,) = run_distill(sao, work / "students", work / "run", cfg)
    return student, work


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_distilled_checkpoint_is_a_derived_directory_served_like_any_checkpoint(sao, distilled):
    from service.runtimes import load_runtime

    student_dir, work = distilled
    assert student_dir.name == "sao-tiny-bsa-4" and detect_format(student_dir) == "derived"
    manifest = json.loads((student_dir / "derived.json").read_text())
    assert (student_dir / manifest["base"]).resolve() == sao.resolve() and manifest["base_format"] == "stable-audio-tools"
    rt = load_runtime(student_dir)
    b, teacher = rt.bundle, load_checkpoint_dir(sao)
    c = b.config
    assert (c.kind, c.sampler, c.default_steps, c.guidance_in_model) == ("bsa", "ddim", 4, False)
    assert c.default_guidance == teacher.config.default_guidance and c.schedule == teacher.config.schedule
    # the codec and text encoder are the base's; the denoiser is the exported EMA student, not the teacher
    ema = torch.load(work / "run" / "stage-4" / "state.pt", weights_only=True)["modules"]["ema"]
    for k, v in b.denoiser.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0)
    moved = [k for k, v in teacher.denoiser.state_dict().items() if not torch.equal(v, b.denoiser.state_dict()[k])]
    assert moved, "distillation left every weight of the teacher unchanged"
    for k, v in teacher.codec.state_dict().items():
        assert torch.equal(v, b.codec.state_dict()[k])
    wave = b.pipeline.generate(["Rain on a tin roof"], [0.016], [0])[0]
    assert wave.shape == (2, 128) and bool(torch.isfinite(wave).all())


def test_the_student_starts_as_the_teacher_and_keeps_its_guidance_branches(sao):
    """A checkpoint network has no guidance input: the student is a plain copy (same output), trained per branch:
    dropped captions become the checkpoint's own null condition (no real token: Stable Audio zeroes its
    cross-attention input), not the empty prompt's encoding."""
    with float32_default():
        teacher = load_checkpoint_dir(sao)
        student = make_student(teacher.denoiser)
        z, t = torch.randn(2, 8, 16), torch.tensor([0.3, 0.8])
        text = teacher.encode_text(["a dog barks", "thunder"])
        seconds, mask = torch.tensor([0.016, 0.016]), torch.ones(2, 16, dtype=torch.bool)
        with torch.no_grad():
            a = teacher.denoiser(z, t, text.tokens, text.mask, text.pooled, seconds, mask)
            b = student(z, t, text.tokens, text.mask, text.pooled, seconds, mask, guidance=torch.tensor([3.0, 3.0]))
        torch.testing.assert_close(a, b, rtol=0, atol=0)

        cache = LatentCache([torch.randn(8, 20) for _ in range(4)], [SyntheticCorpus("train")[i].params
                                                                    for i in range(4)], [1.0] * 4)
        batch = sample_captioned_batch(cache, SyntheticCorpus("train"), teacher.text_encoder,
                                       np.random.default_rng(0), 8, cond_dropout=0.5,
                                       null_text=teacher.unconditional_text)
    dropped = [i for i, p in enumerate(batch.prompts) if not p]
    kept = [i for i, p in enumerate(batch.prompts) if p]
    assert dropped and kept
    assert not bool(batch.text.mask[dropped].any()) and bool(batch.text.mask[kept].any(dim=1).all())
    assert float(batch.text.tokens[dropped].abs().sum()) == 0.0


def test_training_clips_are_cut_to_the_model_window(sao):
    with float32_default():
        teacher = load_checkpoint_dir(sao)
    frames = window_frames(teacher)
    assert frames == teacher.codec.latent_frames(round(teacher.config.max_duration * teacher.codec.sample_rate))
    cache = LatentCache([torch.arange(100.0).expand(2, 100), torch.zeros(2, 10)], [{}, {}], [5.0, 0.5])
    rng = np.random.default_rng(1)
    z, mask, idx, share = sample_batch(cache, rng, 6, max_frames=frames)
    for row, i in enumerate(idx):
        n = int(mask[row].sum())
        if i == 0:  # a window of the long clip: consecutive frames, scaled duration
            assert n == frames and share[row] == frames / 100
            start = int(z[row, 0, 0])
            assert torch.equal(z[row, 0, :n], torch.arange(start, start + n, dtype=z.dtype))
        else:
            assert n == 10 and share[row] == 1.0
    # without a window nothing is cut and no random number is drawn beyond the indices
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    sample_batch(cache, a, 3)
    b.integers(0, 2, 3)
    assert a.random() == b.random()


def test_arc_on_a_derived_student_writes_a_model_over_the_original_checkpoint(sao, distilled, tmp_path):
    student_dir, work = distilled
    cfg = ARCConfig(train_steps=4, steps=2, batch_size=2, cache_clips=4, checkpoint_every=2, log_every=2, threads=1)
    with float32_default():
        out = run_arc(student_dir, tmp_path / "sao-tiny-arc", tmp_path / "run", cfg, cache_dir=work / "run" / "latents")
        model = load_bundle(out)
    manifest = json.loads((out / "derived.json").read_text())
    assert (out / manifest["base"]).resolve() == sao.resolve()  # not the student's directory
    c = model.config
    assert (c.kind, c.sampler, c.default_steps, c.default_guidance) == ("arc", "pingpong", 2, 1.0)
    assert c.training["source"] == "sao-tiny-bsa-4" and c.training["steps_done"] == 4
    wave = model.pipeline.generate(["a bell rings"], [0.016], [1])[0]
    assert wave.shape == (2, 128) and bool(torch.isfinite(wave).all())


@torch.no_grad()
def test_the_stable_audio_discriminator_trunk_is_the_transformer_cut_at_its_layer(sao):
    with float32_default():
        teacher = load_checkpoint_dir(sao)
        dn = teacher.denoiser
        disc = Discriminator(dn, layer=1)
        z, t = torch.randn(2, 8, 12), torch.tensor([0.2, 0.9])
        text = teacher.encode_text(["wind", "a bird sings"])
        seconds, mask = torch.tensor([0.01, 0.016]), torch.ones(2, 12, dtype=torch.bool)
        mask[0, 8:] = False
        frames, glob = disc.trunk.features(z, t, text.tokens, text.mask, text.pooled, seconds, mask)
        assert frames.shape == (2, 12, dn.width) and glob.shape == (2, dn.width)
        # the trunk's layer is the full network's first layer, on the same input
        context, g = dn.conditioning(text.tokens, text.mask, seconds)
        full = dn.dit
        layers = full.layers
        full.layers = layers[:1]
        try:
            expected = full.hidden(z, dn.model_time(t), context, g, mask)
        finally:
            full.layers = layers
        torch.testing.assert_close(frames, expected[:, 1:])
        logits = disc(z, t, text, seconds, mask)
        assert logits.shape == (2,) and bool(torch.isfinite(logits).all())
    assert not hasattr(disc.trunk.dit, "project_out") and len(dn.dit.layers) == 2  # the generator is untouched


def test_arc_refuses_a_denoiser_without_a_trunk():
    with pytest.raises(ValueError, match="first blocks can serve as the discriminator.*Linear"):
        check_trunk(torch.nn.Linear(2, 2))


def test_derived_directories_that_do_not_fit_are_clear_errors(sao, distilled, tmp_path):
    student_dir, _ = distilled
    bad = tmp_path / "bad"
    shutil.copytree(student_dir, bad)
    manifest = {**json.loads((bad / "derived.json").read_text()), "base": str(sao.resolve())}  # absolute works too

    def write(**changes):
        (bad / "derived.json").write_text(json.dumps({**manifest, **changes}))

    write()
    assert load_checkpoint_dir(bad).config.name == "bad"  # named after its directory, like any checkpoint
    write(base="../nowhere")
    with pytest.raises(CheckpointError, match="base checkpoint .*nowhere.* not found"):
        load_checkpoint_dir(bad)
    write(base=str(student_dir.resolve()))
    with pytest.raises(CheckpointError, match="itself a derived model"):
        load_checkpoint_dir(bad)
    write(config={**manifest["config"], "schedule": {"name": "vp-cosine"}})
    with pytest.raises(CheckpointError, match="schedule.*cannot be changed"):
        load_checkpoint_dir(bad)
    write()
    weights = load_file(str(bad / "denoiser.safetensors"))
    weights.pop("dit.project_out.weight")
    save_file(weights, str(bad / "denoiser.safetensors"))
    with pytest.raises(CheckpointError, match="denoiser.safetensors.*dit.project_out.weight"):
        load_checkpoint_dir(bad)


def test_the_latent_cache_of_a_checkpoint_teacher_uses_its_codec(sao, distilled):
    _, work = distilled
    with float32_default():
        teacher = load_checkpoint_dir(sao)
        cache = source_cache(teacher, work / "run" / "latents", 4, seed=0)
    assert len(cache) == 4
    clip = SyntheticCorpus("train", seed=0)[0]
    with float32_default(), torch.no_grad():
        z = teacher.codec.encode(torch.from_numpy(clip.audio)[None])[0]
    torch.testing.assert_close(cache.latents[0], z.half().float())
