"""Stable Audio 3 as Stability's stable-audio-3 repository publishes it: ``model_config.json`` + ``model.safetensors``
(the whole ``ConditionedDiffusionModelWrapper``: ``model.model.*`` the DiT, ``conditioner.conditioners.<prompt>.*``
the text conditioner's padding embedding (and, when the file holds one, its own copy of the T5Gemma encoder),
``conditioner.conditioners.<seconds>.*`` the duration embedder, ``pretransform.model.*`` SAME). The T5Gemma the
config names (google/t5gemma-b-b-ul2) is not in the download: it is read from a local transformers folder beside
the checkpoint, ``text_encoder/`` or ``t5gemma-b-b-ul2/``.

Options of the reference that these models do not use are refused by name rather than ignored. Differences from
diffusers' rendering of the same weights that this layout keeps: SAME-S's chunked attention (diffusers runs it with
the band attention of SAME-L), the norms' epsilon the config states, the text length the conditioner states.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from models.checkpoints.bundle import read_json
from models.checkpoints.format_stable_audio_tools import weights_file
from models.checkpoints.same_autoencoder import SAMEConfig
from models.checkpoints.same_autoencoder import from_stability as same_from_stability
from models.checkpoints.same_autoencoder import to_stability as same_to_stability
from models.checkpoints.stable_audio_3 import HALF_LOGSNR, Parts, Plan
from models.checkpoints.stable_audio_3_dit import StableAudio3DiTConfig
from models.checkpoints.stable_audio_3_dit import from_stability as dit_from_stability
from models.checkpoints.stable_audio_3_dit import to_stability as dit_to_stability
from models.checkpoints.text import find_t5_dir
from models.checkpoints.weights import CheckpointError, check_fit, expected_shapes, read_state_dict, tensor_shapes

log = logging.getLogger("tta.models")

CONFIG_FILE = "model_config.json"
TEXT_MODEL = "google/t5gemma-b-b-ul2"
OBJECTIVES = {"rf_denoiser": True, "rectified_flow": False}  # -> distilled
LOCAL_IDS = ["inpaint_mask", "inpaint_masked_input"]  # the inpainting input: keep mask, then masked latents
# DiT options: (the value these models need, the reference's default when the key is absent)
DIT_OPTIONS = {
    "patch_size": (1, 1), "input_concat_dim": (0, 0), "prepend_cond_dim": (0, 0),
    "transformer_type": ("continuous_transformer", "continuous_transformer"),
    "global_cond_type": ("adaLN", "prepend"), "timestep_cond_type": ("global", "global"),
    "timestep_features_type": ("expo", "learned"), "timestep_features_logsnr": (False, False),
    "project_cond_tokens": (True, True), "project_global_cond": (True, True), "norm_type": ("rms_norm", "layer_norm"),
    "conformer": (False, False), "layer_scale": (False, False), "use_sinusoidal_emb": (False, False),
    "use_abs_pos_emb": (False, False), "causal": (False, False), "rotary_pos_emb": (True, True),
    "cross_attn_rotary_pos_emb": (False, False), "final_cross_attn_ix": (-1, -1), "sliding_window": (None, None),
    "add_rope": (False, False)}
ATTN_OPTIONS = {"qk_norm": ("rms", "none"), "feat_scale": (False, False)}
FF_OPTIONS = {"no_bias": (False, False), "glu": (True, True), "use_conv": (False, False), "sinusoidal": (False, False)}
# SAME options: the transformer resampling block's (needed value, default), then the structure both sides share
SAME_OPTIONS = {"dyt": (True, True), "conv_mapping": (False, False), "mapping_bias": (True, True),
                "feat_scale": (False, False), "layer_scale": (False, False), "conformer": (False, False),
                "cross_attn": (False, False)}
SAME_SHARED = {"channels": 128, "c_mults": [1, 2, 4, 8], "strides": [2, 4, 8, 8], "transformer_depths": [3, 3, 3, 3],
               "latent_dim": 32, "sliding_window": None, "chunk_size": 128, "chunk_midpoint_shift": False,
               "dim_heads": 128, "differential": True, "ff_mult": 3, "variable_stride": False}


def detect(path: Path) -> bool:
    """A model_config.json whose prompt conditioner is T5Gemma (stable-audio-tools' SAO configs name T5)."""
    if not (path / CONFIG_FILE).is_file():
        return False
    try:
        configs = read_json(path / CONFIG_FILE).get("model", {}).get("conditioning", {}).get("configs", [])
    except (CheckpointError, AttributeError):
        return False
    return any(isinstance(c, dict) and c.get("type") == "t5gemma" for c in configs)


def refuse_options(cfg: dict, options: dict, source: str, what: str) -> None:
    for key, (needed, default) in options.items():
        if cfg.get(key, default) != needed:
            raise CheckpointError(f"{source}: {what} option {key}={cfg.get(key, default)!r} is not supported "
                                  f"(Stable Audio 3 uses {needed!r})")


def dit_config(cfg: dict, source: str) -> StableAudio3DiTConfig:
    """Ours from the ``model.diffusion.config`` block."""
    refuse_options(cfg, DIT_OPTIONS, source, "DiT")
    attn, ff, norm = (dict(cfg.get(k) or {}) for k in ("attn_kwargs", "ff_kwargs", "norm_kwargs"))
    refuse_options(attn, ATTN_OPTIONS, source, "DiT attn_kwargs")
    refuse_options(ff, FF_OPTIONS, source, "DiT ff_kwargs")
    if norm.get("fix_scale"):
        raise CheckpointError(f"{source}: DiT norm_kwargs fix_scale is not supported")
    c = StableAudio3DiTConfig(
        io_channels=int(cfg.get("io_channels", 32)), embed_dim=int(cfg.get("embed_dim", 768)),
        depth=int(cfg.get("depth", 12)), num_heads=int(cfg.get("num_heads", 8)),
        cond_token_dim=int(cfg.get("cond_token_dim", 0)), global_cond_dim=int(cfg.get("global_cond_dim", 0)),
        local_cond_dim=int(cfg.get("local_add_cond_dim") or 0),
        timestep_features_dim=int(cfg.get("timestep_features_dim", 256)), ff_mult=float(ff.get("mult", 4)),
        memory_tokens=int(cfg.get("num_memory_tokens", 0)), differential=bool(attn.get("differential", False)),
        norm_eps=float(norm.get("eps", 1e-5)), qk_norm_eps=float(attn.get("qk_norm_eps", 1e-6)))
    if max(c.head_dim // 2, 32) != c.head_dim // 2:  # the reference rotates max(head_dim / 2, 32) channels
        raise CheckpointError(f"{source}: heads of {c.head_dim} channels are not supported (rotary over "
                              f"{max(c.head_dim // 2, 32)} channels); Stable Audio 3 has 64")
    return c


def same_config(pretransform: dict, sample_rate: int, source: str) -> SAMEConfig:
    """Ours from the ``model.pretransform`` block (a patched SAME autoencoder with a soft-norm bottleneck)."""
    if pretransform.get("type") != "autoencoder":
        raise CheckpointError(f"{source}: pretransform type {pretransform.get('type')!r} is not supported")
    ae = pretransform.get("config", {})
    enc, dec = ae.get("encoder", {}).get("config", {}), ae.get("decoder", {}).get("config", {})
    patch = (ae.get("pretransform") or {}).get("config", {})
    bottleneck = (ae.get("bottleneck") or {}).get("config", {})
    for side in (enc, dec):
        refuse_options(side, SAME_OPTIONS, source, "SAME")
    shared = {k: enc.get(k, default) for k, default in SAME_SHARED.items()}
    differs = sorted(k for k in SAME_SHARED if dec.get(k, SAME_SHARED[k]) != shared[k])
    if differs:
        raise CheckpointError(f"{source}: SAME encoder and decoder differ in {differs}")
    if int(patch.get("oversampling", 1)) != 1 or int(patch.get("postfilter_channels", 0)):
        raise CheckpointError(f"{source}: SAME patching with oversampling or a post-filter is not supported")
    if int(bottleneck.get("noise_augment_dim", 0)):
        raise CheckpointError(f"{source}: SAME bottleneck noise_augment_dim is not supported")
    window = shared["sliding_window"]  # None: chunked attention
    if window is not None and (len(set(window)) != 1):
        raise CheckpointError(f"{source}: an asymmetric SAME sliding_window {window} is not supported")
    strides, chunked = list(shared["strides"]), window is None
    c = SAMEConfig(
        audio_channels=int(patch.get("channels", 2)), patch_size=int(patch.get("patch_size", 1)),
        channels=int(shared["channels"]), c_mults=list(shared["c_mults"]), strides=strides,
        depths=list(shared["transformer_depths"]), latent_dim=int(shared["latent_dim"]),
        dim_heads=int(shared["dim_heads"]), differential=bool(shared["differential"]),
        ff_mult=float(shared["ff_mult"]), sliding_window=1 if chunked else int(window[0]),
        chunk_size=int(shared["chunk_size"]) if chunked else 0,
        chunk_midpoint_shift=chunked and bool(shared["chunk_midpoint_shift"]),
        encoder_sinusoidal_blocks=[int(enc.get("sinusoidal_blocks", 0))],  # the encoder's is one number for all levels
        decoder_sinusoidal_blocks=list(dec.get("sinusoidal_blocks", [0] * len(strides))),
        decoder_new_tokens=1 if shared["variable_stride"] else strides[0], sample_rate=sample_rate,
        soft_clip=bool(ae.get("decoder", {}).get("soft_clip", False)))
    if len(set(strides)) != 1 and not shared["variable_stride"]:
        raise CheckpointError(f"{source}: SAME with per-position decoder tokens and unequal strides is not supported")
    for name, value in (("encoder in_channels", enc.get("in_channels")), ("decoder out_channels",
                                                                          dec.get("out_channels"))):
        if value is not None and int(value) != c.audio_channels * c.patch_size:
            raise CheckpointError(f"{source}: SAME {name} {value} != {c.audio_channels} x patch {c.patch_size}")
    ratio = ae.get("downsampling_ratio")
    if ratio is not None and int(ratio) != c.hop:
        raise CheckpointError(f"{source}: downsampling_ratio {ratio} != patch {c.patch_size} x strides {strides}")
    return c


def read_plan(cfg: dict, source: str) -> tuple[Plan, dict]:
    """The plan, and the conditioner ids and options the weights are named by."""
    if cfg.get("model_type") != "diffusion_cond":
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not supported (diffusion_cond)")
    model = cfg.get("model", {})
    diffusion = model.get("diffusion", {})
    objective = diffusion.get("diffusion_objective", "v")
    if objective not in OBJECTIVES:
        raise CheckpointError(f"{source}: diffusion_objective {objective!r} is not supported ({sorted(OBJECTIVES)})")
    for key in ("input_concat_ids", "prepend_cond_ids", "modular_local_cond_configs"):
        if diffusion.get(key):
            raise CheckpointError(f"{source}: {key} conditioning is not supported")
    dit = dit_config(diffusion.get("config", {}), source)
    conditioning = model.get("conditioning", {})
    ids = {}
    for c in conditioning.get("configs", []):
        kind, ident, conf = c.get("type"), c.get("id"), c.get("config", {})
        if kind == "t5gemma" and "text" not in ids:
            ids["text"], ids["text_conf"] = ident, conf
        elif kind == "number" and "seconds" not in ids:
            ids["seconds"], ids["seconds_conf"] = ident, conf
        else:
            raise CheckpointError(f"{source}: conditioner {ident!r} of type {kind!r} is not supported (one t5gemma "
                                  "prompt and one number of seconds)")
    if "text" not in ids or "seconds" not in ids:
        raise CheckpointError(f"{source}: Stable Audio 3 needs a t5gemma prompt and a number (seconds) conditioner")
    text, seconds = ids["text_conf"], ids["seconds_conf"]
    if text.get("model_name", TEXT_MODEL) != TEXT_MODEL or text.get("project_out"):
        raise CheckpointError(f"{source}: the prompt conditioner must be {TEXT_MODEL} without project_out")
    if text.get("padding_mode", "zero") not in ("zero", "learned"):
        raise CheckpointError(f"{source}: prompt padding_mode {text.get('padding_mode')!r} is not supported")
    if seconds.get("fourier_features_type", "learned") != "expo":
        raise CheckpointError(f"{source}: the seconds conditioner must use expo Fourier features")
    expected = {"cross_attention_cond_ids": [ids["text"], ids["seconds"]], "global_cond_ids": [ids["seconds"]]}
    for key, value in expected.items():
        if list(diffusion.get(key, [])) != value:
            raise CheckpointError(f"{source}: {key} {diffusion.get(key)} is not supported (expected {value})")
    local = list(diffusion.get("local_add_cond_ids", []))
    if local not in ([], LOCAL_IDS) or bool(local) != bool(dit.local_cond_dim):
        raise CheckpointError(f"{source}: local_add_cond_ids {local} with local_add_cond_dim {dit.local_cond_dim} "
                              f"is not supported (expected {LOCAL_IDS} with the mask and latent channels)")
    cond_dim = int(conditioning.get("cond_dim", 0))
    if not dit.cond_token_dim == dit.global_cond_dim == cond_dim:
        raise CheckpointError(f"{source}: cond_token_dim {dit.cond_token_dim} / global_cond_dim "
                              f"{dit.global_cond_dim} must both be cond_dim {cond_dim}")
    sample_rate = int(cfg.get("sample_rate", 44100))
    codec = same_config(model.get("pretransform", {}), sample_rate, source)
    if codec.latent_dim != dit.io_channels or dit.local_cond_dim not in (0, 1 + codec.latent_dim):
        raise CheckpointError(f"{source}: latent_dim {codec.latent_dim} does not fit the DiT (io_channels "
                              f"{dit.io_channels}, local_add_cond_dim {dit.local_cond_dim})")
    plan = Plan(layout="stable-audio-3", dit=dit, codec=codec,
                duration={"min_val": float(seconds.get("min_val", 0)), "max_val": float(seconds.get("max_val", 1))},
                text_len=int(text.get("max_length", 128)), distilled=OBJECTIVES[objective],
                half_logsnr=sampling_range(diffusion.get("sampling_distribution_shift_options"), source))
    size = int(cfg.get("sample_size", 0))
    plan.max_duration = size / sample_rate if size else plan.published_max_duration(plan.duration["max_val"])
    return plan, ids


def sampling_range(options: dict | None, source: str) -> tuple[float, float]:
    """The ping-pong grid's half-logSNR range: the reference's default log-SNR shift, or the one the config names.
    A shift that moves with the clip's length is served at its anchor length's range (with a warning)."""
    if not options:
        return HALF_LOGSNR
    if options.get("type") != "logsnr":
        raise CheckpointError(f"{source}: sampling_distribution_shift_options of type {options.get('type')!r} are "
                              "not supported (only logsnr)")
    if float(options.get("rate", 1.0)) != 0.0:
        log.warning("%s: the sampling grid's log-SNR range moves with the clip's length (rate %s) in the reference; "
                    "served with its anchor range", source, options.get("rate", 1.0))
    return float(options.get("anchor_logsnr", HALF_LOGSNR[0])), float(options.get("logsnr_end", HALF_LOGSNR[1]))


def translate(state: dict[str, Tensor], plan: Plan, ids: dict, source: str,
              origin: dict[str, str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The file's tensors -> (``Parts`` state, the text encoder's own weights if the file holds them). Unknown keys
    are kept for the strict fit to name."""
    text, seconds = f"conditioner.conditioners.{ids['text']}.", f"conditioner.conditioners.{ids['seconds']}."
    dit, same, text_state, out = {}, {}, {}, {}
    for key, value in state.items():
        if key.startswith("model.model."):
            dit[key[len("model.model."):]] = value
        elif key.startswith("pretransform.model."):
            same[key[len("pretransform.model."):]] = value
        elif key.startswith(text + "model."):
            text_state[key[len(text + "model."):]] = value
        else:
            new = {text + "padding_embedding": "dit.prompt_padding_embedding",
                   seconds + "embedder.embedding.1.weight": "duration.linear.weight",
                   seconds + "embedder.embedding.1.bias": "duration.linear.bias"}.get(key, key)
            out[new], origin[new] = value, key
    inner: dict[str, str] = {}
    out.update({"dit." + k: v for k, v in dit_from_stability(dit, plan.dit, source, inner).items()})
    out.update({"codec." + k: v for k, v in same_from_stability(same, plan.codec, source, inner).items()})
    origin.update({"dit." + k: v for k, v in inner.items() if v.startswith("model.")})
    origin.update({"codec." + k: v for k, v in inner.items() if v.startswith("pretransform.")})
    out.setdefault("dit.prompt_padding_embedding", torch.zeros(plan.dit.cond_token_dim))  # padding_mode "zero"
    out.setdefault("codec.bottleneck.running_std", torch.ones(1))  # a bottleneck without auto_scale
    return out, text_state


def load(path: Path) -> tuple[Plan, Parts, tuple[Path, Path | None], tuple[dict[str, Tensor], str] | None]:
    plan, ids = read_plan(read_json(path / CONFIG_FILE), str(path / CONFIG_FILE))
    weights = weights_file(path)
    origin: dict[str, str] = {}
    state, text_state = translate(read_state_dict(weights), plan, ids, str(weights), origin)
    parts = Parts(plan)
    check_fit(expected_shapes(parts), tensor_shapes(state), str(weights), "model", origin)
    parts.load_state_dict(state, strict=True)
    text_dirs = find_t5_dir(path, TEXT_MODEL)
    return plan, parts.eval(), text_dirs, ((text_state, str(weights)) if text_state else None)


def model_config(plan: Plan, text_id: str = "prompt", seconds_id: str = "seconds_total") -> dict:
    """The model_config.json of a plan (the inverse of ``read_plan``): for writing checkpoints in this layout."""
    d, c = plan.dit, plan.codec
    trb = {"channels": c.channels, "c_mults": c.c_mults, "strides": c.strides, "transformer_depths": c.depths,
           "latent_dim": c.latent_dim, "dim_heads": c.dim_heads, "differential": c.differential, "ff_mult": c.ff_mult,
           "variable_stride": c.decoder_new_tokens == 1, "chunk_midpoint_shift": c.chunk_midpoint_shift,
           **({"sliding_window": None, "chunk_size": c.chunk_size} if c.chunk_size else
              {"sliding_window": [c.sliding_window] * 2})}
    patched = c.audio_channels * c.patch_size
    dit = {**{k: v[0] for k, v in DIT_OPTIONS.items()}, "io_channels": d.io_channels, "embed_dim": d.embed_dim,
           "depth": d.depth, "num_heads": d.num_heads, "cond_token_dim": d.cond_token_dim,
           "global_cond_dim": d.global_cond_dim, "local_add_cond_dim": d.local_cond_dim or None,
           "timestep_features_dim": d.timestep_features_dim, "num_memory_tokens": d.memory_tokens,
           "attn_kwargs": {"qk_norm": "rms", "differential": d.differential, "qk_norm_eps": d.qk_norm_eps},
           "ff_kwargs": {"mult": d.ff_mult}, "norm_kwargs": {"eps": d.norm_eps}}
    lo, hi = plan.half_logsnr
    return {
        "model_type": "diffusion_cond", "sample_rate": c.sample_rate, "audio_channels": c.audio_channels,
        "sample_size": round(plan.max_duration * c.sample_rate),
        "model": {
            "pretransform": {"type": "autoencoder", "config": {
                "encoder": {"type": "same", "config": {**trb, "in_channels": patched,
                                                      "sinusoidal_blocks": c.encoder_sinusoidal_blocks[0]}},
                "decoder": {"type": "same", "soft_clip": c.soft_clip,
                            "config": {**trb, "out_channels": patched,
                                       "sinusoidal_blocks": c.decoder_sinusoidal_blocks}},
                "pretransform": {"type": "patched", "config": {"channels": c.audio_channels,
                                                               "patch_size": c.patch_size}},
                "bottleneck": {"type": "soft_norm", "config": {"dim": c.latent_dim, "auto_scale": True}},
                "latent_dim": c.latent_dim, "downsampling_ratio": c.hop, "io_channels": c.audio_channels}},
            "conditioning": {"cond_dim": d.cond_token_dim, "configs": [
                {"id": text_id, "type": "t5gemma", "config": {"model_name": TEXT_MODEL, "max_length": plan.text_len,
                                                              "padding_mode": "learned"}},
                {"id": seconds_id, "type": "number", "config": {"min_val": plan.duration["min_val"],
                                                                 "max_val": plan.duration["max_val"],
                                                                 "fourier_features_type": "expo"}}]},
            "diffusion": {
                "type": "dit", "config": dit,
                "diffusion_objective": "rf_denoiser" if plan.distilled else "rectified_flow",
                "cross_attention_cond_ids": [text_id, seconds_id], "global_cond_ids": [seconds_id],
                "local_add_cond_ids": LOCAL_IDS if d.local_cond_dim else [],
                "sampling_distribution_shift_options": {"type": "logsnr", "rate": 0.0, "anchor_logsnr": lo,
                                                        "logsnr_end": hi}},
            "io_channels": d.io_channels}}



def checkpoint_state(parts: Parts, plan: Plan, text_id: str = "prompt",
                     seconds_id: str = "seconds_total") -> dict[str, Tensor]:
    """``Parts`` weights under the reference's names (the inverse of ``translate``): for writing checkpoints in
    this layout."""
    state = {k: v.detach().contiguous() for k, v in parts.state_dict().items()}
    dit = {k[len("dit."):]: v for k, v in state.items() if k.startswith("dit.")}
    codec = {k[len("codec."):]: v for k, v in state.items() if k.startswith("codec.")}
    out = {"model.model." + k: v for k, v in dit_to_stability(dit, plan.dit).items()}
    out.update({"pretransform.model." + k: v for k, v in same_to_stability(codec, plan.codec).items()})
    out[f"conditioner.conditioners.{text_id}.padding_embedding"] = dit["prompt_padding_embedding"]
    for name in ("weight", "bias"):
        out[f"conditioner.conditioners.{seconds_id}.embedder.embedding.1.{name}"] = state[f"duration.linear.{name}"]
    return {k: v.contiguous() for k, v in out.items()}
