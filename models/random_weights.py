"""A model's architecture with random weights: what speed measurements and device checks need, without the weights.

Speed does not depend on the weights, and a check that compares two execution paths of one model (eager against
CUDA graphs, step by step against one captured generation) holds for any weights. So a machine that is to measure
or check the embedded models needs only their configs and the text encoder's tokenizer: the shipped weights (tens of
megabytes per model) and the text encoder's (87 MB for all-MiniLM-L6-v2) can stay behind
(``benchmarks/gpu_pack.sh``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

SEED = 0


def random_text_encoder_copy(config: dict, out: Path) -> dict:
    """A copy of the Hugging Face text encoder ``config`` names (``path``, else the embedded all-MiniLM-L6-v2) with
    random weights: its tokenizer and config files copied, its weights drawn afresh (seeded). Returns the
    text-encoder config that loads the copy."""
    from transformers import AutoConfig, AutoModel

    from models.text.encoders import minilm_path

    source = Path(config["path"]) if config.get("path") else minilm_path()
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    torch.manual_seed(SEED)
    AutoModel.from_config(AutoConfig.from_pretrained(source)).save_pretrained(out, safe_serialization=True)
    return {**config, "path": str(out)}


def random_model_copy(model: Path, out: Path) -> Path:
    """The model directory ``model``'s architecture (its config.json, its codec's config, its text encoder) with
    random weights (seeded), saved as a model directory under ``out``; returns its path. Reads no weights."""
    from models.bundle import ModelBundle
    from models.codec import HarmonicAutoencoder
    from models.config import BundleConfig
    from models.dit import DiT
    from models.layers import fill_zero_parameters
    from models.text import load_text_encoder

    model, out = Path(model), Path(out)
    config = BundleConfig.load(model / "config.json")
    codec_dir = (model / config.codec_from).resolve() if config.codec_from else model
    codec_config = config.codec or json.loads((codec_dir / "config.json").read_text())["codec"]
    codec_config = {k: v for k, v in codec_config.items() if k not in ("latent_shift", "latent_scale")}
    torch.manual_seed(SEED)
    dit = DiT.from_config(config.denoiser)
    fill_zero_parameters(dit, 0.02)
    codec = HarmonicAutoencoder.from_config(codec_config)
    config.codec, config.codec_from = {}, None
    config.text_encoder = random_text_encoder_copy(config.text_encoder or {"name": "minilm"}, out / "text_encoder")
    bundle = ModelBundle(config, dit, codec, load_text_encoder(config.text_encoder))
    bundle.save(out / config.name, save_codec=True)
    return out / config.name
