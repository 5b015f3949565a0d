"""diffusers ``StableAudioPipeline`` directories (Stable Audio Open 1.0 as published in diffusers' layout):
``model_index.json`` + ``transformer/`` (StableAudioDiTModel) + ``vae/`` (AutoencoderOobleck) +
``projection_model/`` (text projection and the start / end seconds conditioners) + ``text_encoder/`` (T5) +
``tokenizer/`` + ``scheduler/``.

The pipeline's conditioning: T5 states of the prompt padded to the tokenizer's ``model_max_length`` (zeroed past the
prompt), then the seconds_start and seconds_end tokens, as cross-attention input; the two seconds embeddings
concatenated as the global condition; the unconditional branch is the all-zero cross-attention input. Its network is
v-prediction on the cosine schedule with the model time 2/pi atan(sigma); its scheduler's sigma range (0.3 .. 500)
bounds the project's VP-cosine schedule, sampled with the project's DDIM.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from torch import nn

from models.checkpoints.bundle import CheckpointBundle, bundle_config
from models.checkpoints.denoisers import StableAudioDenoiser
from models.checkpoints.diffusers_layout import (
    component_config,
    component_weights,
    components,
    read_index,
)
from models.checkpoints.oobleck import OobleckCodec
from models.checkpoints.oobleck import config_from_diffusers as oobleck_config
from models.checkpoints.stable_audio_dit import (
    NumberEmbedder,
    StableAudioDiT,
    config_from_diffusers,
    from_diffusers,
    number_embedder_key,
)
from models.checkpoints.text import load_t5
from models.checkpoints.weights import (
    CheckpointError,
    fold_weight_norm,
    load_checked,
)
from models.diffusion import make_schedule

NAME = "diffusers-stable-audio"
PIPELINE = "StableAudioPipeline"
CROSS_IDS = ["prompt", "seconds_start", "seconds_total"]
GLOBAL_IDS = ["seconds_start", "seconds_total"]


def detect(path: Path) -> bool:
    if not (path / "model_index.json").is_file():
        return False
    try:
        return read_index(path).get("_class_name") == PIPELINE
    except CheckpointError:
        return False


def tokenizer_max_length(path: Path) -> int:
    """The pipeline pads prompts to the tokenizer's model_max_length; a tokenizer without a sane one gets 128 (the
    length Stable Audio Open 1.0 was trained with)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    n = int(getattr(tok, "model_max_length", 128) or 128)
    return n if n <= 4096 else 128


def load(path: str | Path, device: str = "cpu", text_encoder=None) -> CheckpointBundle:
    path = Path(path)
    comps = components(path)
    for needed in ("transformer", "vae", "projection_model", "text_encoder", "tokenizer"):
        if needed not in comps:
            raise CheckpointError(f"{path}/model_index.json: component {needed!r} is missing")
    tcfg = component_config(path, "transformer")
    dit_cfg = config_from_diffusers(tcfg, str(path / "transformer/config.json"))
    dit = StableAudioDiT(dit_cfg)
    sd, src = component_weights(path, "transformer")
    load_checked(dit, from_diffusers(sd), src, "transformer")

    vcfg = component_config(path, "vae")
    codec = OobleckCodec(oobleck_config(vcfg, str(path / "vae/config.json")))
    sd, src = component_weights(path, "vae")
    load_checked(codec, fold_weight_norm(sd), src, "vae")

    pcfg = component_config(path, "projection_model")
    cond_dim, text_dim = int(pcfg["conditioning_dim"]), int(pcfg["text_encoder_dim"])
    lo, hi = float(pcfg["min_value"]), float(pcfg["max_value"])
    proj = nn.Module()
    proj.text_proj = nn.Linear(text_dim, cond_dim) if text_dim != cond_dim else None
    proj.numbers = nn.ModuleDict({k: NumberEmbedder(cond_dim, lo, hi) for k in GLOBAL_IDS})
    sd, src = component_weights(path, "projection_model")
    mapped = {}
    for key, value in sd.items():
        for stem, ident in (("start_number_conditioner.", "seconds_start"), ("end_number_conditioner.",
                                                                              "seconds_total")):
            if key.startswith(stem):
                key = f"numbers.{ident}.{number_embedder_key(key[len(stem):])}"
                break
        else:
            if key.startswith("text_projection."):
                key = "text_proj." + key[len("text_projection."):]
        mapped[key] = value
    load_checked(proj, mapped, src, "projection_model")
    if dit_cfg.cond_token_dim != cond_dim or dit_cfg.global_cond_dim != 2 * cond_dim:
        raise CheckpointError(f"{path}: transformer cross_attention_input_dim / global_states_input_dim "
                              f"({dit_cfg.cond_token_dim} / {dit_cfg.global_cond_dim}) do not match the projection "
                              f"model's conditioning_dim {cond_dim}")
    if vcfg.get("decoder_input_channels", 64) != dit_cfg.io_channels:
        raise CheckpointError(f"{path}: vae latent channels {vcfg.get('decoder_input_channels')} != transformer "
                              f"in_channels {dit_cfg.io_channels}")

    scfg = component_config(path, "scheduler", "scheduler_config.json") if (path / "scheduler").is_dir() else {}
    sigma_min, sigma_max = float(scfg.get("sigma_min", 0.3)), float(scfg.get("sigma_max", 500.0))
    if scfg.get("prediction_type", "v_prediction") != "v_prediction":
        raise CheckpointError(f"{path}/scheduler: prediction_type {scfg.get('prediction_type')!r} is not supported")
    schedule_cfg = {"name": "vp-cosine", "logsnr_min": -2 * math.log(sigma_max), "logsnr_max": -2 * math.log(sigma_min)}
    text_len = tokenizer_max_length(path)
    max_duration = int(tcfg.get("sample_size", 1024)) * codec.samples_per_latent / codec.sample_rate
    config = bundle_config(
        path, kind="teacher", schedule=schedule_cfg, parameterization="v", sampler="ddim", default_steps=100,
        max_steps=500, default_guidance=7.0, default_duration=round(min(10.0, max_duration), 2),
        max_duration=max_duration,
        text_encoder={"name": "t5", "path": str(path / "text_encoder"), "tokenizer": str(path / "tokenizer"),
                      "max_length": text_len},
        denoiser={"format": NAME, **asdict(dit_cfg)}, codec={"format": NAME, **asdict(codec.config)},
        description="Stable Audio Open 1.0 (diffusers layout): DDIM on the cosine schedule, guidance 7")
    schedule = make_schedule(config.schedule)
    if schedule.name != "vp-cosine":
        raise CheckpointError(f"{path}: this v-prediction model needs a vp-cosine schedule, serving.json asks for "
                              f"{schedule.name}")
    text_encoder = text_encoder or load_t5(path / "text_encoder", path / "tokenizer", text_len, device=device)
    if text_encoder.dim != text_dim:
        raise CheckpointError(f"{path}/text_encoder: width {text_encoder.dim} != projection text_encoder_dim "
                              f"{text_dim}")
    denoiser = StableAudioDenoiser(dit, dict(proj.numbers.items()), CROSS_IDS, GLOBAL_IDS, "prompt", text_len, "v",
                                   schedule, proj.text_proj)
    return CheckpointBundle(config, denoiser, codec, text_encoder, schedule, null_condition=True, device=device,
                            path=path, source_format=NAME)

