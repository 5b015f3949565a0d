"""ModelBundle: text encoder + denoiser + codec + diffusion maths + defaults, loaded from a model directory; the
eager PyTorch backend of ``models.pipeline`` (its ``Networks``), and the model object training works on.

A model directory holds ``config.json`` (see ``models.config.BundleConfig``), ``denoiser.safetensors`` and
``codec.safetensors`` (or ``codec_from`` pointing at another model's directory, so students share their teacher's
autoencoder). ``bundle.pipeline`` samples it: ``bundle.pipeline.generate(prompts, durations, seeds)``.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from models.codec import load_codec
from models.codec.base import AudioCodec
from models.config import BundleConfig
from models.diffusion import make_schedule
from models.dit import DiT
from models.files import read_weights
from models.pipeline import Networks, Pipeline
from models.text import TextEmbedding, load_text_encoder
from models.text.encoders import NumberChannels


class ModelBundle(Networks):
    """An embedded model: its networks in eager PyTorch on one device, its config, and the pipeline that samples
    it."""

    def __init__(self, config: BundleConfig, denoiser: DiT, codec: AudioCodec, text_encoder, device="cpu",
                 path: Path | None = None):
        self.config = config
        self.name = config.name
        self.path = path
        self.device = torch.device(device)
        self.denoiser = denoiser.to(self.device).eval()
        self.codec = codec.to(self.device).eval()
        self.text_encoder = text_encoder
        self.schedule = make_schedule(config.schedule)
        self._uncond: TextEmbedding | None = None

    @cached_property
    def pipeline(self) -> Pipeline:
        """The sampling loop over these networks."""
        return Pipeline(self)

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def latent_dim(self) -> int:
        return self.codec.latent_dim

    @property
    def samples_per_latent(self) -> int:
        return self.codec.samples_per_latent

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", text_encoder=None) -> ModelBundle:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory: config.json is missing")
        config = BundleConfig.load(path / "config.json")
        denoiser = DiT.from_config(config.denoiser)
        denoiser.config.check_numbers(NumberChannels.from_config(config.text_encoder), f"{path}: ")
        denoiser.load_state_dict(read_weights(path / "denoiser.safetensors"))
        codec_dir = (path / config.codec_from).resolve() if config.codec_from else path
        codec = load_codec(codec_dir, config.codec or None)
        text_encoder = text_encoder or load_text_encoder(config.text_encoder, device=device)
        return cls(config, denoiser, codec, text_encoder, device=device, path=path)

    def save(self, path: str | Path, save_codec: bool = True) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        cfg["denoiser"] = self.denoiser.to_config()
        if save_codec:
            cfg["codec"] = self.codec.to_config()
            cfg["codec_from"] = None
            save_file({k: v.contiguous() for k, v in self.codec.state_dict().items()}, path / "codec.safetensors")
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.denoiser.state_dict().items()}, path / "denoiser.safetensors")

    # ------------------------------------------------------------------ the networks (models.pipeline.Networks)
    def latent_frames(self, duration: float) -> int:
        return self.codec.latent_frames(round(duration * self.codec.sample_rate))

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        return self.text_encoder.encode(prompts)

    def unconditional_text(self, n: int) -> TextEmbedding:
        """The empty prompt's embedding (what condition dropout trained the unconditional branch on)."""
        if self._uncond is None:
            self._uncond = self.encode_text([""])
        u = self._uncond
        return TextEmbedding(u.tokens.expand(n, -1, -1), u.mask.expand(n, -1), u.pooled.expand(n, -1))

    @torch.inference_mode()
    def denoise(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                frame_mask: Tensor, guidance: Tensor | None = None, local_cond: Tensor | None = None) -> Tensor:
        dev = self.device
        extra = {} if local_cond is None else {"local_cond": local_cond.to(dev)}
        return self.denoiser(z.to(dev), t.to(dev), tokens.to(dev), token_mask.to(dev), pooled.to(dev),
                             seconds.to(dev), frame_mask.to(dev), guidance=None if guidance is None else guidance.to(dev),
                             **extra)

    @torch.inference_mode()
    def encode_audio(self, wave: Tensor) -> Tensor:
        return self.codec.encode(wave.to(self.device)).cpu()

    @torch.inference_mode()
    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.decode_on_device(latents).cpu()

    @torch.inference_mode()
    def decode_on_device(self, latents: Tensor) -> Tensor:
        return self.codec.decode(latents.to(self.device))
