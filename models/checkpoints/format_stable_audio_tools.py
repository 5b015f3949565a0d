"""stable-audio-tools checkpoint directories: ``model_config.json`` + ``model.safetensors`` (or ``model.ckpt``),
as published for Stable Audio Open Small and Stable Audio Open 1.0.

The weights are the state dict of stable-audio-tools' ``ConditionedDiffusionModelWrapper``: ``model.model.*`` (the
DiffusionTransformer), ``conditioner.conditioners.<id>.*`` (number conditioners; the T5 itself is not in the file)
and ``pretransform.model.*`` (the Oobleck VAE). T5 is loaded from a local transformers directory beside the
checkpoint (``text_encoder/`` or a folder named after the model, e.g. ``t5-base/``).

Serving defaults follow the model family: rectified-flow models (Stable Audio Open Small, ARC post-trained) sample
with ping-pong, 8 steps, no guidance; v-objective models (Stable Audio Open 1.0) with DDIM on the cosine schedule
restricted to the trained noise range sigma in [0.3, 500], 100 steps, guidance 7.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from models.checkpoints.bundle import CheckpointBundle, bundle_config, read_json
from models.checkpoints.denoisers import NUMBER_INPUTS, StableAudioDenoiser
from models.checkpoints.oobleck import OobleckCodec, OobleckConfig, reshape_snake
from models.checkpoints.oobleck import config_from_stable_audio_tools as oobleck_config
from models.checkpoints.oobleck import stable_audio_tools_key as oobleck_key
from models.checkpoints.stable_audio_dit import (
    NumberEmbedder,
    StableAudioDiT,
    StableAudioDiTConfig,
    config_from_stable_audio_tools,
    number_embedder_key,
    stable_audio_tools_key,
)
from models.checkpoints.text import find_t5_dir, load_t5
from models.checkpoints.weights import (
    CheckpointError,
    check_fit,
    expected_shapes,
    fold_weight_norm,
    read_state_dict,
)
from models.diffusion import make_schedule

NAME = "stable-audio-tools"
CONFIG_FILE = "model_config.json"
T5_DIMS = {"t5-small": 512, "t5-base": 768, "t5-large": 1024, "t5-3b": 1024, "t5-11b": 1024,
           "google/flan-t5-small": 512, "google/flan-t5-base": 768, "google/flan-t5-large": 1024,
           "google/flan-t5-xl": 2048, "google/flan-t5-xxl": 4096, "google/t5-v1_1-xl": 2048,
           "google/t5-v1_1-xxl": 4096}
SAO_SIGMA_MIN, SAO_SIGMA_MAX = 0.3, 500.0  # the noise range Stable Audio Open 1.0 samples in


def detect(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def weights_file(path: Path) -> Path:
    for pattern in ("model.safetensors", "*.safetensors", "model.ckpt", "*.ckpt"):
        found = sorted(path.glob(pattern))
        if found:
            return found[0]
    raise CheckpointError(f"{path}: {CONFIG_FILE} is there but no weights (model.safetensors or model.ckpt)")


@dataclass
class Plan:
    """Everything the config says about the model, checked."""

    dit: StableAudioDiTConfig
    codec: OobleckConfig
    objective: str
    cross_ids: list[str]
    global_ids: list[str]
    text_id: str
    text_len: int
    t5_name: str
    t5_dim: int
    cond_dim: int
    numbers: dict[str, tuple[float, float]]
    sample_rate: int
    sample_size: int


def read_plan(cfg: dict, source: str, t5_dim: int | None = None) -> Plan:
    """``t5_dim``: the width of the T5 actually provided (default: the width of the named model)."""
    if cfg.get("model_type") not in ("diffusion_cond",):
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not supported (only diffusion_cond)")
    model = cfg.get("model", {})
    diffusion = model.get("diffusion", {})
    if diffusion.get("type") != "dit":
        raise CheckpointError(f"{source}: diffusion type {diffusion.get('type')!r} is not supported (only 'dit')")
    for key in ("input_concat_ids", "prepend_cond_ids"):
        if diffusion.get(key):
            raise CheckpointError(f"{source}: {key} conditioning is not supported")
    objective = diffusion.get("diffusion_objective", "v")
    dit = config_from_stable_audio_tools({**diffusion.get("config", {}), "diffusion_objective": objective}, source)
    conditioning = model.get("conditioning", {})
    cond_dim = int(conditioning.get("cond_dim", 0))
    text_id, t5_name, text_len, numbers = None, "t5-base", 128, {}
    for c in conditioning.get("configs", []):
        kind, ident, conf = c.get("type"), c.get("id"), c.get("config", {})
        if kind == "t5":
            text_id, t5_name, text_len = ident, conf.get("t5_model_name", "t5-base"), int(conf.get("max_length", 128))
            if conf.get("project_out"):
                raise CheckpointError(f"{source}: T5 conditioner with project_out is not supported")
        elif kind == "number":
            if ident not in NUMBER_INPUTS:
                raise CheckpointError(f"{source}: number conditioner {ident!r} has no input here (known: "
                                      f"{NUMBER_INPUTS})")
            numbers[ident] = (float(conf.get("min_val", 0)), float(conf.get("max_val", 1)))
        else:
            raise CheckpointError(f"{source}: conditioner {ident!r} of type {kind!r} is not supported (t5, number)")
    cross_ids, global_ids = list(diffusion.get("cross_attention_cond_ids", [])), list(diffusion.get("global_cond_ids",
                                                                                                     []))
    for ident in cross_ids + global_ids:
        if ident != text_id and ident not in numbers:
            raise CheckpointError(f"{source}: conditioning id {ident!r} is used by the DiT but not configured")
    if text_id in global_ids:
        raise CheckpointError(f"{source}: a text prompt as global condition is not supported")
    if text_id is None or text_id not in cross_ids:
        raise CheckpointError(f"{source}: no T5 prompt conditioner in the cross-attention conditioning")
    if t5_dim is None and t5_name not in T5_DIMS:
        raise CheckpointError(f"{source}: unknown T5 model {t5_name!r}")
    if dit.cond_token_dim != cond_dim or dit.global_cond_dim != cond_dim * len(global_ids):
        raise CheckpointError(f"{source}: cond_token_dim {dit.cond_token_dim} / global_cond_dim {dit.global_cond_dim} "
                              f"do not match cond_dim {cond_dim} x {len(global_ids)} global conditions")
    sample_rate = int(cfg.get("sample_rate", 44100))
    if "pretransform" not in model:
        raise CheckpointError(f"{source}: models without an autoencoder pretransform are not supported")
    codec = oobleck_config(model["pretransform"], sample_rate, source)
    if codec.latent_dim != dit.io_channels:
        raise CheckpointError(f"{source}: autoencoder latent_dim {codec.latent_dim} != DiT io_channels "
                              f"{dit.io_channels}")
    return Plan(dit=dit, codec=codec, objective=objective, cross_ids=cross_ids, global_ids=global_ids,
                text_id=text_id, text_len=text_len, t5_name=t5_name, t5_dim=t5_dim or T5_DIMS[t5_name], cond_dim=cond_dim,
                numbers=numbers, sample_rate=sample_rate, sample_size=int(cfg.get("sample_size", 0)))


class Parts(nn.Module):
    """All trainable parts of the checkpoint under one name space, so one strict fit reports every problem."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.dit = StableAudioDiT(plan.dit)
        self.numbers = nn.ModuleDict({k: NumberEmbedder(plan.cond_dim, lo, hi) for k, (lo, hi) in plan.numbers.items()})
        self.text_proj = nn.Linear(plan.t5_dim, plan.cond_dim) if plan.t5_dim != plan.cond_dim else None
        self.codec = OobleckCodec(plan.codec)


def translate(state_dict: dict[str, Tensor], plan: Plan, source: str,
              origin: dict[str, str] | None = None) -> dict[str, Tensor]:
    """stable-audio-tools wrapper keys -> ``Parts`` keys (unknown keys are kept so the strict fit names them);
    ``origin``, when given, is filled with translated key -> the file's key."""
    sd = fold_weight_norm(state_dict)
    out: dict[str, Tensor] = {}
    n_blocks = len(plan.codec.strides)
    for key, value in sd.items():
        new = None
        if key.startswith("model.model."):
            rest = key[len("model.model."):]
            if rest == "transformer.rotary_pos_emb.inv_freq":
                _check_rotary(value, plan.dit, source)
                continue
            new = "dit." + stable_audio_tools_key(rest)
        elif key.startswith("conditioner.conditioners."):
            ident, _, rest = key[len("conditioner.conditioners."):].partition(".")
            if ident in plan.numbers:
                new = f"numbers.{ident}.{number_embedder_key(rest)}"
            elif ident == plan.text_id and rest.startswith("proj_out."):
                new = "text_proj." + rest[len("proj_out."):]
        elif key.startswith("pretransform.model."):
            mapped = oobleck_key(key[len("pretransform.model."):], n_blocks)
            new = None if mapped is None else "codec." + mapped
        out[new or key] = value
        if origin is not None:
            origin[new or key] = key
    codec = reshape_snake({k: v for k, v in out.items() if k.startswith("codec.")})
    return {**out, **codec}


def _check_rotary(inv_freq: Tensor, dit: StableAudioDiTConfig, source: str) -> None:
    """The checkpoint stores its rotary frequency table; it must be the base-10000 table this DiT computes."""
    expected = 1.0 / 10000 ** (torch.arange(0, dit.rope_dim, 2, dtype=torch.float32) / dit.rope_dim)
    same = inv_freq.shape == expected.shape and (
        inv_freq.is_meta or torch.allclose(inv_freq.float().cpu(), expected, rtol=1e-4))
    if not same:
        raise CheckpointError(f"{source}: rotary frequencies of shape {tuple(inv_freq.shape)} differ from the standard "
                              f"base-10000 table of {dit.rope_dim} channels this loader implements")


def validate_shapes(model_config: dict, shapes: dict[str, tuple[int, ...]], source: str = CONFIG_FILE) -> Parts:
    """Check that weights of these names and shapes fit the config without any weight data: the parts and the
    weights are meta tensors. Returns the (meta) parts."""
    plan = read_plan(model_config, source)
    with torch.device("meta"):
        parts = Parts(plan)
        fake = {k: torch.empty(s) for k, s in shapes.items()}
        origin: dict[str, str] = {}
        mapped = translate(fake, plan, source, origin)
    check_fit(expected_shapes(parts), {k: tuple(v.shape) for k, v in mapped.items()}, source, "model", origin)
    return parts


def load(path: str | Path, device: str = "cpu", text_encoder=None) -> CheckpointBundle:
    path = Path(path)
    cfg = read_json(path / CONFIG_FILE)
    plan = read_plan(cfg, str(path / CONFIG_FILE))
    t5_dir, tok_dir = find_t5_dir(path, plan.t5_name)
    t5_width = int(read_json(t5_dir / "config.json").get("d_model", plan.t5_dim))
    plan = read_plan(cfg, str(path / CONFIG_FILE), t5_dim=t5_width)
    weights = weights_file(path)
    parts = Parts(plan)
    origin: dict[str, str] = {}
    mapped = translate(read_state_dict(weights), plan, str(weights), origin)
    check_fit(expected_shapes(parts), {k: tuple(v.shape) for k, v in mapped.items()}, str(weights), "model", origin)
    parts.load_state_dict(mapped, strict=True)
    if plan.objective in ("rectified_flow", "rf_denoiser"):
        schedule_cfg = {"name": "rectified-flow"}
        defaults = {"kind": "arc", "sampler": "pingpong", "default_steps": 8, "max_steps": 100,
                    "default_guidance": 1.0,
                    "description": "Stable Audio (rectified flow, ARC post-trained): ping-pong sampling, 8 steps, "
                                   "no guidance"}
    else:
        schedule_cfg = {"name": "vp-cosine", "logsnr_min": -2 * math.log(SAO_SIGMA_MAX),
                        "logsnr_max": -2 * math.log(SAO_SIGMA_MIN)}
        defaults = {"kind": "teacher", "sampler": "ddim", "default_steps": 100, "max_steps": 500,
                    "default_guidance": 7.0,
                    "description": "Stable Audio (v-objective): DDIM on the cosine schedule, sigma in [0.3, 500], "
                                   "guidance 7"}
    max_duration = plan.sample_size / plan.sample_rate if plan.sample_size else 30.0
    config = bundle_config(
        path, schedule=schedule_cfg, parameterization="v", default_duration=round(min(10.0, max_duration), 2),
        max_duration=max_duration,
        text_encoder={"name": "t5", "path": str(t5_dir), "tokenizer": str(tok_dir or t5_dir),
                      "max_length": plan.text_len},
        denoiser={"format": NAME, **asdict(plan.dit)}, codec={"format": NAME, **asdict(plan.codec)}, **defaults)
    schedule = make_schedule(config.schedule)
    if schedule.name != schedule_cfg["name"]:
        raise CheckpointError(f"{path}: a {plan.objective} model needs the {schedule_cfg['name']} schedule, "
                              f"serving.json asks for {schedule.name}")
    text_encoder = text_encoder or load_t5(t5_dir, tok_dir, plan.text_len, device=device)
    if text_encoder.dim != plan.t5_dim:
        raise CheckpointError(f"{t5_dir}: T5 width {text_encoder.dim} != {plan.t5_dim} expected for {plan.t5_name}")
    denoiser = StableAudioDenoiser(parts.dit, dict(parts.numbers.items()), plan.cross_ids, plan.global_ids,
                                   plan.text_id, plan.text_len, plan.objective, schedule, parts.text_proj)
    return CheckpointBundle(config, denoiser, parts.codec, text_encoder, schedule, null_condition=True,
                            device=device, path=path, source_format=NAME)
