"""Stable Audio 3 checkpoints (models.checkpoints.format_stable_audio_3): a tiny SA3 is built from diffusers 0.42.1's
own classes with random weights (StableAudio3DiTModel, AutoencoderSAME, StableAudio3DurationEmbedder, transformers'
T5GemmaEncoderModel), saved with ``StableAudio3Pipeline.save_pretrained``, loaded through ``load_checkpoint_dir`` and
must compute the same thing: DiT outputs within 1e-4 relative (with and without the inpainting input, masked and
unmasked text, padded batches), the SAME encoder and decoder, and full seeded 8-step ping-pong runs equal to the
pipelines' (text-to-audio, audio-to-audio, inpainting; the last two through the project's generation modes). The
same weights written in Stability's own layout (model_config.json + model.safetensors) load and compute the same.
Full-size Small and Medium are built on the meta device (parameter counts stated below, equal to diffusers' own
modules'). Without diffusers these tests skip.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import float32_default
from pipeline_support import join_and_leave
from test_checkpoints import randomize, rel_err

from models.checkpoints import CheckpointError, detect_format, load_checkpoint_dir
from models.checkpoints import stable_audio_3_model_config as native
from models.checkpoints.reference_configs import sa3_config
from models.checkpoints.sized import describe, sized_parameter_counts, write_random_checkpoint
from models.checkpoints.word_tokenizer import word_tokenizer
from models.checkpoints.sized_stable_audio_3 import build, t5gemma_config
from models.pipeline import initial_noise

EXTRA = "diffusers 0.42 with Stable Audio 3 missing: make install-test installs it (pip install -e '.[checkpoints]')"
SR, HOP, LATENT = 8000, 16, 8  # the tiny scale: 8 kHz, 16 samples per latent, 8 latent channels
PROMPTS = ["warm arpeggios on house beats", "rain on a tin roof , then thunder"]


def diffusers_modules(model: str, seed: int):
    """diffusers' transformer, vae and duration embedder at the tiny scale, random weights."""
    diffusers = pytest.importorskip("diffusers", reason=EXTRA)
    if not hasattr(diffusers, "StableAudio3DiTModel"):
        pytest.skip(EXTRA)
    from diffusers.pipelines.stable_audio_3 import StableAudio3DurationEmbedder

    cfg = sa3_config(model, "tiny")
    transformer = randomize(diffusers.StableAudio3DiTModel(**cfg["transformer"]), seed).eval()
    vae = randomize(diffusers.AutoencoderSAME(**cfg["vae"]), seed + 1).eval()
    with torch.no_grad():
        vae.bottleneck.running_std.fill_(1.7)
    duration = randomize(StableAudio3DurationEmbedder(**cfg["duration_embedder"]), seed + 2).eval()
    return transformer, vae, duration


@pytest.fixture(scope="module")
def sa3(tmp_path_factory):
    """A tiny Stable Audio 3 Medium (differential attention, SAME with a sin-gated decoder layer) in diffusers'
    layout, its scheduler stochastic with one training timestep (the DiT sees the noise level itself)."""
    with float32_default():
        transformer, vae, duration = diffusers_modules("sa3-medium", seed=10)
        from diffusers import FlowMatchEulerDiscreteScheduler, StableAudio3Pipeline
        from transformers import T5GemmaEncoderModel

        torch.manual_seed(13)
        text = T5GemmaEncoderModel(t5gemma_config(sa3_config("sa3-medium", "tiny")["text_encoder"])).eval()
        pipe = StableAudio3Pipeline(vae=vae, text_encoder=text, tokenizer=word_tokenizer(16),
                                    duration_embedder=duration, transformer=transformer,
                                    scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1,
                                                                                    stochastic_sampling=True))
        pipe.set_progress_bar_config(disable=True)
        root = tmp_path_factory.mktemp("sa3") / "stable-audio-3-medium"
        pipe.save_pretrained(root)
        bundle = load_checkpoint_dir(root)
    return {"pipe": pipe, "root": root, "bundle": bundle}


def test_recognised_and_served_with_the_published_defaults(sa3):
    b = sa3["bundle"]
    assert detect_format(sa3["root"]) == "stable-audio-3"
    c = b.config
    assert (c.kind, c.sampler, c.default_steps, c.default_guidance) == ("arc", "pingpong", 8, 1.0)
    assert (c.schedule, c.parameterization, c.inpaint_conditioning) == ({"name": "rectified-flow"}, "rf-velocity",
                                                                         True)
    assert (c.sampler_options, c.audio_to_audio_grid) == ({"half_logsnr_min": -6.2, "half_logsnr_max": 2.0},
                                                          "compress")
    assert (b.denoiser.text_len, b.denoiser.time_scale) == (16, 1.0)
    assert (b.sample_rate, b.samples_per_latent, b.latent_dim) == (SR, HOP, LATENT)
    # not Small: the trained maximum of 4096 latent frames (380 s at the published 44.1 kHz x 4096)
    assert c.max_duration == pytest.approx(4096 * HOP / SR)
    assert b.source_format == "stable-audio-3 (diffusers layout)"


def _dit_inputs(seed: int, batch: int = 2, frames: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, LATENT, frames, generator=g)
    context = torch.randn(batch, 11, 24, generator=g)
    mask = torch.ones(batch, 11, dtype=torch.bool)
    mask[0, 6:10], mask[1, 3:10] = False, False  # text padding (the duration token, last, stays)
    return x, context, mask, torch.randn(batch, 24, generator=g), torch.randn(batch, 1 + LATENT, frames, generator=g)


@pytest.mark.parametrize("model", ["sa3-small", "sa3-medium"])  # plain and differential attention
@torch.no_grad()
def test_dit_matches_diffusers(model):
    from models.checkpoints.stable_audio_3_dit import StableAudio3DiT, config_from_diffusers, from_diffusers

    transformer, _, _ = diffusers_modules(model, seed=3)
    config = config_from_diffusers(sa3_config(model, "tiny")["transformer"], model)
    dit = StableAudio3DiT(config).eval()
    dit.load_state_dict(from_diffusers(transformer.state_dict(), config, model), strict=True)
    x, context, mask, glob, local = _dit_inputs(1)
    errors = {}
    for t_val in (1.0, 0.4, 0.02):
        t = torch.full((2,), t_val)
        for name, kwargs in (("plain", {}), ("inpainting", {"local_add_cond": local})):
            ref = transformer(x, t, context, glob, encoder_attention_mask=mask, **kwargs).sample
            ours = dit(x, t, context, mask, glob, local_cond=kwargs.get("local_add_cond"))
            errors[name, t_val] = rel_err(ours, ref)
        ref = transformer(x, t, context, glob).sample  # no text mask: every position attended as given
        errors["unmasked", t_val] = rel_err(dit(x, t, context, None, glob), ref)
    assert max(errors.values()) < 1e-4, errors
    t = torch.tensor([0.7, 0.3])
    # a row without inpainting beside one with it: the plain row equals diffusers' run without local_add_cond
    mixed = local.clone()
    mixed[1] = 0
    ours = dit(x, t, context, mask, glob, local_cond=mixed)
    inpaint = transformer(x[:1], t[:1], context[:1], glob[:1], encoder_attention_mask=mask[:1],
                          local_add_cond=local[:1]).sample
    plain = transformer(x[1:], t[1:], context[1:], glob[1:], encoder_attention_mask=mask[1:]).sample
    assert rel_err(ours[:1], inpaint) < 1e-4 and rel_err(ours[1:], plain) < 1e-4
    assert rel_err(dit(x, t, context, mask, glob, local_cond=local)[1:], plain) > 1e-2  # the input matters
    # padded frames: a shorter row in a longer batch gives its solo output, its padding stays zero
    frames = torch.ones(2, 16, dtype=torch.bool)
    frames[1, 10:] = False
    ours = dit(x, t, context, mask, glob, frame_mask=frames, local_cond=local)
    solo = transformer(x[1:, :, :10], t[1:], context[1:], glob[1:], encoder_attention_mask=mask[1:],
                       local_add_cond=local[1:, :, :10]).sample
    assert rel_err(ours[1:, :, :10], solo) < 1e-4 and float(ours[1, :, 10:].abs().max()) == 0.0


@torch.no_grad()
def test_denoiser_assembles_the_pipelines_conditioning(sa3):
    """The project's denoiser call (T5Gemma states of each prompt's real tokens, seconds, the project's time) equals
    the transformer on the pipeline's own encode_prompt / encode_duration / prepare_cross_attention inputs."""
    pipe, bundle = sa3["pipe"], sa3["bundle"]
    seconds = [0.032, 0.5]
    text, text_mask = pipe.encode_prompt(PROMPTS, "cpu", 1)
    glob = torch.cat([pipe.encode_duration(s, "cpu", 1, 1) for s in seconds])
    context, context_mask = pipe.prepare_cross_attention(text, text_mask, glob)
    cond = bundle.pipeline.conditioning(PROMPTS, seconds)
    x = torch.randn(2, LATENT, 16, generator=torch.Generator().manual_seed(4))
    frame_mask = torch.ones(2, 16, dtype=torch.bool)
    errors = []
    for t_val in (1.0, 0.55, 0.05):
        t = torch.full((2,), t_val)
        ref = pipe.transformer(x, t, context, glob, encoder_attention_mask=context_mask).sample
        text_cond = cond.text
        ours = bundle.denoiser(x, t, text_cond.tokens, text_cond.mask, text_cond.pooled, cond.seconds, frame_mask)
        errors.append(rel_err(ours, ref))
        x0 = x - t[:, None, None] * ref  # the scheduler's x0 of a velocity
        errors.append(rel_err(bundle.pipeline.predict_x0(x, t, cond, torch.ones(2), frame_mask), x0))
    assert max(errors) < 1e-4, errors


@torch.no_grad()
def test_same_encoder_and_decoder_match_autoencoder_same(sa3):
    vae, codec = sa3["pipe"].vae, sa3["bundle"].codec
    g = torch.Generator().manual_seed(5)
    for samples in (16 * HOP, 13 * HOP + 5):  # a whole number of latents, and not
        wave = torch.randn(2, 2, samples, generator=g) * 0.3
        assert rel_err(codec.encode(wave), vae.encode(wave).latents) < 1e-4
    z = torch.randn(2, LATENT, 13, generator=g)
    assert rel_err(codec.decode(z), vae.decode(z).sample) < 1e-4


@torch.no_grad()
def test_seeded_text_to_audio_run_matches_the_pipeline(sa3, monkeypatch):
    """8 ping-pong steps: the pipeline gets the project's initial noise and the generator the project then draws its
    step noise from (each step's noise, the last one's too, from the same generator in the same order). Its grid of
    noise levels is the project's: the two agree to float32 rounding (checked), but the DiT's time features reach
    10^4 cycles per unit, so one float32 ulp of a noise level moves its output by ~1e-4 of a random network's."""
    from diffusers.pipelines.stable_audio_3 import pipeline_stable_audio_3 as reference_module

    pipe, bundle = sa3["pipe"], sa3["bundle"]
    seed, seconds = 77, 0.032  # 256 samples: 16 latent frames
    grid = bundle.pipeline.grid(8)
    published = reference_module.logsnr_sigma_schedule(8, -6.2, 2.0)
    assert max(abs(a - b) for a, b in zip(grid[:-1].tolist(), published)) < 1e-6
    monkeypatch.setattr(reference_module, "logsnr_sigma_schedule", lambda *args, **kw: grid[:-1].float().tolist())

    def reference(output_type: str) -> torch.Tensor:
        noise, generator = initial_noise(LATENT, seed, 16)
        return pipe(PROMPTS[1], duration=seconds, generator=generator, latents=noise[None],
                    output_type=output_type).audios[0]

    latents = bundle.pipeline.generate_latents([PROMPTS[1]], [seconds], [seed])[0]
    assert rel_err(latents, reference("latent")) < 1e-4
    audio, audio_ref = bundle.pipeline.decode([latents], [seconds])[0], reference("pt")
    assert audio.shape == audio_ref.shape == (2, 256)
    assert rel_err(audio.clamp(-1, 1), audio_ref) < 1e-4  # the pipeline clamps its output to [-1, 1]
    other = bundle.pipeline.generate_latents([PROMPTS[1]], [seconds], [seed + 1])[0]
    assert rel_err(other, latents) > 1e-1  # the seed matters: the comparison can fail


@pytest.mark.parametrize("mode", ["audio-to-audio", "inpainting"])
@torch.no_grad()
def test_seeded_audio_to_audio_and_inpainting_runs_match_the_pipelines(sa3, mode, monkeypatch):
    """The other two pipelines on the same components: audio-to-audio from init_noise_level 0.6 (the full step count
    on the grid compressed into [0.6, 0], its first two times not monotonic, as the references have it) and
    inpainting 8 .. 20 ms of a 32 ms clip (the trained inpainting input, from pure noise)."""
    from diffusers import StableAudio3AudioToAudioPipeline, StableAudio3InpaintPipeline
    from diffusers.pipelines.stable_audio_3 import pipeline_stable_audio_3_audio2audio as a2a_module
    from diffusers.pipelines.stable_audio_3 import pipeline_stable_audio_3_inpaint as inpaint_module

    from models.pipeline import SampleRequest

    pipe, bundle = sa3["pipe"], sa3["bundle"]
    seed, seconds, level, span = 5, 0.032, 0.6, (0.008, 0.02)
    wave = torch.randn(2, 256, generator=torch.Generator().manual_seed(3)) * 0.3
    noise, generator = initial_noise(LATENT, seed, 16)
    if mode == "audio-to-audio":
        grid, module = bundle.pipeline.grid(8, level), a2a_module
        published = module.logsnr_sigma_schedule(8, -6.2, 2.0, sigma_max=level)
        reference = StableAudio3AudioToAudioPipeline(**pipe.components)
        kwargs = {"init_noise_level": level}
        request = SampleRequest(PROMPTS[0], seconds, 8, 1.0, seed, init_audio=wave, init_noise_level=level)
    else:
        grid, module = bundle.pipeline.grid(8), inpaint_module
        published = module.logsnr_sigma_schedule(8, -6.2, 2.0)
        reference = StableAudio3InpaintPipeline(**pipe.components)
        kwargs = {"mask_start_seconds": span[0], "mask_end_seconds": span[1]}
        request = SampleRequest(PROMPTS[0], seconds, 8, 1.0, seed, init_audio=wave, inpaint=span)
    assert max(abs(a - b) for a, b in zip(grid[:-1].tolist(), published)) < 1e-6
    monkeypatch.setattr(module, "logsnr_sigma_schedule", lambda *args, **kw: grid[:-1].float().tolist())
    reference.set_progress_bar_config(disable=True)
    latents_ref = reference(PROMPTS[0], audio=wave[None], duration=seconds, generator=generator, latents=noise[None],
                            output_type="latent", **kwargs).audios[0]
    trajectories = bundle.pipeline.start([request])
    bundle.pipeline.run(trajectories)
    assert rel_err(trajectories[0].z, latents_ref) < 1e-4
    plain = bundle.pipeline.generate_latents([PROMPTS[0]], [seconds], [seed])[0]
    assert rel_err(plain, latents_ref) > 1e-1  # the init clip matters


def test_stabilitys_own_layout_loads_the_same_model(sa3, tmp_path):
    """The same weights as Stability's repository stores them (one model.safetensors under the reference's names,
    its model_config.json, the T5Gemma beside it) compute what the diffusers layout computes."""
    bundle = sa3["bundle"]
    plan = native.read_plan(native.model_config(_plan_of(bundle)), "test")[0]
    root = tmp_path / "stable-audio-3-medium-native"
    write_native(root, bundle, plan, sa3["root"])
    assert detect_format(root) == "stable-audio-3"
    other = load_checkpoint_dir(root)
    assert other.source_format == "stable-audio-3 (stable-audio-3 layout)"
    assert other.config.sampler_options == bundle.config.sampler_options
    x, _, _, _, local = _dit_inputs(6)
    frames = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        for b in (bundle, other):
            cond = b.pipeline.conditioning(PROMPTS, [0.032, 0.5])
            t = cond.text
            b.out = b.denoiser(x, torch.tensor([0.8, 0.3]), t.tokens, t.mask, t.pooled, cond.seconds, frames,
                               local_cond=local)
            b.wave = b.codec.decode(x)
    assert rel_err(other.out, bundle.out) < 1e-6 and rel_err(other.wave, bundle.wave) < 1e-6


def _plan_of(bundle):
    from models.checkpoints.format_stable_audio_3 import read_diffusers_plan

    return read_diffusers_plan(bundle.path)


def write_native(root: Path, bundle, plan, diffusers_root: Path) -> None:
    """``bundle``'s networks in Stability's layout, the T5Gemma of ``diffusers_root`` beside them."""
    from safetensors.torch import save_file

    from models.checkpoints.stable_audio_3 import Parts

    parts = Parts(plan)
    parts.dit.load_state_dict(bundle.denoiser.dit.state_dict())
    parts.duration.load_state_dict(bundle.denoiser.duration.state_dict())
    parts.codec.load_state_dict(bundle.codec.state_dict())
    root.mkdir(parents=True)
    (root / "model_config.json").write_text(json.dumps(native.model_config(plan), indent=2))
    save_file(native.checkpoint_state(parts, plan), str(root / "model.safetensors"))
    shutil.copytree(diffusers_root / "text_encoder", root / "text_encoder")
    shutil.copytree(diffusers_root / "tokenizer", root / "tokenizer")


def _copy(sa3, tmp_path: Path) -> Path:
    root = tmp_path / "stable-audio-3-copy"
    shutil.copytree(sa3["root"], root)
    return root


def _edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@torch.no_grad()
def test_scheduler_config_sets_the_dits_time_and_the_models_kind(sa3, tmp_path):
    """diffusers hands the DiT its scheduler's timesteps (the noise level x num_train_timesteps); a scheduler that is
    not stochastic is the base model's (deterministic Euler: the project's DDIM on rectified flow, 100 steps)."""
    root = _copy(sa3, tmp_path)
    _edit_json(root / "scheduler" / "scheduler_config.json", num_train_timesteps=1000, stochastic_sampling=False)
    bundle = load_checkpoint_dir(root, text_encoder=sa3["bundle"].text_encoder)
    c = bundle.config
    assert (c.kind, c.sampler, c.default_steps, c.sampler_options) == ("teacher", "ddim", 100, {})
    x, context, mask, glob, _ = _dit_inputs(8)
    t = torch.tensor([0.9, 0.2])
    cond = bundle.pipeline.conditioning(PROMPTS, [0.032, 0.032])
    ours = bundle.denoiser(x, t, cond.text.tokens, cond.text.mask, cond.text.pooled, cond.seconds,
                           torch.ones(2, 16, dtype=torch.bool))
    context, context_mask, glob = bundle.denoiser.conditioning(cond.text.tokens, cond.text.mask, cond.seconds)
    ref = sa3["pipe"].transformer(x, t * 1000, context, glob, encoder_attention_mask=context_mask).sample
    assert rel_err(ours, ref) < 1e-4


def test_weights_that_do_not_fit_name_the_file_and_the_tensor(sa3, tmp_path):
    from safetensors.torch import load_file, save_file

    root = _copy(sa3, tmp_path)
    file = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["transformer_blocks.0.to_scale_shift_gate"] = state["transformer_blocks.0.to_scale_shift_gate"][:-1]
    del state["transformer_blocks.1.ff.proj_out.bias"]
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors.*transformer_blocks\.1\.ff\."
                                              r"proj_out\.bias.*transformer_blocks\.0\.to_scale_shift_gate"):
        load_checkpoint_dir(root, text_encoder=sa3["bundle"].text_encoder)


def test_options_that_would_change_the_model_are_refused_by_name(sa3, tmp_path):
    root = _copy(sa3, tmp_path)
    _edit_json(root / "scheduler" / "scheduler_config.json", shift=3.0)
    with pytest.raises(CheckpointError, match="shift=3.0 is not supported"):
        load_checkpoint_dir(root)
    config = native.model_config(_plan_of(sa3["bundle"]))
    config["model"]["diffusion"]["config"]["timestep_features_type"] = "learned"
    with pytest.raises(CheckpointError, match="timestep_features_type='learned' is not supported"):
        native.read_plan(config, "model_config.json")
    config = native.model_config(_plan_of(sa3["bundle"]))
    config["model"]["diffusion"]["local_add_cond_ids"] = list(reversed(native.LOCAL_IDS))
    with pytest.raises(CheckpointError, match="local_add_cond_ids"):
        native.read_plan(config, "model_config.json")


@torch.no_grad()
def test_a_checkpoint_that_holds_its_own_text_encoder_uses_it(sa3, tmp_path):
    """Stability's layout may carry the T5Gemma encoder's weights under its prompt conditioner; they replace the
    folder's, fitted strictly."""
    from safetensors.torch import load_file, save_file

    bundle = sa3["bundle"]
    root = tmp_path / "native"
    write_native(root, bundle, native.read_plan(native.model_config(_plan_of(bundle)), "test")[0], sa3["root"])
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
             for k, v in bundle.text_encoder.encoder.model.state_dict().items()}
    state = load_file(root / "model.safetensors")
    state.update({f"conditioner.conditioners.prompt.model.{k}": v.contiguous() for k, v in tuned.items()})
    save_file(state, root / "model.safetensors")
    loaded = load_checkpoint_dir(root).text_encoder.encoder.model.state_dict()
    assert all(torch.equal(loaded[k], tuned[k]) for k in tuned)
    state["conditioner.conditioners.prompt.model.encoder.extra.weight"] = torch.zeros(2)
    save_file(state, root / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*encoder\.extra\.weight"):
        load_checkpoint_dir(root)


# Published sizes, counted on the meta device. The DiT counts include the per-block inpainting MLP (to_local_embed:
# 26.3 M in Small, 66.1 M in Medium); without it they are the published 433 M and 1.39 B.
PUBLISHED = {"sa3-small": {"dit": 459_131_648, "vae_encoder": 53_728_024, "vae_decoder": 53_728_792},
             "sa3-medium": {"dit": 1_453_170_944, "vae_encoder": 426_062_128, "vae_decoder": 426_062_896}}


@pytest.mark.parametrize("model", ["sa3-small", "sa3-medium"])
def test_full_size_shapes_are_accepted_on_the_meta_device(model):
    """The full-size modules count what diffusers' own do, and their weights under diffusers' names and Stability's
    fit the loaders (no weight is allocated)."""
    from models.checkpoints.sized_stable_audio_3 import diffusers_components
    from models.checkpoints.stable_audio_3_dit import duration_from_diffusers
    from models.checkpoints.stable_audio_3_dit import from_diffusers as dit_from_diffusers
    from models.checkpoints.same_autoencoder import from_diffusers as same_from_diffusers
    from models.checkpoints.weights import check_fit, expected_shapes, tensor_shapes

    counts = sized_parameter_counts(model)
    assert {k: counts[k] for k in PUBLISHED[model]} == PUBLISHED[model]
    assert counts["text_encoder"] == 281_580_288  # T5Gemma-b's encoder (256000 x 768 embeddings: 197 M of it)
    no_local = counts["dit"] - sum(p.numel() for n, p in build(model, device="meta")[1].dit.named_parameters()
                                   if ".to_local_embed." in n)
    assert round(no_local / 1e6) == {"sa3-small": 433, "sa3-medium": 1387}[model]
    diffusers = importlib.import_module("diffusers") if importlib.util.find_spec("diffusers") else None
    if hasattr(diffusers, "StableAudio3DiTModel"):
        with torch.device("meta"):
            ref = diffusers.StableAudio3DiTModel(**sa3_config(model)["transformer"])
            vae = diffusers.AutoencoderSAME(**sa3_config(model)["vae"])
        assert sum(p.numel() for p in ref.parameters()) == counts["dit"]
        folded = sum(p.numel() for n, p in vae.named_parameters() if not n.endswith("weight_g"))  # weight norm's g
        assert folded == counts["vae_encoder"] + counts["vae_decoder"]
    plan, parts, _ = build(model, device="meta")
    assert plan.max_duration == pytest.approx({"sa3-small": 120.0, "sa3-medium": 4096 * 4096 / 44100}[model])
    expected = expected_shapes(parts)
    written = diffusers_components(plan, parts, model, "full")
    found = {**{"dit." + k: v for k, v in dit_from_diffusers(written["transformer"][1], plan.dit, model).items()},
             **{"codec." + k: v for k, v in same_from_diffusers(written["vae"][1]).items()},
             **{"duration." + k: v for k, v in duration_from_diffusers(written["duration_embedder"][1], 256,
                                                                       model).items()}}
    check_fit(expected, tensor_shapes(found), model, "diffusers layout")
    state, _ = native.translate(native.checkpoint_state(parts, plan), plan,
                                {"text": "prompt", "seconds": "seconds_total"}, model, {})
    check_fit(expected, tensor_shapes(state), model, "Stability layout")


def test_tiny_random_checkpoint_is_served_and_loads_in_diffusers_too(tmp_path):
    """``tta sized sa3-small --scale tiny``: found by the registry, served through the service's loader, and the same
    directory loads in diffusers' StableAudio3Pipeline (the benchmark runs both on it)."""
    from models.registry import available_models
    from service.app import load_model
    from service.settings import Settings

    with float32_default():
        root = tmp_path / "zoo" / "sa3-small-sized"
        counts = write_random_checkpoint(root, "sa3-small", scale="tiny", seed=3)
    assert describe("sa3-small") == "Stable Audio 3 Small (diffusers StableAudio3Pipeline layout)"
    assert detect_format(root) == "stable-audio-3" and available_models(root.parent) == [root]
    with pytest.raises(FileExistsError):
        write_random_checkpoint(root, "sa3-small", scale="tiny")
    settings = Settings(_env_file=None, model_dir=root.parent, default_model=root.name, threads=1,
                        log_level="warning")
    rt = load_model(root, settings)
    b = rt.bundle
    assert (b.config.sampler, b.config.default_steps) == ("pingpong", 8)
    assert b.config.max_duration == pytest.approx(4096 * HOP / SR)  # the tiny scale's 4096 latent frames
    assert "RANDOM weights" in b.config.description
    assert counts["dit"] == sum(p.numel() for p in b.denoiser.dit.parameters())
    wave = b.pipeline.generate(["rain on a tin roof"], [0.032], [0])[0]
    assert wave.shape == (2, 256) and bool(torch.isfinite(wave).all()) and float(wave.abs().max()) > 0
    if importlib.util.find_spec("diffusers") is None:
        return  # the reference's half of the test (the checkpoint extra)
    import diffusers

    if hasattr(diffusers, "StableAudio3Pipeline"):
        pipe = diffusers.StableAudio3Pipeline.from_pretrained(root, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        audio = pipe("rain on a tin roof", duration=0.032, generator=torch.Generator().manual_seed(0)).audios[0]
        assert audio.shape == (2, 256) and bool(torch.isfinite(audio).all())


# ------------------------------------------------------------------------------------------ per-request results
@torch.no_grad()
def test_a_requests_conditioning_is_computed_once_and_changes_nothing(sa3):
    """The conditioning's cross-attention keys and values (and the inpainting input's block embeddings) are computed
    once per request and kept while its batch lives (``RequestCache``): with samples joining and leaving between
    steps, every sample's latents equal those of a run that computes them at every step, and each request's part was
    computed once (a joining sample costs its own row; a leaving one a gather)."""
    from models.pipeline import SampleRequest

    bundle = sa3["bundle"]
    denoiser, pipeline = bundle.denoiser, bundle.pipeline
    wave = torch.randn(2, 256, generator=torch.Generator().manual_seed(8)) * 0.3
    requests = [SampleRequest(PROMPTS[0], 0.032, 5, 1.0, 1),
                SampleRequest(PROMPTS[1], 0.024, 8, 1.0, 2, init_audio=wave, inpaint=(0.008, 0.016)),
                SampleRequest(PROMPTS[1], 0.032, 6, 1.0, 3)]

    def run(cached: bool) -> list[torch.Tensor]:
        denoiser.cache_requests = cached
        denoiser.request_cache.clear()
        return join_and_leave(pipeline, requests)

    try:
        with float32_default():
            reference = run(cached=False)
            before = (denoiser.request_cache.computed_rows, denoiser.local_cache.computed_rows)
            got = run(cached=True)
    finally:
        denoiser.cache_requests = True
    for x, y in zip(got, reference):
        assert rel_err(x, y) < 1e-6
    cache = denoiser.request_cache
    assert cache.computed_rows - before[0] == 3 and cache.hits > 0 and cache.row_hits > 0  # each request once
    assert denoiser.local_cache.computed_rows - before[1] <= 4 and denoiser.local_cache.row_hits > 0


def test_kept_conditioning_follows_the_weights_and_stays_out_of_training(sa3):
    """A kept result is valid for the weights it was made with (an in-place change, such as an optimiser step, makes
    it stale even for the same input tensors); with gradients nothing is kept and the context's projections get
    their gradients; a copied module starts empty."""
    import copy

    bundle = sa3["bundle"]
    with float32_default():
        denoiser = copy.deepcopy(bundle.denoiser)
        assert denoiser.request_cache is not bundle.denoiser.request_cache and denoiser.request_cache.hits == 0
        text = bundle.encode_text(PROMPTS)
        g = torch.Generator().manual_seed(9)
        z, t, seconds = torch.randn(2, LATENT, 16, generator=g), torch.tensor([0.7, 0.2]), torch.tensor([0.03, 0.02])
        args = (z, t, text.tokens, text.mask, text.pooled, seconds)
        with torch.no_grad():
            first = denoiser(*args)
            assert torch.equal(denoiser(*args), first) and denoiser.request_cache.hits == 1
            denoiser.dit.transformer_blocks[0].cross_attn.to_kv.weight.mul_(1.5)
            second = denoiser(*args)
            denoiser.cache_requests = False
            uncached = denoiser(*args)
            denoiser.cache_requests = True
        assert torch.equal(second, uncached) and rel_err(second, first) > 1e-3
        counts = (denoiser.request_cache.hits, denoiser.request_cache.row_hits, denoiser.request_cache.computed_rows)
        denoiser(*args).square().mean().backward()
    assert (denoiser.request_cache.hits, denoiser.request_cache.row_hits,
            denoiser.request_cache.computed_rows) == counts
    assert denoiser.dit.transformer_blocks[0].cross_attn.to_kv.weight.grad.abs().max() > 0


@pytest.mark.slow
def test_the_speed_benchmark_runs_every_runner_side_by_side(tmp_path):
    """``python -m benchmarks.sa3_speed --smoke`` on a tiny checkpoint: diffusers' pipeline, the torch and the ONNX
    Runtime runtimes each in its own process, with end-to-end timings, the stage profile, the peak RSS and the load
    average in the JSON and the Markdown table."""
    pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")
    diffusers = pytest.importorskip("diffusers", reason=EXTRA)
    if not hasattr(diffusers, "StableAudio3Pipeline"):
        pytest.skip(EXTRA)
    from benchmarks.sa3_speed import main

    with float32_default():
        root = tmp_path / "sa3-small-sized"
        write_random_checkpoint(root, "sa3-small", scale="tiny", seed=3)
        data = main(["--model", str(root), "--smoke", "--results-dir", str(tmp_path / "results")])
    assert not data["failed"] and [r["runner"] for r in data["results"]] == ["diffusers", "torch", "onnxruntime"]
    for r in data["results"]:
        assert r["end_to_end"]["median_s"] > 0 and r["peak_rss_mb"] > 0 and r["load_average"][0]["start"]
        assert r["stages"]["denoiser_step"]["median_s"] > 0 and r["stages"]["decode"]["median_s"] > 0
        assert (r["stages"]["request_part"] is None) == (r["runner"] == "diffusers")
    md = (tmp_path / "results" / "sa3-speed-smoke.md").read_text()
    assert "speed-up vs diffusers" in md and "peak RSS MB" in md and "load average" in md
