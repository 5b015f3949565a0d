"""Random-weight checkpoints of a published model's size, written in that model's own download format, so that speed
and memory are measured at the paper's scale through the code path a real download takes (format detection, the
registry, ``load_checkpoint_dir``, the service and the benchmarks). The weights are random: the audio is noise.

    write_random_sao_small("runs/sao-small-sized")      # or: tta sized sao-small --out runs/sao-small-sized
    write_random_checkpoint("runs/sao-1.0-sized", "sao-1.0")  # or: tta sized sao-1.0 (1.06 B-parameter DiT)

writes a directory laid out like a Stable Audio Open Small download in stable-audio-tools format:

- ``model_config.json``: ``reference_configs.sao_small_config`` (DiT 1024 wide, 16 layers, 8 heads, 64 latent
  channels, 256 latent frames = 11.9 s at 44.1 kHz; Oobleck VAE with strides 2, 4, 4, 8, 8; 64 T5 tokens of 768);
- ``model.safetensors``: the loader's own modules (``format_stable_audio_tools.Parts``) with PyTorch's default
  initialisation, saved under stable-audio-tools' key names and layouts (VAE convolutions weight-normed as
  ``weight_g`` / ``weight_v``, snake parameters flat, the rotary frequency table), checked by translating them back;
- ``text_encoder/``: the T5 the checkpoint does not hold, T5-base-sized (768 wide, 12 layers, 12 heads, d_ff 3072,
  T5's vocabulary size) with random weights, and a word-level tokenizer built here (T5's special tokens, one token
  per word or punctuation mark; the real vocabulary does not matter for random weights);
- ``serving.json``: a description saying the weights are random.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from models.checkpoints.bundle import SERVING_OVERRIDES
from models.checkpoints.format_stable_audio_tools import (
    CONFIG_FILE,
    Parts,
    Plan,
    read_plan,
    translate,
)
from models.checkpoints.reference_configs import sao_1_config, sao_small_config
from models.checkpoints.sized_stable_audio_3 import FORMAT as SA3_FORMAT
from models.checkpoints.sized_stable_audio_3 import MODELS as SA3_MODELS
from models.checkpoints.sized_stable_audio_3 import sized_parameter_counts as sa3_parameter_counts
from models.checkpoints.sized_stable_audio_3 import write_random_sa3
from models.checkpoints.weights import check_fit, expected_shapes, tensor_shapes
from models.checkpoints.word_tokenizer import word_tokenizer

# T5 encoders standing in for the one the config names: t5-base at full size, a 32-wide one for the tiny scale
T5_SIZES = {
    "full": {"d_model": 768, "num_layers": 12, "num_heads": 12, "d_kv": 64, "d_ff": 3072, "vocab_size": 32128},
    "tiny": {"d_model": 32, "num_layers": 2, "num_heads": 2, "d_kv": 16, "d_ff": 64, "vocab_size": 64},
}
_ENCODER_BLOCK = {"res_unit1": 0, "res_unit2": 1, "res_unit3": 2, "snake1": 3, "conv1": 4}
_DECODER_BLOCK = {"snake1": 0, "conv_t1": 1, "res_unit1": 2, "res_unit2": 3, "res_unit3": 4}
_RESIDUAL_UNIT = {"snake1": 0, "conv1": 1, "snake2": 2, "conv2": 3}


def t5_config(scale: str):
    from transformers import T5Config

    return T5Config(**T5_SIZES[scale], pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


# the published models this module writes: their stable-audio-tools configs and names
MODELS = {"sao-small": (sao_small_config, "Stable Audio Open Small"),
          "sao-1.0": (sao_1_config, "Stable Audio Open 1.0")}


def build_sized(model: str = "sao-small", scale: str = "full", seed: int = 0,
                device: str = "cpu") -> tuple[Plan, Parts, nn.Module]:
    """The plan, the loader's modules and the T5 encoder of ``model`` (``MODELS``) at this scale,
    default-initialised from ``seed`` (the global RNG is left as it was); ``device="meta"`` allocates nothing."""
    from transformers import T5EncoderModel

    config, title = MODELS[model]
    plan = read_plan(config(scale), f"{title} ({scale})", t5_dim=T5_SIZES[scale]["d_model"])
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        parts = Parts(plan)
        torch.manual_seed(seed + 1)
        t5 = T5EncoderModel(t5_config(scale))
    return plan, parts.eval(), t5.eval()


def parameter_counts(parts: Parts, t5: nn.Module) -> dict[str, int]:
    def count(*modules):
        return sum(p.numel() for m in modules if m is not None for p in m.parameters())

    return {"dit": count(parts.dit), "conditioners": count(parts.numbers, parts.text_proj),
            "vae_encoder": count(parts.codec.encoder), "vae_decoder": count(parts.codec.decoder),
            "text_encoder": count(t5)}


def build_sao_small(scale: str = "full", seed: int = 0, device: str = "cpu") -> tuple[Plan, Parts, nn.Module]:
    return build_sized("sao-small", scale, seed, device)


def sized_parameter_counts(model: str = "sao-small", scale: str = "full") -> dict[str, int]:
    """Parameter counts at this scale, from modules on the meta device (no weights allocated)."""
    if model in SA3_MODELS:
        return sa3_parameter_counts(model, scale)
    _, parts, t5 = build_sized(model, scale, device="meta")
    return parameter_counts(parts, t5)


def sao_small_parameter_counts(scale: str = "full") -> dict[str, int]:
    return sized_parameter_counts("sao-small", scale)


def to_stable_audio_tools(state: dict[str, Tensor], plan: Plan) -> dict[str, Tensor]:
    """``Parts`` weights -> the state dict of stable-audio-tools' ``ConditionedDiffusionModelWrapper`` (the inverse
    of ``format_stable_audio_tools.translate``), with the rotary table the reference keeps in its state dict."""
    out: dict[str, Tensor] = {}
    n_blocks = len(plan.codec.strides)
    for key, value in state.items():
        group, _, rest = key.partition(".")
        if group == "dit":
            out["model.model." + _dit_key(rest)] = value
        elif group == "numbers":
            ident, _, rest = rest.partition(".")
            rest = "0.weights" if rest == "weights" else rest.replace("proj.", "1.", 1)
            out[f"conditioner.conditioners.{ident}.embedder.embedding.{rest}"] = value
        elif group == "text_proj":
            out[f"conditioner.conditioners.{plan.text_id}.proj_out.{rest}"] = value
        elif group == "codec":
            name = "pretransform.model." + _oobleck_key(rest, n_blocks)
            if name.endswith((".alpha", ".beta")):
                value = value.flatten()
            elif name.endswith(".weight") and value.dim() == 3:  # WNConv1d / WNConvTranspose1d, weight norm over dim 0
                stem = name[: -len("weight")]
                out[stem + "weight_g"] = torch.linalg.vector_norm(value, dim=(1, 2), keepdim=True)
                name = stem + "weight_v"
            out[name] = value
        else:
            raise ValueError(f"no stable-audio-tools name for {key!r}")
    rope = plan.dit.rope_dim
    out["model.model.transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (
        torch.arange(0, rope, 2, dtype=torch.float32) / rope)
    return {k: v.detach().contiguous() for k, v in out.items()}


def _dit_key(key: str) -> str:
    """Ours -> stable-audio-tools' DiffusionTransformer (inverse of ``stable_audio_dit.stable_audio_tools_key``)."""
    if key == "timestep_features":
        return "timestep_features.weight"
    if key.startswith(("layers.", "project_in.", "project_out.")):
        key = "transformer." + key
    key = key.replace(".ff.proj_in.", ".ff.ff.0.proj.").replace(".ff.proj_out.", ".ff.ff.2.")
    for norm in ("pre_norm", "cross_attend_norm", "ff_norm"):
        key = key.replace(f".{norm}.weight", f".{norm}.gamma").replace(f".{norm}.bias", f".{norm}.beta")
    return key


def _oobleck_key(key: str, n_blocks: int) -> str:
    """Ours -> stable-audio-tools' OobleckEncoder/Decoder (inverse of ``oobleck.stable_audio_tools_key``)."""
    side, name, *rest = key.split(".")
    if name != "block":
        index = {"conv1": 0, "snake1": n_blocks + 1, "conv2": n_blocks + 2}[name]
        return ".".join([f"{side}.layers.{index}", *rest])
    i, part, *rest = rest
    head = f"{side}.layers.{int(i) + 1}.layers.{(_ENCODER_BLOCK if side == 'encoder' else _DECODER_BLOCK)[part]}"
    if part.startswith("res_unit"):
        unit, *rest = rest
        head += f".layers.{_RESIDUAL_UNIT[unit]}"
    return ".".join([head, *rest])


def write_random_sao_small(out_dir: str | Path, scale: str = "full", seed: int = 0,
                           overwrite: bool = False) -> dict[str, int]:
    """Write Stable Audio Open Small ("full", or the "tiny" test scale) with random weights as a stable-audio-tools
    checkpoint directory (see the module docstring)."""
    return write_random_checkpoint(out_dir, "sao-small", scale, seed, overwrite)


def write_random_checkpoint(out_dir: str | Path, model: str = "sao-small", scale: str = "full", seed: int = 0,
                            overwrite: bool = False) -> dict[str, int]:
    """Write ``model`` (``MODELS``: Stable Audio Open Small or 1.0) with random weights as a stable-audio-tools
    checkpoint directory (``SA3_MODELS``: Stable Audio 3, in diffusers' layout, ``sized_stable_audio_3``). Returns the
    parameter counts of its parts. An existing non-empty directory is refused unless ``overwrite`` (which replaces the
    files written here, nothing else)."""
    from safetensors.torch import save_file

    if model in SA3_MODELS:
        return write_random_sa3(out_dir, model, scale, seed, overwrite)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (overwrite=True / --force replaces its checkpoint)")
    config, title = MODELS[model]
    plan, parts, t5 = build_sized(model, scale, seed)
    state = to_stable_audio_tools(parts.state_dict(), plan)
    origin: dict[str, str] = {}
    mapped = translate(state, plan, str(out), origin)
    check_fit(expected_shapes(parts), tensor_shapes(mapped), str(out), "written", origin)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config(scale), indent=2) + "\n")
    save_file(state, str(out / "model.safetensors"),
              metadata={"format": "pt", "weights": f"random (seed {seed}); models.checkpoints.sized"})
    t5.save_pretrained(out / "text_encoder")
    word_tokenizer(plan.text_len).save_pretrained(out / "text_encoder")
    description = (f"{title} architecture ({scale} size) with RANDOM weights, for speed and memory "
                   f"measurements only: the audio is noise")
    (out / SERVING_OVERRIDES).write_text(json.dumps({"description": description}, indent=2) + "\n")
    return parameter_counts(parts, t5)


def describe(model: str) -> str:
    """The published model ``model`` names and the layout ``write_random_checkpoint`` writes it in."""
    if model in SA3_MODELS:
        return f"{SA3_MODELS[model]} ({SA3_FORMAT})"
    return f"{MODELS[model][1]} (stable-audio-tools format)"


__all__ = ["MODELS", "SA3_MODELS", "build_sao_small", "build_sized", "describe", "parameter_counts",
           "sao_small_parameter_counts", "sized_parameter_counts", "to_stable_audio_tools",
           "write_random_checkpoint", "write_random_sao_small"]
