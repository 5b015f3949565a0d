"""Random-weight Stable Audio 3 checkpoints at the published sizes (``models.checkpoints.sized`` has the others), in
diffusers' ``StableAudio3Pipeline`` layout, so that the service and diffusers' own pipeline load the same directory
(the benchmark runs both):

    write_random_checkpoint("runs/sa3-small-sized", "sa3-small")   # or: tta sized sa3-small

- ``model_index.json``, ``transformer/``, ``vae/``, ``duration_embedder/``: the loader's own modules
  (``stable_audio_3.Parts``) with PyTorch's default initialisation, saved under diffusers' names and layouts (the
  SAME mapping convs weight-normed, the rotary and Fourier tables it stores), with its config.json files;
- ``text_encoder/``: a T5Gemma encoder of google/t5gemma-b-b-ul2's shape with random weights; ``tokenizer/``: a
  word-level tokenizer built here (the real vocabulary does not matter for random weights);
- ``scheduler/``: FlowMatchEulerDiscreteScheduler, stochastic (the distilled model: ping-pong, 8 steps);
- ``serving.json``: a description saying the weights are random.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from models.checkpoints.bundle import SERVING_OVERRIDES
from models.checkpoints.reference_configs import sa3_config
from models.checkpoints.same_autoencoder import config_from_diffusers as same_config
from models.checkpoints.same_autoencoder import diffusers_config as same_diffusers_config
from models.checkpoints.same_autoencoder import to_diffusers as same_to_diffusers
from models.checkpoints.stable_audio_3 import Parts, Plan
from models.checkpoints.stable_audio_3_dit import config_from_diffusers as dit_config
from models.checkpoints.stable_audio_3_dit import diffusers_config as dit_diffusers_config
from models.checkpoints.stable_audio_3_dit import expo_frequencies
from models.checkpoints.stable_audio_3_dit import to_diffusers as dit_to_diffusers
from models.checkpoints.word_tokenizer import word_tokenizer

MODELS = {"sa3-small": "Stable Audio 3 Small", "sa3-medium": "Stable Audio 3 Medium"}
FORMAT = "diffusers StableAudio3Pipeline layout"
DIFFUSERS_VERSION = "0.42.1"


def t5gemma_config(module: dict):
    from transformers import T5GemmaConfig

    return T5GemmaConfig(encoder=module, decoder=module, is_encoder_decoder=False, vocab_size=module["vocab_size"])


def plan_of(model: str, scale: str) -> Plan:
    cfg = sa3_config(model, scale)
    d = cfg["duration_embedder"]
    plan = Plan(layout="diffusers", dit=dit_config(cfg["transformer"], model), codec=same_config(cfg["vae"]),
                duration={"fourier_dim": d["fourier_dim"], "min_val": d["min_val"], "max_val": d["max_val"]},
                text_len=cfg["text_len"], time_scale=cfg["scheduler"]["num_train_timesteps"], distilled=True)
    plan.max_duration = plan.published_max_duration(d["max_val"])
    return plan


def build(model: str = "sa3-small", scale: str = "full", seed: int = 0,
          device: str = "cpu") -> tuple[Plan, Parts, nn.Module]:
    """The plan, the loader's modules and the T5Gemma encoder of ``model`` at this scale, default-initialised from
    ``seed`` (the global RNG is left as it was); ``device="meta"`` allocates nothing."""
    from transformers import T5GemmaEncoderModel

    plan = plan_of(model, scale)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        parts = Parts(plan)
        torch.manual_seed(seed + 1)
        text = T5GemmaEncoderModel(t5gemma_config(sa3_config(model, scale)["text_encoder"]))
    return plan, parts.eval(), text.eval()


def parameter_counts(parts: Parts, text: nn.Module) -> dict[str, int]:
    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    return {"dit": count(parts.dit), "duration_embedder": count(parts.duration),
            "vae_encoder": count(parts.codec.encoder), "vae_decoder": count(parts.codec.decoder) + count(
                parts.codec.bottleneck), "text_encoder": count(text)}


def sized_parameter_counts(model: str = "sa3-small", scale: str = "full") -> dict[str, int]:
    """Parameter counts at this scale, from modules on the meta device (no weights allocated)."""
    _, parts, text = build(model, scale, device="meta")
    return parameter_counts(parts, text)


def diffusers_components(plan: Plan, parts: Parts, model: str, scale: str) -> dict[str, tuple[dict, dict]]:
    """Component folder -> (config.json, weights) in diffusers' names and layouts."""
    state = {k: v.detach().contiguous() for k, v in parts.state_dict().items()}

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    duration = {**part("duration."), "freqs": expo_frequencies(plan.duration["fourier_dim"])}
    dcfg = {"_class_name": "StableAudio3DurationEmbedder", **sa3_config(model, scale)["duration_embedder"]}
    return {"transformer": (dit_diffusers_config(plan.dit), dit_to_diffusers(part("dit."), plan.dit)),
            "vae": (same_diffusers_config(plan.codec), same_to_diffusers(part("codec."))),
            "duration_embedder": (dcfg, duration)}


def write_random_sa3(out_dir: str | Path, model: str = "sa3-small", scale: str = "full", seed: int = 0,
                     overwrite: bool = False) -> dict[str, int]:
    """Write ``model`` (``MODELS``) with random weights in diffusers' layout (see the module docstring); the
    parameter counts of its parts."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (overwrite=True / --force replaces its checkpoint)")
    plan, parts, text = build(model, scale, seed)
    for name, (config, weights) in diffusers_components(plan, parts, model, scale).items():
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "config.json").write_text(json.dumps({**config, "_diffusers_version": DIFFUSERS_VERSION},
                                                           indent=2) + "\n")
        file = out / name / "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(file), metadata={"format": "pt"})
        os.chmod(file, 0o644)  # safetensors writes owner-only files; a model directory is read by the serving user
    text.save_pretrained(out / "text_encoder")
    word_tokenizer(plan.text_len).save_pretrained(out / "tokenizer")
    (out / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                 **sa3_config(model, scale)["scheduler"]}
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = {"_class_name": "StableAudio3Pipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "duration_embedder": ["stable_audio_3", "StableAudio3DurationEmbedder"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "T5GemmaEncoderModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "transformer": ["diffusers", "StableAudio3DiTModel"], "vae": ["diffusers", "AutoencoderSAME"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    description = (f"{MODELS[model]} architecture ({scale} size) with RANDOM weights, for speed and memory "
                   f"measurements only: the audio is noise")
    (out / SERVING_OVERRIDES).write_text(json.dumps({"description": description}, indent=2) + "\n")
    return parameter_counts(parts, text)
