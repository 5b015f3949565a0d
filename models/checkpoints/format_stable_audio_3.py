"""Stable Audio 3 checkpoints (Small: 433 M DiT with SAME-S, up to 120 s; Medium: 1.4 B with SAME-L, up to 380 s)
in both published layouts:

- diffusers' ``StableAudio3Pipeline`` (also its audio-to-audio and inpainting pipelines, which share the files):
  ``model_index.json`` + ``transformer/`` (StableAudio3DiTModel) + ``vae/`` (AutoencoderSAME) +
  ``duration_embedder/`` + ``text_encoder/`` (T5GemmaEncoderModel) + ``tokenizer/`` + ``scheduler/``
  (FlowMatchEulerDiscreteScheduler: ``stochastic_sampling`` marks the distilled ping-pong model, else the base);
- Stability's own, as its stable-audio-3 repository downloads it: ``model_config.json`` + ``model.safetensors``,
  with the T5Gemma it names beside it as a local transformers folder (``stable_audio_3_model_config``).

Served as the references sample: rectified flow, velocity output. The distilled models (the published ones) use
ping-pong sampling on a grid uniform in half-logSNR from -6.2 to 2, 8 steps, guidance 1 (baked in); the base models
the deterministic Euler step (the project's DDIM is that step on rectified flow), 100 steps. The DiT has a trained
inpainting input (``BundleConfig.inpaint_conditioning``).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from torch import Tensor

from models.checkpoints import stable_audio_3_model_config as native
from models.checkpoints.bundle import CheckpointBundle, bundle_config
from models.checkpoints.diffusers_layout import component_config, component_weights, components, read_index
from models.checkpoints.same_autoencoder import config_from_diffusers as same_config
from models.checkpoints.same_autoencoder import from_diffusers as same_weights
from models.checkpoints.stable_audio_3 import Parts, Plan, StableAudio3Denoiser
from models.checkpoints.stable_audio_3_dit import config_from_diffusers as dit_config
from models.checkpoints.stable_audio_3_dit import duration_from_diffusers
from models.checkpoints.stable_audio_3_dit import from_diffusers as dit_weights
from models.checkpoints.t5gemma import load_t5gemma
from models.checkpoints.weights import CheckpointError, load_checked
from models.diffusion import make_schedule

NAME = "stable-audio-3"
PIPELINES = ("StableAudio3Pipeline", "StableAudio3AudioToAudioPipeline", "StableAudio3InpaintPipeline")
SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# FlowMatchEulerDiscreteScheduler options that would move the pipeline's sigmas off the grid it passes in
GRID_OPTIONS = {"shift": 1.0, "use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
DURATION_FREQS = {"min_freq": 0.5, "max_freq": 10000.0}
TEXT_LEN = 256  # the pipeline pads prompts to min(the tokenizer's model_max_length, 256)


def detect(path: Path) -> bool:
    return is_diffusers_layout(path) or native.detect(path)


def is_diffusers_layout(path: Path) -> bool:
    if not (path / "model_index.json").is_file():
        return False
    try:
        return read_index(path).get("_class_name") in PIPELINES
    except CheckpointError:
        return False


def load(path: str | Path, device: str = "cpu", text_encoder=None) -> CheckpointBundle:
    path = Path(path)
    if is_diffusers_layout(path):
        plan, parts, text_dirs, text_state = load_diffusers(path)
    else:
        plan, parts, text_dirs, text_state = native.load(path)
    return make_bundle(path, plan, parts, text_dirs, text_state, device, text_encoder)


def make_bundle(path: Path, plan: Plan, parts: Parts, text_dirs: tuple[Path, Path | None],
                text_state: tuple[dict[str, Tensor], str] | None, device: str, text_encoder) -> CheckpointBundle:
    """The bundle over loaded parts, with the serving defaults of the model's kind (then serving.json)."""
    text_dir, tok_dir = text_dirs
    if plan.distilled:
        defaults = {"kind": "arc", "sampler": "pingpong", "default_steps": 8, "max_steps": 100,
                    "sampler_options": {"half_logsnr_min": plan.half_logsnr[0], "half_logsnr_max": plan.half_logsnr[1]},
                    "description": "Stable Audio 3 (distilled): ping-pong sampling, 8 steps, guidance baked in"}
    else:
        defaults = {"kind": "teacher", "sampler": "ddim", "default_steps": 100, "max_steps": 500,
                    "description": "Stable Audio 3 base model: Euler sampling (DDIM on rectified flow), 100 steps"}
    config = bundle_config(
        path, schedule={"name": "rectified-flow"}, parameterization="rf-velocity", default_guidance=1.0,
        inpaint_conditioning=plan.dit.local_cond_dim > 0, audio_to_audio_grid="compress",
        max_duration=plan.max_duration,
        default_duration=round(min(10.0, plan.max_duration), 2),
        text_encoder={"name": "t5gemma", "path": str(text_dir), "tokenizer": str(tok_dir or text_dir),
                      "max_length": plan.text_len},
        denoiser={"format": NAME, **asdict(plan.dit)}, codec={"format": NAME, **asdict(plan.codec)}, **defaults)
    schedule = make_schedule(config.schedule)
    if schedule.name != "rectified-flow":
        raise CheckpointError(f"{path}: Stable Audio 3 needs the rectified-flow schedule, serving.json asks for "
                              f"{schedule.name}")
    state, source = text_state or (None, "")
    text_encoder = text_encoder or load_t5gemma(text_dir, tok_dir, plan.text_len, device=device, state_dict=state,
                                                source=source)
    if text_encoder.dim != plan.dit.cond_token_dim:
        raise CheckpointError(f"{text_dir}: T5Gemma width {text_encoder.dim} != the DiT's cond_token_dim "
                              f"{plan.dit.cond_token_dim}")
    denoiser = StableAudio3Denoiser(parts.dit, parts.duration, plan.text_len, plan.time_scale)
    return CheckpointBundle(config, denoiser, parts.codec, text_encoder, schedule, device=device, path=path,
                            source_format=f"{NAME} ({plan.layout} layout)")


# ------------------------------------------------------------------------------------------------ diffusers layout
def read_diffusers_plan(path: Path) -> Plan:
    comps = components(path)
    for needed in ("transformer", "vae", "duration_embedder", "text_encoder", "tokenizer", "scheduler"):
        if needed not in comps:
            raise CheckpointError(f"{path}/model_index.json: component {needed!r} is missing")
    dit = dit_config(component_config(path, "transformer"), str(path / "transformer/config.json"))
    codec = same_config(component_config(path, "vae"))
    dcfg = component_config(path, "duration_embedder")
    for key, value in DURATION_FREQS.items():
        if float(dcfg.get(key, value)) != value:
            raise CheckpointError(f"{path}/duration_embedder/config.json: {key}={dcfg[key]} is not supported "
                                  f"(only {value})")
    duration = {"fourier_dim": int(dcfg.get("fourier_dim", 256)), "min_val": float(dcfg.get("min_val", 0.0)),
                "max_val": float(dcfg.get("max_val", 384.0))}
    if int(dcfg.get("output_dim", 768)) != dit.global_cond_dim or dit.global_cond_dim != dit.cond_token_dim:
        raise CheckpointError(f"{path}: the duration embedding ({dcfg.get('output_dim', 768)} wide) is both the "
                              f"DiT's global condition ({dit.global_cond_dim}) and a context token "
                              f"({dit.cond_token_dim}): the three widths must agree")
    scfg = component_config(path, "scheduler", "scheduler_config.json")
    if scfg.get("_class_name", SCHEDULER) != SCHEDULER:
        raise CheckpointError(f"{path}/scheduler: {scfg['_class_name']} is not supported (only {SCHEDULER})")
    for key, value in GRID_OPTIONS.items():
        if scfg.get(key, value) != value:
            raise CheckpointError(f"{path}/scheduler/scheduler_config.json: {key}={scfg[key]!r} is not supported "
                                  f"(only {value!r}: the sampling grid is the pipeline's logSNR grid)")
    check_latents(codec.latent_dim, dit, str(path))
    plan = Plan(layout="diffusers", dit=dit, codec=codec, duration=duration, text_len=tokenizer_length(path),
                time_scale=float(scfg.get("num_train_timesteps", 1000)),
                distilled=bool(scfg.get("stochastic_sampling", False)))
    plan.max_duration = plan.published_max_duration(duration["max_val"])
    return plan


def check_latents(latent_dim: int, dit, source: str) -> None:
    if latent_dim != dit.io_channels:
        raise CheckpointError(f"{source}: autoencoder latent_dim {latent_dim} != DiT io_channels {dit.io_channels}")
    if dit.local_cond_dim not in (0, 1 + latent_dim):
        raise CheckpointError(f"{source}: the inpainting input is {dit.local_cond_dim} wide; expected 1 + "
                              f"{latent_dim} (keep mask and latents)")


def tokenizer_length(path: Path) -> int:
    """min(the tokenizer's model_max_length, 256), as the pipeline pads prompts."""
    file = path / "tokenizer" / "tokenizer_config.json"
    declared = json.loads(file.read_text()).get("model_max_length", TEXT_LEN) if file.is_file() else TEXT_LEN
    return int(min(declared or TEXT_LEN, TEXT_LEN))


def load_diffusers(path: Path) -> tuple[Plan, Parts, tuple[Path, Path | None], None]:
    plan = read_diffusers_plan(path)
    parts = Parts(plan)
    sd, src = component_weights(path, "transformer")
    load_checked(parts.dit, dit_weights(sd, plan.dit, src), src, "transformer")
    sd, src = component_weights(path, "vae")
    load_checked(parts.codec, same_weights(sd), src, "vae")
    sd, src = component_weights(path, "duration_embedder")
    load_checked(parts.duration, duration_from_diffusers(sd, plan.duration["fourier_dim"], src), src,
                 "duration_embedder")
    return plan, parts.eval(), (path / "text_encoder", path / "tokenizer"), None
