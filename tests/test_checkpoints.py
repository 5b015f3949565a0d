"""Checkpoint formats: for each public model family the reference implementation is built with its published
configuration scaled down for CPU (random weights), saved in its native format, loaded through
``models.checkpoints``, and must compute the same thing: denoiser outputs within 1e-4 relative (float32) and a full
sampling run with a fixed seed equal to the reference sampler's audio.

References: stable-audio-tools (PyPI) for Stable Audio Open Small, diffusers' StableAudioPipeline for Stable Audio
Open 1.0, diffusers' UNet2DConditionModel / AutoencoderKL + transformers' SpeechT5HifiGan + T5 for Tango (driven by
Tango's published inference loop). They come from the optional ``checkpoints`` extra; without it these tests skip.
"""
from __future__ import annotations

import ast
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import float32_default
from pipeline_support import join_and_leave

from models.checkpoints import CheckpointError, detect_format, load_checkpoint_dir
from models.checkpoints import format_stable_audio_tools as sat_format
from models.checkpoints.reference_configs import sao_1_config, sao_small_config

EXTRA = ("reference implementations missing: make install-test installs them (pip install -e '.[checkpoints]', then "
         "pip install --no-deps stable-audio-tools==0.0.19)")
WORDS = ["<pad>", "</s>", "<unk>", "a", "dog", "barks", "rain", "on", "the", "roof", "warm", "arpeggios", "house",
         "beats", "120bpm", "with", "drums", "soft", "pad", "and", "birds", "sing", "loud", "engine"]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (the references zero-initialise output layers, which would make parity trivial):
    matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), other vectors ~ N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise / math.sqrt(max(1, p[0].numel())))
            elif bool((p == 1).all()):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module


def make_tokenizer(max_length: int):
    """A word-level tokenizer that ends every prompt with </s>, as T5's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def make_t5(d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(WORDS), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2)
    return T5EncoderModel(cfg).eval()


# ------------------------------------------------------------------------------------------- stable-audio-tools
def sat_definitions(relpath: str, names: list[str]) -> dict:
    """Definitions from a stable-audio-tools module file, executed unchanged. Some of its modules import heavy
    optional packages at the top (torchaudio, k-diffusion, gradio) that the pieces used here never touch; the
    module's own imports run where they can, and only the named classes and functions are defined."""
    pkg = importlib.import_module("stable_audio_tools")
    file = Path(pkg.__file__).parent / relpath
    tree = ast.parse(file.read_text())
    package = "stable_audio_tools." + ".".join(Path(relpath).with_suffix("").parts[:-1])
    ns: dict = {"__name__": f"stable_audio_tools_reference.{relpath}", "__package__": package.rstrip(".")}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            try:
                exec(compile(ast.Module(body=[node], type_ignores=[]), str(file), "exec"), ns)  # noqa: S102 - the reference's own import
            except ImportError:
                pass
    wanted = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in names]
    missing = set(names) - {n.name for n in wanted}
    assert not missing, f"{file} no longer defines {missing}"
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(file), "exec"), ns)  # noqa: S102 - reference code
    return ns


def sat_reference_classes() -> dict:
    pytest.importorskip("stable_audio_tools", reason=EXTRA)
    ns: dict = {}
    ns.update(sat_definitions("models/pretransforms.py", ["Pretransform", "AutoencoderPretransform"]))
    ns.update(sat_definitions("models/adp.py", ["LearnedPositionalEmbedding", "TimePositionalEmbedding",
                                                 "NumberEmbedder"]))
    auto = sat_definitions("models/autoencoders.py", [
        "WNConv1d", "WNConvTranspose1d", "checkpoint", "get_activation", "ResidualUnit", "EncoderBlock",
        "DecoderBlock", "OobleckEncoder", "OobleckDecoder", "AudioAutoencoder", "create_encoder_from_config",
        "create_decoder_from_config", "create_autoencoder_from_config"])
    auto["Pretransform"] = ns["Pretransform"]
    ns.update(auto)
    cond = sat_definitions("models/conditioners.py", ["Conditioner", "NumberConditioner", "T5Conditioner",
                                                      "MultiConditioner"])
    cond["NumberEmbedder"] = ns["NumberEmbedder"]
    ns.update(cond)
    ns.update(sat_definitions("models/diffusion.py", ["ConditionedDiffusionModel", "ConditionedDiffusionModelWrapper",
                                                       "DiTWrapper"]))
    ns.update(sat_definitions("inference/sampling.py", ["sample_rf", "sample_flow_pingpong"]))
    return ns


def build_sat_reference(ns: dict, cfg: dict, tokenizer=None, t5=None):
    """stable-audio-tools' ConditionedDiffusionModelWrapper for ``cfg``, assembled as its factory does."""
    model = cfg["model"]
    diffusion = model["diffusion"]
    dit = ns["DiTWrapper"](diffusion_objective=diffusion["diffusion_objective"], **diffusion["config"])
    conditioners = {}
    cond_dim = model["conditioning"]["cond_dim"]
    for c in model["conditioning"]["configs"]:
        if c["type"] == "number":
            conditioners[c["id"]] = ns["NumberConditioner"](cond_dim, **c["config"])
        else:  # T5Conditioner downloads its model by name; give it the local tiny T5 instead, otherwise unchanged
            t5c = ns["T5Conditioner"].__new__(ns["T5Conditioner"])
            ns["Conditioner"].__init__(t5c, t5.config.d_model if t5 is not None else cond_dim, cond_dim)
            t5c.max_length, t5c.enable_grad, t5c.tokenizer = c["config"]["max_length"], False, tokenizer
            t5c.__dict__["model"] = t5
            conditioners[c["id"]] = t5c
    conditioner = ns["MultiConditioner"](conditioners)
    pt = model["pretransform"]
    autoencoder = ns["create_autoencoder_from_config"]({"sample_rate": cfg["sample_rate"], "model": pt["config"]})
    pretransform = ns["AutoencoderPretransform"](autoencoder, scale=pt.get("scale", 1.0), model_half=False)
    return ns["ConditionedDiffusionModelWrapper"](
        dit, conditioner, io_channels=model["io_channels"], sample_rate=cfg["sample_rate"],
        min_input_length=pretransform.downsampling_ratio, diffusion_objective=diffusion["diffusion_objective"],
        pretransform=pretransform, cross_attn_cond_ids=diffusion["cross_attention_cond_ids"],
        global_cond_ids=diffusion["global_cond_ids"])


@pytest.fixture(scope="module")
def sao_small(tmp_path_factory):
    """A tiny Stable Audio Open Small saved as stable-audio-tools saves it, and its reference objects."""
    ns = sat_reference_classes()
    with float32_default():
        cfg = sao_small_config("tiny")
        tokenizer, t5 = make_tokenizer(64), make_t5(32, seed=1)
        torch.manual_seed(0)
        ref = randomize(build_sat_reference(ns, cfg, tokenizer, t5), seed=2).eval()
        root = tmp_path_factory.mktemp("sao-small")
        (root / "model_config.json").write_text(json.dumps(cfg, indent=2))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, root / "model.safetensors")
        tokenizer.save_pretrained(root / "text_encoder")
        t5.save_pretrained(root / "text_encoder")
        bundle = load_checkpoint_dir(root)
    return {"ns": ns, "cfg": cfg, "ref": ref, "root": root, "bundle": bundle}


def test_sao_small_is_recognised_and_served_with_its_defaults(sao_small):
    b = sao_small["bundle"]
    assert detect_format(sao_small["root"]) == "stable-audio-tools"
    assert (b.config.sampler, b.config.default_steps, b.config.default_guidance) == ("pingpong", 8, 1.0)
    assert b.schedule.name == "rectified-flow" and b.pipeline.parameterization.name == "rf-velocity"
    assert b.codec.sample_rate == 8000 and b.codec.samples_per_latent == 8 and b.codec.latent_dim == 8
    assert b.config.max_duration == pytest.approx(128 / 8000)


def _sat_conditioning(sao_small, prompts, seconds):
    ref = sao_small["ref"]
    meta = [{"prompt": p, "seconds_total": s} for p, s in zip(prompts, seconds)]
    return ref.get_conditioning_inputs(ref.conditioner(meta, "cpu"))


@torch.no_grad()
def test_sao_small_denoiser_matches_stable_audio_tools(sao_small):
    ref, bundle = sao_small["ref"], sao_small["bundle"]
    prompts, seconds = ["warm arpeggios on house beats 120bpm with drums", "rain on the roof"], [0.012, 0.016]
    inputs = _sat_conditioning(sao_small, prompts, seconds)
    cond = bundle.pipeline.conditioning(prompts, seconds)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 8, 16, generator=g)
    frame_mask = torch.ones(2, 16, dtype=torch.bool)
    errors = []
    for t_val in (0.97, 0.5, 0.04):
        t = torch.full((2,), t_val)
        v_ref = ref.model(z, t, **inputs, cfg_scale=1.0)
        v_ours = bundle.denoiser(z, t, cond.text.tokens, cond.text.mask, cond.text.pooled, cond.seconds, frame_mask)
        errors.append(rel_err(v_ours, v_ref))
        x0 = bundle.pipeline.predict_x0(z, t, cond, torch.ones(2), frame_mask)
        errors.append(rel_err(x0, z - t[:, None, None] * v_ref))
    assert max(errors) < 1e-4, errors
    # guided: the reference's CFG runs the unconditional branch with the whole cross-attention input zeroed (the
    # global condition kept); the bundle's extra unconditional rows must reproduce it, at per-sample scales
    t = torch.full((2,), 0.6)
    ours = bundle.pipeline.predict_x0(z, t, cond, torch.tensor([3.0, 1.5]), frame_mask)
    for row, w in ((0, 3.0), (1, 1.5)):
        v_ref = ref.model(z, t, **inputs, cfg_scale=w)
        assert rel_err(ours[row], (z - 0.6 * v_ref)[row]) < 1e-4


@torch.no_grad()
def test_sao_small_pingpong_run_matches_the_reference_sampler(sao_small):
    ns, ref, bundle = sao_small["ns"], sao_small["ref"], sao_small["bundle"]
    prompt, seconds, seed, frames = "soft pad and birds sing", 0.016, 1234, 16
    inputs = _sat_conditioning(sao_small, [prompt], [seconds])
    torch.manual_seed(seed)  # generate_diffusion_cond's recipe: seed, then the initial noise, then per-step noise
    noise = torch.randn([1, 8, frames])
    latents_ref = ns["sample_rf"](ref.model, noise, steps=8, sampler_type="pingpong", **inputs, cfg_scale=1.0,
                                  batch_cfg=True)
    audio_ref = ref.pretransform.decode(latents_ref)[0]
    latents = bundle.pipeline.generate_latents([prompt], [seconds], [seed], steps=bundle.config.default_steps)[0]
    audio = bundle.pipeline.decode([latents], [seconds])[0]
    assert latents.shape == latents_ref[0].shape and audio.shape == audio_ref.shape == (2, 128)
    assert rel_err(latents, latents_ref[0]) < 1e-4
    assert rel_err(audio, audio_ref) < 1e-4
    other = bundle.pipeline.generate_latents([prompt], [seconds], [seed + 1], steps=8)[0]
    assert rel_err(other, latents_ref[0]) > 1e-2  # the comparison can fail: another seed is far away


@torch.no_grad()
def test_sao_small_batches_of_different_lengths_match_solo_runs(sao_small):
    bundle = sao_small["bundle"]
    prompts, seconds, seeds = ["a dog barks", "loud engine"], [0.016, 0.008], [5, 6]
    together = bundle.pipeline.generate_latents(prompts, seconds, seeds, steps=3)
    for i in range(2):
        alone = bundle.pipeline.generate_latents([prompts[i]], [seconds[i]], [seeds[i]], steps=3)[0]
        assert together[i].shape == alone.shape
        assert rel_err(together[i], alone) < 1e-4


@torch.no_grad()
def test_sao_keeps_each_requests_keys_and_values_and_changes_nothing(sao_small):
    """The conditioning's cross-attention keys and values and the projected global condition are computed once per
    request and kept while its batch lives (``RequestCache``): with samples joining and leaving between steps, and
    guided rows beside unguided ones, every sample's latents equal those of a run that computes them at every step;
    an in-place change of the weights makes what was kept stale."""
    from models.pipeline import SampleRequest

    bundle = sao_small["bundle"]
    denoiser, pipeline = bundle.denoiser, bundle.pipeline
    requests = [SampleRequest("a dog barks", 0.016, 5, 1.0, 1), SampleRequest("rain on the roof", 0.012, 8, 2.5, 2),
                SampleRequest("loud engine", 0.016, 6, 1.0, 3)]

    def run(cached: bool) -> list[torch.Tensor]:
        denoiser.cache_requests = cached
        denoiser.request_cache.clear()
        return join_and_leave(pipeline, requests)

    try:
        reference = run(cached=False)
        before = denoiser.request_cache.computed_rows
        got = run(cached=True)
    finally:
        denoiser.cache_requests = True
    for x, y in zip(got, reference):
        assert rel_err(x, y) < 1e-5  # float32 rounding: a kept row was computed in a batch of other rows
    cache = denoiser.request_cache
    # each request's conditional row once, and the guided request's unconditional row once
    assert cache.computed_rows - before == 4 and cache.hits > 0 and cache.row_hits > 0

    cond = pipeline.conditioning(["a dog barks"], [0.016])
    z, t = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(4)), torch.tensor([0.6])
    args = (z, t, cond.text.tokens, cond.text.mask, cond.text.pooled, cond.seconds)
    first = denoiser(*args)
    layer = denoiser.dit.layers[0].cross_attn.to_kv
    saved = layer.weight.clone()
    try:
        layer.weight.mul_(1.5)
        changed = denoiser(*args)
        denoiser.cache_requests = False
        assert torch.equal(changed, denoiser(*args)) and rel_err(changed, first) > 1e-3
    finally:
        denoiser.cache_requests = True
        layer.weight.copy_(saved)


def test_full_size_sao_small_shapes_are_accepted(sao_small):
    """Stable Audio Open Small at full size (about 341M DiT parameters), built on the meta device by the reference
    and by the loader: every weight name and shape of the reference fits."""
    ns = sao_small["ns"]
    cfg = sao_small_config("full")
    with torch.device("meta"):
        ref = build_sat_reference(ns, cfg)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    parts = sat_format.validate_shapes(cfg, shapes)
    n_ref = sum(p.numel() for p in ref.model.parameters())
    assert 340e6 < n_ref < 342e6, n_ref  # "about 341M"
    # the reference keeps its block LayerNorms' zero biases as buffers; here they are (zero-loaded) parameters
    fixed = sum(p.numel() for n, p in parts.dit.named_parameters()
                if n.endswith(("pre_norm.bias", "cross_attend_norm.bias", "ff_norm.bias")))
    assert sum(p.numel() for p in parts.dit.parameters()) - fixed == n_ref
    broken = dict(shapes)
    broken["model.model.transformer.layers.3.cross_attn.to_kv.weight"] = (2048, 512)
    with pytest.raises(CheckpointError, match=r"layers\.3\.cross_attn\.to_kv\.weight: file \(2048, 512\)"):
        sat_format.validate_shapes(cfg, broken)


@torch.no_grad()
def test_sao_small_oobleck_matches_stable_audio_tools(sao_small):
    ref, codec = sao_small["ref"], sao_small["bundle"].codec
    g = torch.Generator().manual_seed(8)
    wave = torch.randn(2, 2, 128, generator=g) * 0.3
    mean_ref = ref.pretransform.model.encoder(wave).chunk(2, dim=1)[0]  # the VAE bottleneck samples around this
    assert rel_err(codec.encode(wave), mean_ref) < 1e-4
    z = torch.randn(2, 8, 16, generator=g)
    assert rel_err(codec.decode(z), ref.pretransform.decode(z)) < 1e-4


def sao_1_sat_config() -> dict:
    """Stable Audio Open 1.0's structure in stable-audio-tools' own format, scaled down: v objective, seconds_start
    and seconds_total in both the cross-attention input and the global condition, unprojected conditioning tokens
    narrower than the model (grouped-query cross-attention), a T5 wider than cond_dim (projected), no QK norm."""
    return sao_1_config("tiny")


@torch.no_grad()
def test_sao_1_in_stable_audio_tools_format_matches_its_v_sampler(sao_small, tmp_path):
    """The v-objective branch of the stable-audio-tools format against the reference DiT and stable-audio-tools'
    own v-diffusion DDIM sampler (``sample``, eta 0), run on the project's grid through its dist_shift hook."""
    from safetensors.torch import save_file

    ns = sao_small["ns"] | sat_definitions("inference/sampling.py", ["sample", "alpha_sigma_to_t",
                                                                     "get_alphas_sigmas"])
    cfg = sao_1_sat_config()
    tokenizer, t5 = make_tokenizer(64), make_t5(32, seed=4)
    torch.manual_seed(0)
    ref = randomize(build_sat_reference(ns, cfg, tokenizer, t5), seed=5).eval()
    root = tmp_path / "sao-1-sat"
    root.mkdir()
    (root / "model_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, root / "model.safetensors")
    tokenizer.save_pretrained(root / "text_encoder")
    t5.save_pretrained(root / "text_encoder")
    (root / "serving.json").write_text(json.dumps({"default_steps": 5, "default_guidance": 4.0}))
    bundle = load_checkpoint_dir(root)
    assert (bundle.config.sampler, bundle.config.default_steps, bundle.config.default_guidance) == ("ddim", 5, 4.0)

    prompts, seconds = ["birds sing", "a dog barks on the roof"], [0.016, 0.008]
    meta = [{"prompt": p, "seconds_start": 0.0, "seconds_total": s} for p, s in zip(prompts, seconds)]
    inputs = ref.get_conditioning_inputs(ref.conditioner(meta, "cpu"))
    cond = bundle.pipeline.conditioning(prompts, seconds)
    z = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    frame_mask = torch.ones(2, 16, dtype=torch.bool)
    errors = []
    for t_val in (1.0, 0.6, 0.1):
        t = torch.full((2,), t_val)
        alpha, sigma = bundle.schedule.alpha_sigma(t.double())
        t_model = ns["alpha_sigma_to_t"](alpha, sigma).float()  # the reference's time of this noise level
        v_ref = ref.model(z, t_model, **inputs, cfg_scale=1.0)
        a, s = ns["get_alphas_sigmas"](t_model)
        x0_ref = z * a[:, None, None] - v_ref * s[:, None, None]
        errors.append(rel_err(bundle.pipeline.predict_x0(z, t, cond, torch.ones(2), frame_mask), x0_ref))
    assert max(errors) < 1e-4, errors

    class ProjectGrid:  # stable-audio-tools' dist_shift hook: its uniform grid -> the project's grid (model time)
        def time_shift(self, t, seq_len):
            grid = bundle.pipeline.sampler.timesteps(len(t)).double()[:-1]
            return ns["alpha_sigma_to_t"](*bundle.schedule.alpha_sigma(grid)).float()

    steps, seed, guidance = 5, 11, 4.0
    noise, _ = bundle.pipeline.initial_noise(seed, 16)
    inputs = ref.get_conditioning_inputs(ref.conditioner(meta[:1], "cpu"))
    latents_ref = ns["sample"](ref.model, noise[None], steps, 0, dist_shift=ProjectGrid(), **inputs,
                               cfg_scale=guidance, batch_cfg=True)
    audio_ref = ref.pretransform.decode(latents_ref)[0]
    audio = bundle.pipeline.generate(prompts[:1], seconds[:1], [seed])[0]
    assert rel_err(audio, audio_ref) < 1e-4


# ------------------------------------------------------------------------------------------- diffusers Stable Audio
@pytest.fixture(scope="module")
def sao_1(tmp_path_factory):
    """A tiny Stable Audio Open 1.0 in diffusers' StableAudioPipeline layout (GQA cross-attention, partial rotary,
    a real text projection, seconds_start / seconds_end conditioners, Oobleck VAE)."""
    pytest.importorskip("diffusers", reason=EXTRA)
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
    )
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel

    with float32_default():
        torch.manual_seed(0)
        transformer = randomize(StableAudioDiTModel(
            sample_size=16, in_channels=8, num_layers=2, attention_head_dim=32, num_attention_heads=4,
            num_key_value_attention_heads=2, out_channels=8, cross_attention_dim=64, time_proj_dim=32,
            global_states_input_dim=64, cross_attention_input_dim=32), seed=10).eval()
        vae = randomize(AutoencoderOobleck(encoder_hidden_size=16, downsampling_ratios=[2, 4], channel_multiples=[1, 2],
                                           decoder_channels=16, decoder_input_channels=8, audio_channels=2,
                                           sampling_rate=8000), seed=11).eval()
        projection = randomize(StableAudioProjectionModel(text_encoder_dim=24, conditioning_dim=32, min_value=0,
                                                          max_value=512), seed=12).eval()
        pipe = StableAudioPipeline(vae=vae, text_encoder=make_t5(24, seed=13), projection_model=projection,
                                   tokenizer=make_tokenizer(16), transformer=transformer,
                                   scheduler=CosineDPMSolverMultistepScheduler(sigma_min=0.3, sigma_max=500.0))
        pipe.set_progress_bar_config(disable=True)
        root = tmp_path_factory.mktemp("sao-1") / "stable-audio-open-1.0"
        pipe.save_pretrained(root)
        bundle = load_checkpoint_dir(root)
    return {"pipe": pipe, "root": root, "bundle": bundle}


@torch.no_grad()
def test_diffusers_stable_audio_denoiser_matches_the_pipeline_model(sao_1):
    from diffusers import CosineDPMSolverMultistepScheduler
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    pipe, bundle = sao_1["pipe"], sao_1["bundle"]
    assert detect_format(sao_1["root"]) == "diffusers-stable-audio"
    assert (bundle.config.sampler, bundle.config.default_guidance, bundle.codec.samples_per_latent) == ("ddim", 7.0, 8)
    prompts, seconds = ["a dog barks on the roof", "soft rain"], [0.012, 0.016]
    text = pipe.encode_prompt(prompts, "cpu", do_classifier_free_guidance=False)
    start, end = pipe.encode_duration([0.0, 0.0], seconds, "cpu", False, 2)
    context, glob = torch.cat([text, start, end], dim=1), torch.cat([start, end], dim=2)
    rope = get_1d_rotary_pos_embed(pipe.rotary_embed_dim, 16 + 1, use_real=True, repeat_interleave_real=False)
    cond = bundle.pipeline.conditioning(prompts, seconds)
    z = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4))
    frame_mask = torch.ones(2, 16, dtype=torch.bool)
    cosine = CosineDPMSolverMultistepScheduler(sigma_min=0.3, sigma_max=500.0)
    errors = []
    for t_val in (1.0, 0.55, 0.05):
        t = torch.full((2,), t_val)
        sigma = torch.exp(-bundle.schedule.logsnr(t) / 2)  # the noise level (EDM sigma) of the project's time
        v_ref = pipe.transformer(z, cosine.precondition_noise(sigma), encoder_hidden_states=context,
                                 global_hidden_states=glob, rotary_embedding=rope).sample
        v = bundle.denoiser(z, t, cond.text.tokens, cond.text.mask, cond.text.pooled, cond.seconds, frame_mask)
        errors.append(rel_err(v, v_ref))
        x_ve = z * torch.sqrt(1 + sigma**2)[:, None, None]  # the scheduler's variance-exploding coordinates
        x0_ref = cosine.precondition_outputs(x_ve, v_ref, sigma[:, None, None])
        errors.append(rel_err(bundle.pipeline.predict_x0(z, t, cond, torch.ones(2), frame_mask), x0_ref))
    assert max(errors) < 1e-4, errors


def _cosine_time_euler(grid: list[float]):
    """The reference sampler for the project's DDIM here: diffusers' EDM Euler scheduler (a deterministic DDIM
    step in sigma form) with Stable Audio's cosine noise conditioning, visiting the project's grid of noise levels
    (CosineDPMSolverMultistepScheduler, the pipeline's default, is a stochastic SDE solver)."""
    from diffusers import CosineDPMSolverMultistepScheduler, EDMEulerScheduler

    class CosineTimeEuler(EDMEulerScheduler):
        precondition_noise = CosineDPMSolverMultistepScheduler.precondition_noise

        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
            super().set_timesteps(num_inference_steps, device=device)
            sig = torch.tensor(grid, dtype=torch.float32)
            self.timesteps = self.precondition_noise(sig)
            self.sigmas = torch.cat([sig, torch.zeros(1)])

    return CosineTimeEuler(sigma_min=0.3, sigma_max=500.0, sigma_data=1.0, prediction_type="v_prediction",
                           sigma_schedule="exponential")


@torch.no_grad()
def test_diffusers_stable_audio_run_matches_the_pipeline(sao_1):
    """The pipeline runs in float64: its scheduler keeps samples in variance-exploding coordinates (|x| ~ 500 at
    the first step), where a float32 Euler step loses about three digits to cancellation; the project's DDIM in
    variance-preserving coordinates does not, so the float64 reference is the accurate one to compare with."""
    from diffusers import StableAudioPipeline

    pipe = StableAudioPipeline.from_pretrained(sao_1["root"], local_files_only=True).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    bundle = sao_1["bundle"]
    steps, seconds, seed, guidance = 6, 0.016, 77, 3.0
    t = bundle.pipeline.sampler.timesteps(steps)[:-1]  # float64: sigma(t = 1) is then exactly the pipeline's sigma_max
    pipe.scheduler = _cosine_time_euler(torch.exp(-bundle.schedule.logsnr(t) / 2).tolist())
    noise, _ = bundle.pipeline.initial_noise(seed, 16)  # the project's per-request noise, handed to the pipeline
    audio_ref = pipe("loud engine and birds", audio_end_in_s=seconds, num_inference_steps=steps,
                     guidance_scale=guidance, latents=noise[None].double()).audios[0]
    audio = bundle.pipeline.generate(["loud engine and birds"], [seconds], [seed], steps=steps, guidance=guidance)[0]
    assert audio.shape == audio_ref.shape == (2, 128)
    assert rel_err(audio, audio_ref) < 1e-4
    other = bundle.pipeline.generate(["loud engine and birds"], [seconds], [seed], steps=steps, guidance=1.0)[0]
    assert rel_err(other, audio_ref) > 1e-2  # guidance matters: the comparison can fail


@torch.no_grad()
def test_diffusers_oobleck_matches_autoencoder_oobleck(sao_1):
    vae, codec = sao_1["pipe"].vae, sao_1["bundle"].codec
    wave = torch.randn(1, 2, 128, generator=torch.Generator().manual_seed(5)) * 0.3
    assert rel_err(codec.encode(wave), vae.encode(wave).latent_dist.mean) < 1e-4
    z = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(6))
    assert rel_err(codec.decode(z), vae.decode(z).sample) < 1e-4


# ------------------------------------------------------------------------------------------- Tango
TANGO_FRAMES, TANGO_BINS, TANGO_CHANNELS = 8, 8, 4


@pytest.fixture(scope="module")
def tango(tmp_path_factory):
    """A tiny Tango: T5 cross-attention UNet (Tango's block layout, linear projections, upcast attention) over a
    mel VAE, HiFi-GAN at 16 kHz, SD-2.1's v-prediction DDPM table; saved in diffusers' component layout."""
    pytest.importorskip("diffusers", reason=EXTRA)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    with float32_default():
        torch.manual_seed(0)
        unet = randomize(UNet2DConditionModel(
            sample_size=[TANGO_FRAMES, TANGO_BINS], in_channels=TANGO_CHANNELS, out_channels=TANGO_CHANNELS,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=[2, 4], cross_attention_dim=24,
            norm_num_groups=8, use_linear_projection=True, upcast_attention=True), seed=20).eval()
        vae = randomize(AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                                      layers_per_block=1, latent_channels=TANGO_CHANNELS, norm_num_groups=8,
                                      scaling_factor=0.6), seed=21).eval()
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
            model_in_dim=2 * TANGO_BINS, sampling_rate=16000, upsample_initial_channel=32,
            upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[10, 8, 4, 4, 4], resblock_kernel_sizes=[3, 5],
            resblock_dilation_sizes=[[1, 3], [1, 2]], normalize_before=True)).eval()
        randomize(vocoder, seed=22)
        vocoder.mean.normal_(0, 0.5)
        vocoder.scale.uniform_(0.5, 2.0)
        ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False)
        t5, tokenizer = make_t5(24, seed=23), make_tokenizer(512)
        root = tmp_path_factory.mktemp("tango") / "tango"
        for name, part in (("unet", unet), ("vae", vae), ("vocoder", vocoder), ("scheduler", ddpm),
                           ("text_encoder", t5), ("tokenizer", tokenizer)):
            part.save_pretrained(root / name)
        (root / "model_index.json").write_text(json.dumps({
            "_class_name": "AudioLDMPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "vocoder": ["transformers", "SpeechT5HifiGan"],
            "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"]}))
        bundle = load_checkpoint_dir(root)
    return {"unet": unet, "vae": vae, "vocoder": vocoder, "ddpm": ddpm, "t5": t5, "tokenizer": tokenizer,
            "root": root, "bundle": bundle}


def _tango_text(tango, prompts, guidance: bool):
    """Tango's AudioDiffusion.encode_text / encode_text_classifier_free."""
    tok, t5 = tango["tokenizer"], tango["t5"]
    batch = tok(prompts, max_length=tok.model_max_length, padding=True, truncation=True, return_tensors="pt")
    states = t5(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    mask = batch.attention_mask
    if guidance:
        un = tok([""] * len(prompts), max_length=states.shape[1], padding="max_length", truncation=True,
                 return_tensors="pt")
        un_states = t5(input_ids=un.input_ids, attention_mask=un.attention_mask)[0]
        states, mask = torch.cat([un_states, states]), torch.cat([un.attention_mask, mask])
    return states, mask == 1


def to_unet_layout(z: torch.Tensor) -> torch.Tensor:
    """The project's [B, C*F, T] (channel-major) -> the UNet's [B, C, T, F]."""
    b, _, t = z.shape
    return z.reshape(b, TANGO_CHANNELS, TANGO_BINS, t).transpose(2, 3)


@torch.no_grad()
def test_tango_denoiser_matches_the_unet(tango):
    unet, bundle = tango["unet"], tango["bundle"]
    assert detect_format(tango["root"]) == "tango"
    assert (bundle.config.sampler, bundle.config.default_steps, bundle.config.default_guidance) == ("ddim", 200, 3.0)
    assert bundle.codec.samples_per_latent == 882 and bundle.codec.latent_dim == TANGO_CHANNELS * TANGO_BINS
    prompts = ["a dog barks", "warm arpeggios on house beats"]
    states, mask = _tango_text(tango, prompts, guidance=False)
    cond = bundle.pipeline.conditioning(prompts, [0.16, 0.16])
    z = torch.randn(2, TANGO_CHANNELS * TANGO_BINS, TANGO_FRAMES, generator=torch.Generator().manual_seed(7))
    frame_mask = torch.ones(2, TANGO_FRAMES, dtype=torch.bool)
    alphas = tango["ddpm"].alphas_cumprod
    errors = []
    for step in (999, 640, 37):
        t = torch.full((2,), (step + 1) / 1000)
        v_ref = unet(to_unet_layout(z), torch.tensor([step, step]), encoder_hidden_states=states,
                     encoder_attention_mask=mask).sample
        v = bundle.denoiser(z, t, cond.text.tokens, cond.text.mask, cond.text.pooled, cond.seconds, frame_mask)
        errors.append(rel_err(to_unet_layout(v), v_ref))
        a, s = alphas[step].sqrt(), (1 - alphas[step]).sqrt()
        x0 = bundle.pipeline.predict_x0(z, t, cond, torch.ones(2), frame_mask)
        errors.append(rel_err(to_unet_layout(x0), a * to_unet_layout(z) - s * v_ref))
    assert max(errors) < 1e-4, errors


@torch.no_grad()
def test_tango_ddim_run_matches_the_reference_loop(tango):
    """Tango's inference loop (models.AudioDiffusion.inference) with diffusers' DDIM scheduler on the "trailing"
    grid, then AudioLDM's decode (VAE -> vocoder) and scipy's polyphase resampler to 44.1 kHz."""
    from diffusers import DDIMScheduler
    from scipy.signal import resample_poly

    unet, vae, vocoder, bundle = tango["unet"], tango["vae"], tango["vocoder"], tango["bundle"]
    prompt, seconds, seed, steps, guidance = "rain on the roof", 0.16, 31, 4, 3.0
    scheduler = DDIMScheduler.from_config(tango["ddpm"].config, timestep_spacing="trailing", set_alpha_to_one=True,
                                          clip_sample=False)
    scheduler.set_timesteps(steps)
    states, mask = _tango_text(tango, [prompt], guidance=True)
    noise, _ = bundle.pipeline.initial_noise(seed, TANGO_FRAMES)
    latents = to_unet_layout(noise[None]) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        v_uncond, v_cond = unet(inp, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample.chunk(2)
        latents = scheduler.step(v_uncond + guidance * (v_cond - v_uncond), t, latents).prev_sample
    mel = vae.decode(latents / vae.config.scaling_factor).sample
    wave16 = vocoder(mel.squeeze(1))[:, : mel.shape[2] * 160]  # AudioLDM's pipeline crops to the frames' length
    audio_ref = torch.from_numpy(resample_poly(wave16.double().numpy(), 441, 160, axis=-1)).float()[0]
    audio = bundle.pipeline.generate([prompt], [seconds], [seed], steps=steps, guidance=guidance)[0]
    assert audio.shape == (2, 7056) and audio_ref.shape == (7056,)
    assert rel_err(audio[0], audio_ref) < 1e-4 and torch.equal(audio[0], audio[1])
    other = bundle.pipeline.generate([prompt], [seconds], [seed + 1], steps=steps, guidance=guidance)[0]
    assert rel_err(other[0], audio_ref) > 1e-2


@pytest.mark.slow
def test_a_tango_checkpoint_distils_into_a_derived_student_that_keeps_guidance(tango, tmp_path):
    """A UNet teacher (no guidance input): the student keeps classifier-free guidance, learning both branches
    (tests/test_checkpoints_training.py covers Stable Audio, ARC and the derived format itself)."""
    from models.training.arc import ARCConfig, run_arc
    from models.training.distill import DistillConfig, run_distill

    cfg = DistillConfig(iterations=1, steps_per_halving=2, batch_size=2, cache_clips=2, start_steps=8,
                        checkpoint_every=2, log_every=1, threads=1)
    (out,) = run_distill(tango["root"], tmp_path / "students", tmp_path / "run", cfg)
    assert (out.name, detect_format(out)) == ("tango-bsa-4", "derived")
    student = load_checkpoint_dir(out)
    c = student.config
    assert (c.default_steps, c.default_guidance, c.guidance_in_model) == (4, 3.0, False)
    assert c.training["cond_dropout"] == 0.1 and c.training["guidance_range"] == [1.0, 1.0]
    wave = student.pipeline.generate(["a dog barks"], [0.5], [0])[0]
    assert wave.shape[0] == 2 and bool(torch.isfinite(wave).all())
    # ARC on the UNet student: the discriminator is the UNet's encoder half, the result a ping-pong model
    arc_cfg = ARCConfig(train_steps=2, steps=2, batch_size=2, cache_clips=2, checkpoint_every=2, log_every=1,
                        threads=1)
    arc_dir = run_arc(out, tmp_path / "tango-arc", tmp_path / "arc-run", arc_cfg,
                      cache_dir=tmp_path / "run" / "latents")
    arc = load_checkpoint_dir(arc_dir)
    c = arc.config
    assert (c.kind, c.sampler, c.default_steps, c.default_guidance) == ("arc", "pingpong", 2, 1.0)
    assert c.training["steps_done"] == 2 and json.loads((arc_dir / "derived.json").read_text())["base"]
    moved = [not torch.equal(a, b) for a, b in zip(arc.denoiser.parameters(), student.denoiser.parameters())]
    assert any(moved)  # the generator trained
    wave = arc.pipeline.generate(["a dog barks"], [0.1], [0])[0]
    assert wave.shape == (2, 4410) and bool(torch.isfinite(wave).all())


@torch.no_grad()
def test_the_unet_discriminator_trunk_is_the_encoder_half_run_per_length(tango):
    """The trunk is the UNet's first stages (down blocks, then the mid block), the generator is untouched, and a
    clip's per-frame features do not depend on the padded clips it is batched with."""
    from models.training.arc import Discriminator

    bundle = tango["bundle"]
    dn = bundle.denoiser
    assert dn.depth == 3 and dn.width == 64  # two down blocks + the mid block; the last stage's channels
    disc = Discriminator(dn, layer=1)
    assert (disc.trunk.depth, disc.trunk.width, disc.trunk.unet.mid_block) == (1, 32, None)
    assert not hasattr(disc.trunk.unet, "up_blocks") and hasattr(dn.unet, "up_blocks")
    z, t = torch.randn(2, TANGO_CHANNELS * TANGO_BINS, 8), torch.tensor([0.3, 0.8])
    text = bundle.encode_text(["wind", "a bird sings"])
    seconds, mask = torch.tensor([0.16, 0.1]), torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    frames, glob = disc.trunk.features(z, t, text.tokens, text.mask, text.pooled, seconds, mask)
    assert frames.shape == (2, 8, 32) and glob.shape[0] == 2
    alone, _ = disc.trunk.features(z[1:, :, :5], t[1:], text.tokens[1:], text.mask[1:], text.pooled[1:],
                                   seconds[1:], mask[1:, :5])
    torch.testing.assert_close(frames[1:, :5], alone)
    assert frames[1, 5:].abs().max() == 0
    # one stage = conv_in + the first down block (its downsampler halves the frames), averaged over mel bins
    x = z.reshape(2, TANGO_CHANNELS, TANGO_BINS, 8).transpose(2, 3)
    steps = bundle.schedule.model_timestep(t)
    h, emb, bias = dn.unet._start(x[:1], steps[:1], text.mask[:1])
    h, _ = dn.unet.down_blocks[0](h, emb, text.tokens[:1], bias)
    torch.testing.assert_close(frames[:1], h.mean(dim=3).repeat_interleave(2, dim=2).transpose(1, 2))
    for layer in (2, 3):
        logits = Discriminator(dn, layer=layer)(z, t, text, seconds, mask)
        assert logits.shape == (2,) and bool(torch.isfinite(logits).all())


TANGO_JOBS = [{"prompt": "a dog barks twice", "duration": 0.15, "steps": 6, "guidance": 3.0, "seed": 41},
              {"prompt": "rain on the roof", "duration": 0.07, "steps": 4, "guidance": 1.0, "seed": 42}]


@pytest.mark.slow
def test_a_tango_checkpoint_exports_and_runs_under_onnxruntime(tango, tmp_path):
    """T5, the UNet (one graph run per length, the runtime converting t to the DDPM step) and the mel VAE + HiFi-GAN
    (the graph ends at 16 kHz; the runtime resamples) as graphs; the DDPM table is rebuilt from the manifest. The
    same seeds give the same latents and audio as eager torch for guided and unguided clips of two lengths sharing
    every tick, for the checkpoint and for a student derived from it."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import shutil

    from service_support import compare_runtimes, derived_student

    from models.export import export_onnx

    root = tmp_path / "tango"
    shutil.copytree(tango["root"], root)
    m = export_onnx(root).manifest
    assert all(g["parity"]["passed"] for g in m["graphs"].values())
    assert m["graphs"]["denoiser"]["layout"] == "per-length" and m["codec"]["native_rate"] == 16000
    assert [i["name"] for i in m["graphs"]["denoiser"]["inputs"]] == ["z", "timestep", "tokens", "token_mask"]
    assert m["checkpoint"]["config"]["schedule"]["name"] == "ddpm-discrete"
    compare_runtimes(root, TANGO_JOBS)

    out = derived_student(root, tmp_path / "tango-student", 1.02, default_steps=4, sampler="ddim")
    export_onnx(out)
    compare_runtimes(out, TANGO_JOBS[:1])


def test_tango_analysis_front_end_matches_a_reference_mel(tango):
    """encode's log-mel: AudioLDM's reflect-padded STFT magnitude, Slaney mel filters, log(max(x, 1e-5)),
    checked against transformers' numpy spectrogram."""
    import numpy as np
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    codec = tango["bundle"].codec
    wave = torch.randn(2, 2560, generator=torch.Generator().manual_seed(9)) * 0.2
    ours = codec.analysis(wave)
    bank = mel_filter_bank(num_frequency_bins=513, num_mel_filters=16, min_frequency=0.0, max_frequency=8000.0,
                           sampling_rate=16000, norm="slaney", mel_scale="slaney")
    for i in range(2):
        mel = spectrogram(wave[i].numpy().astype(np.float64), window_function(1024, "hann"), frame_length=1024,
                          hop_length=160, power=1.0, mel_filters=bank, mel_floor=1e-5)
        assert rel_err(ours[i], torch.from_numpy(np.log(mel).T.copy())) < 1e-4
    latents = codec.encode(torch.randn(1, 2, 7056, generator=torch.Generator().manual_seed(10)) * 0.2)
    assert latents.shape == (1, TANGO_CHANNELS * TANGO_BINS, TANGO_FRAMES) and torch.isfinite(latents).all()


# ------------------------------------------------------------------------------------------- errors and discovery
def test_a_directory_of_no_known_format_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    assert detect_format(tmp_path) is None
    with pytest.raises(CheckpointError, match=r"not a checkpoint directory of any supported format.*weights\.bin"):
        load_checkpoint_dir(tmp_path)


def _copy_sao(sao_small, tmp_path) -> Path:
    import shutil

    root = tmp_path / "sao"
    shutil.copytree(sao_small["root"], root)
    return root


def test_weights_that_do_not_fit_name_the_file_and_the_keys(sao_small, tmp_path):
    from safetensors.torch import load_file, save_file

    root = _copy_sao(sao_small, tmp_path)
    sd = load_file(root / "model.safetensors")
    sd.pop("model.model.transformer.layers.1.ff.ff.2.weight")
    sd["model.model.to_cond_embed.0.weight"] = torch.zeros(128, 33)
    sd["model.model.extra.weight"] = torch.zeros(1)
    save_file(sd, root / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_dir(root)
    msg = str(err.value)
    assert str(root / "model.safetensors") in msg
    assert "missing keys [dit.layers.1.ff.proj_out.weight]" in msg and "unexpected keys [model.model.extra.weight]" in msg
    assert "dit.to_cond_embed.0.weight: file (128, 33) vs config (128, 32)" in msg


def test_ckpt_files_load_with_weights_only_and_refuse_other_objects(sao_small, tmp_path):
    from safetensors.torch import load_file

    root = _copy_sao(sao_small, tmp_path)
    sd = load_file(root / "model.safetensors")
    (root / "model.safetensors").unlink()
    torch.save({"state_dict": sd}, root / "model.ckpt")
    bundle = load_checkpoint_dir(root)
    ref = sao_small["bundle"]
    z, t = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1)), torch.full((1,), 0.3)
    cond = ref.pipeline.conditioning(["a dog barks"], [0.01])
    with torch.no_grad():
        assert torch.equal(bundle.pipeline.predict_x0(z, t, cond, torch.ones(1), torch.ones(1, 16, dtype=torch.bool)),
                           ref.pipeline.predict_x0(z, t, cond, torch.ones(1), torch.ones(1, 16, dtype=torch.bool)))
    torch.save({"state_dict": sd, "callback": Unpicklable()}, root / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"model\.ckpt: holds objects other than tensors"):
        load_checkpoint_dir(root)


class Unpicklable:
    """Any class: torch.load(weights_only=True) must refuse to rebuild it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_unsupported_options_are_refused_by_name(sao_small, tmp_path):
    root = _copy_sao(sao_small, tmp_path)
    cfg = json.loads((root / "model_config.json").read_text())
    cfg["model"]["diffusion"]["config"]["global_cond_type"] = "adaLN"
    (root / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="global_cond_type='adaLN' is not supported"):
        load_checkpoint_dir(root)
    (root / "model_config.json").write_text(json.dumps(sao_small["cfg"]))
    import shutil

    shutil.rmtree(root / "text_encoder")
    with pytest.raises(CheckpointError, match="no T5 text encoder found"):
        load_checkpoint_dir(root)


def test_checkpoint_directories_are_discovered_for_serving(sao_small, tmp_path):
    from models.registry import available_models

    root = _copy_sao(sao_small, tmp_path / "zoo")
    (tmp_path / "zoo" / "notes").mkdir()
    assert available_models(tmp_path / "zoo") == [root]
    assert available_models(root) == [root]  # TTA_MODEL_DIR may point at the checkpoint itself


def test_the_service_serves_a_checkpoint_directory(sao_small, tmp_path):
    """TTA_MODEL_DIR pointing at a directory that holds a stable-audio-tools checkpoint: discovered, loaded through
    the registry, warmed up and served over HTTP at 44.1 kHz stereo with the model's own defaults."""
    import io

    import soundfile as sf
    from safetensors.torch import save_file
    from service_support import LiveServer

    from service.settings import Settings

    cfg = sao_small_config("tiny")
    cfg["sample_rate"], cfg["sample_size"] = 44100, 44100
    for side in ("encoder", "decoder"):
        cfg["model"]["pretransform"]["config"][side]["config"]["strides"] = [4, 8]
    cfg["model"]["pretransform"]["config"]["downsampling_ratio"] = 32
    torch.manual_seed(0)
    ref = randomize(build_sat_reference(sao_small["ns"], cfg, make_tokenizer(64), make_t5(32, seed=1)), seed=3)
    root = tmp_path / "zoo" / "sao-small"
    root.mkdir(parents=True)
    (root / "model_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, root / "model.safetensors")
    make_tokenizer(64).save_pretrained(root / "text_encoder")
    make_t5(32, seed=1).save_pretrained(root / "text_encoder")
    settings = Settings(_env_file=None, model_dir=tmp_path / "zoo", default_model="sao-small", threads=1,
                        log_level="warning")
    server = LiveServer(settings)
    try:
        with server.client() as c:
            info = {m["name"]: m for m in c.get("/models").json()}["sao-small"]
            assert (info["sampler"], info["default_steps"], info["kind"]) == ("pingpong", 8, "arc")
            r = c.post("/generate", json={"prompt": "a dog barks", "duration": 0.5, "seed": 7, "steps": 2})
            assert r.status_code == 200, r.text
            audio, sr = sf.read(io.BytesIO(r.content))
            assert sr == 44100 and audio.shape == (22050, 2) and r.headers["X-Model"] == "sao-small"
    finally:
        server.stop()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width, dim", [(64, 32), (64, 64), (128, 64)])
def test_the_rotary_embedding_is_the_references_bit_for_bit(dtype, width, dim):
    """``apply_rotary``'s gather of the swapped halves against the references' "rotate half" form (slice the rotated
    channels, negate and concatenate their halves, concatenate the rest back), computed here as they write it."""
    from models.checkpoints.stable_audio_dit import apply_rotary, rotary_tables

    length = 19
    inv = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv[None]
    freqs = torch.cat([freqs, freqs], dim=-1)
    cos, sin = freqs.cos(), freqs.sin()
    x = torch.randn(2, 3, length, width, generator=torch.Generator().manual_seed(width + dim)).to(dtype)
    xr, xp = x[..., :dim].float(), x[..., dim:]
    x1, x2 = xr.chunk(2, dim=-1)
    want = torch.cat([(xr * cos + torch.cat([-x2, x1], dim=-1) * sin).to(dtype), xp], dim=-1)
    with torch.inference_mode():
        got = apply_rotary(x, *rotary_tables(length, dim, "cpu", width))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="within the head's 16 channels"):
        rotary_tables(length, 32, "cpu", 16)
