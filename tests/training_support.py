"""Tiny real models and a tiny real latent cache for the distillation and ARC tests."""
from __future__ import annotations

from pathlib import Path

import torch

from models.bundle import ModelBundle
from models.config import BundleConfig
from models.codec import HarmonicAutoencoder, HarmonicAutoencoderConfig
from models.dit import DiT, DiTConfig
from models.layers import fill_zero_parameters
from models.training.latent_cache import LatentCache, build_latent_cache


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Random values in the zero-initialised adaLN and output layers too, so outputs depend on every input."""
    fill_zero_parameters(module, scale, torch.Generator().manual_seed(seed))


def tiny_codec() -> HarmonicAutoencoder:
    """The tests' harmonic codec: the real architecture at its smallest (weights from the current torch seed)."""
    return HarmonicAutoencoder(HarmonicAutoencoderConfig(hidden=32, encoder_blocks=1, decoder_latent_blocks=1,
                                                         decoder_frame_blocks=1))


def tiny_teacher(root: Path, text_encoder, depth: int = 3, default_steps: int = 8, seed: int = 0) -> ModelBundle:
    """A guided (CFG) VP-cosine v-prediction teacher with its own codec, saved and loaded back like a real one."""
    torch.manual_seed(seed)
    cfg = BundleConfig(name="tiny-teacher", default_steps=default_steps, max_steps=50, default_guidance=3.0,
                       default_duration=1.0, max_duration=10.0)
    dit = DiT(DiTConfig(width=32, depth=depth, heads=2, text_dim=text_encoder.dim, pooled_dim=text_encoder.pooled_dim))
    randomise(dit, seed)
    codec = tiny_codec()
    ModelBundle(cfg, dit, codec, text_encoder).save(root / "tiny-teacher", save_codec=True)
    return ModelBundle.load(root / "tiny-teacher", text_encoder=text_encoder)


def tiny_cache(bundle: ModelBundle, directory: Path, clips: int = 6) -> LatentCache:
    """Real corpus clips (random durations) encoded with the bundle's codec."""
    return LatentCache.load(build_latent_cache(bundle.codec, directory, clips, seed=0, shard_size=4))


def count_denoiser_rows(bundle: ModelBundle) -> list[int]:
    """Rows of every denoiser call made from now on (a forward hook; the model itself runs unchanged)."""
    rows: list[int] = []
    bundle.denoiser.register_forward_hook(lambda module, args, out: rows.append(int(out.shape[0])))
    return rows
