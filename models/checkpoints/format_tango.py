"""Tango / AudioLDM-style latent diffusion in diffusers' pipeline layout: ``model_index.json`` + ``unet/``
(UNet2DConditionModel over mel-VAE latents, cross-attending to T5 / FLAN-T5 token states) + ``vae/``
(AutoencoderKL over log-mel spectrograms) + ``vocoder/`` (SpeechT5HifiGan, 16 kHz) + ``text_encoder/`` +
``tokenizer/`` + ``scheduler/`` (the DDPM table and prediction type).

Tango's own release stores the same UNet as ``pytorch_model_main.bin``; assembled in this layout (its UNet config
and weights under ``unet/``, AudioLDM's VAE and vocoder, FLAN-T5) it loads here. AudioLDM 1, which conditions through
CLAP class embeddings instead of cross-attention, is refused with a clear error.

Sampling uses the project's DDIM on the checkpoint's own DDPM table (``DiscreteVPSchedule``; the uniform grid visits
diffusers' "trailing" timesteps), classifier-free guidance 3 against the empty prompt, 200 steps by default, as the
BSA paper runs its Tango teacher. Output: the vocoder's 16 kHz mono resampled to 44.1 kHz and duplicated to stereo.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from models.checkpoints.bundle import CheckpointBundle, bundle_config
from models.checkpoints.denoisers import UNetDenoiser
from models.checkpoints.diffusers_layout import (
    component_config,
    component_weights,
    components,
)
from models.checkpoints.mel_vae import (
    HifiGan,
    MelLatentCodec,
    MelVAE,
    vae_config_from_diffusers,
    vae_key,
    vocoder_config_from_transformers,
)
from models.checkpoints.text import load_t5
from models.checkpoints.unet import UNet2DCondition
from models.checkpoints.unet import config_from_diffusers as unet_config
from models.checkpoints.weights import (
    CheckpointError,
    fold_weight_norm,
    load_checked,
)
from models.diffusion.discrete import DiscreteVPSchedule

NAME = "tango"
PARAMETERIZATIONS = {"v_prediction": "v", "epsilon": "eps", "sample": "x0"}


def detect(path: Path) -> bool:
    if not (path / "model_index.json").is_file():
        return False
    try:
        return {"unet", "vae", "vocoder"} <= set(components(path))
    except CheckpointError:
        return False


def load(path: str | Path, device: str = "cpu", text_encoder=None) -> CheckpointBundle:
    path = Path(path)
    comps = components(path)
    for needed in ("unet", "vae", "vocoder", "text_encoder", "tokenizer", "scheduler"):
        if needed not in comps:
            raise CheckpointError(f"{path}/model_index.json: component {needed!r} is missing")
    te_cfg = component_config(path, "text_encoder")
    if te_cfg.get("model_type") not in ("t5", "mt5", "umt5"):
        raise CheckpointError(f"{path}/text_encoder: a {te_cfg.get('model_type')!r} text encoder is not supported; "
                              "this layout needs a T5 / FLAN-T5 encoder the UNet cross-attends to (Tango). AudioLDM 1's "
                              "CLAP class-embedding conditioning is not supported")
    ucfg = component_config(path, "unet")
    unet = UNet2DCondition(unet_config(ucfg, str(path / "unet/config.json")))
    sd, src = component_weights(path, "unet")
    load_checked(unet, sd, src, "unet")

    vae_cfg = vae_config_from_diffusers(component_config(path, "vae"), str(path / "vae/config.json"))
    vae = MelVAE(vae_cfg)
    sd, src = component_weights(path, "vae")
    load_checked(vae, {vae_key(k): v for k, v in sd.items()}, src, "vae")

    vocoder = HifiGan(vocoder_config_from_transformers(component_config(path, "vocoder"),
                                                       str(path / "vocoder/config.json")))
    sd, src = component_weights(path, "vocoder")
    load_checked(vocoder, fold_weight_norm(sd), src, "vocoder")

    if unet.config.in_channels != vae_cfg.latent_channels or unet.config.out_channels != vae_cfg.latent_channels:
        raise CheckpointError(f"{path}: unet in/out channels {unet.config.in_channels}/{unet.config.out_channels} "
                              f"!= vae latent_channels {vae_cfg.latent_channels}")
    if unet.config.cross_attention_dim != int(te_cfg.get("d_model", 0)):
        raise CheckpointError(f"{path}: unet cross_attention_dim {unet.config.cross_attention_dim} != text encoder "
                              f"d_model {te_cfg.get('d_model')}")
    codec = MelLatentCodec(vae, vocoder, n_mels=vocoder.config.model_in_dim)

    scfg = component_config(path, "scheduler", "scheduler_config.json")
    try:
        schedule = DiscreteVPSchedule.from_scheduler_config(scfg, str(path / "scheduler/scheduler_config.json"))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    prediction = scfg.get("prediction_type", "epsilon")
    if prediction not in PARAMETERIZATIONS:
        raise CheckpointError(f"{path}/scheduler: prediction_type {prediction!r} is not supported")
    size = ucfg.get("sample_size")
    frames = int(size[0]) if isinstance(size, (list, tuple)) else 256
    max_duration = frames * codec.samples_per_latent / codec.sample_rate
    text_len = _tokenizer_max_length(path)
    config = bundle_config(
        path, kind="teacher", schedule=schedule.to_config(), parameterization=PARAMETERIZATIONS[prediction],
        sampler="ddim", default_steps=200, max_steps=schedule.steps, default_guidance=3.0,
        default_duration=round(min(10.0, max_duration), 2), max_duration=max_duration,
        text_encoder={"name": "t5", "path": str(path / "text_encoder"), "tokenizer": str(path / "tokenizer"),
                      "max_length": text_len},
        denoiser={"format": NAME, **asdict(unet.config)},
        codec={"format": NAME, "vae": asdict(vae_cfg), "vocoder": asdict(vocoder.config)},
        description="Tango-style mel latent diffusion: DDIM on its DDPM table, guidance 3, 200 steps; 16 kHz mono "
                    "resampled to 44.1 kHz stereo")
    if config.schedule != schedule.to_config():
        raise CheckpointError(f"{path}: the noise schedule comes from scheduler/scheduler_config.json; serving.json "
                              "cannot replace it")
    text_encoder = text_encoder or load_t5(path / "text_encoder", path / "tokenizer", text_len, device=device)
    denoiser = UNetDenoiser(unet, schedule, codec.bins)
    return CheckpointBundle(config, denoiser, codec, text_encoder, schedule, null_condition=False, device=device,
                            path=path, source_format=NAME)


def _tokenizer_max_length(path: Path) -> int:
    from transformers import AutoTokenizer

    n = int(getattr(AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True), "model_max_length", 512)
            or 512)
    return min(n, 512)
