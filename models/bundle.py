"""ModelBundle: text encoder + denoiser + codec + diffusion maths + defaults, loaded from a model directory.

A model directory holds ``config.json`` (see ``BundleConfig``), ``denoiser.safetensors`` and ``codec.safetensors``
(or ``codec`` pointing at another model's directory, so students share their teacher's autoencoder).

``predict_x0`` is the single denoiser call the serving scheduler makes per tick: it takes a batch of samples that
may each be at a different time, with a different guidance scale and duration, and runs ONE forward pass over the
conditional rows plus the unconditional rows of the guided samples.
"""
from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.codec import load_codec
from models.codec.base import AudioCodec
from models.diffusion import apply_guidance, make_parameterization, make_sampler, make_schedule
from models.dit import DiT
from models.text import TextEmbedding, load_text_encoder
from models.text.encoders import NumberChannels, pad_stack

ZOO = Path(__file__).parent / "zoo"


@dataclass
class BundleConfig:
    name: str
    kind: str = "teacher"  # teacher | bsa | arc | ...
    schedule: dict = field(default_factory=lambda: {"name": "vp-cosine"})
    parameterization: str = "v"
    sampler: str = "ddim"
    default_steps: int = 200
    max_steps: int = 500
    default_guidance: float = 3.0
    guidance_in_model: bool = False  # student learned the guided output: one forward per step, guidance as input
    default_duration: float = 5.0
    max_duration: float = 10.0
    text_encoder: dict = field(default_factory=lambda: {"name": "minilm"})
    denoiser: dict = field(default_factory=dict)
    codec: dict = field(default_factory=dict)
    codec_from: str | None = None  # directory (relative to this one) whose codec this model shares
    # The first ``pitch_channels`` latent channels state tonality and pitch (the harmonic codec's pitch slots; 0:
    # none). They are sampled at their own temperature, their initial noise scaled by ``pitch_noise``, and guided at
    # ``pitch_guidance`` in guided requests (None: the request's guidance). A stated pitch is a deterministic
    # function of the caption, so a seed should not move it, and guidance extrapolates (tonality, tonality x log
    # pitch) alike, which stretches the pitch away from 400 Hz (models/zoo/tta-teacher/README.md, "Session 20").
    pitch_channels: int = 0
    pitch_noise: float = 1.0
    pitch_guidance: float | None = None
    description: str = ""
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        guidance = 0.0 if self.pitch_guidance is None else self.pitch_guidance
        if self.pitch_channels < 0 or self.pitch_noise < 0 or guidance < 0:
            raise ValueError(f"{self.name}: pitch_channels, pitch_noise and pitch_guidance must be >= 0 (got "
                             f"{self.pitch_channels}, {self.pitch_noise}, {self.pitch_guidance})")

    @classmethod
    def unknown_keys(cls, keys) -> list[str]:
        """The names among ``keys`` that are not fields of this config, sorted."""
        return sorted(set(keys) - set(cls.__dataclass_fields__))

    @classmethod
    def load(cls, path: Path) -> "BundleConfig":
        data = json.loads(Path(path).read_text())
        unknown = cls.unknown_keys(data)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}")
        return cls(**data)


@dataclass
class Conditioning:
    """Everything the denoiser is conditioned on, batched."""

    text: TextEmbedding
    seconds: Tensor  # [B] requested duration

    def select(self, index) -> "Conditioning":
        return Conditioning(self.text.select(index), self.seconds[index])

    def to(self, device) -> "Conditioning":
        return Conditioning(self.text.to(device), self.seconds.to(device))


def concat_conditioning(items: list[Conditioning]) -> Conditioning:
    tokens, mask = pad_stack([t for c in items for t in unpad(c.text)])
    pooled = torch.cat([c.text.pooled for c in items])
    return Conditioning(TextEmbedding(tokens, mask, pooled), torch.cat([c.seconds for c in items]))


def unpad(text: TextEmbedding) -> list[Tensor]:
    lengths = text.mask.sum(1).tolist()
    return [text.tokens[i, :n] for i, n in enumerate(lengths)]


class ModelBundle:
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
        self.parameterization = make_parameterization(config.parameterization, self.schedule)
        self.sampler = make_sampler(config.sampler, self.schedule)
        self._uncond: TextEmbedding | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", text_encoder=None) -> "ModelBundle":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory: config.json is missing")
        config = BundleConfig.load(path / "config.json")
        denoiser = DiT.from_config(config.denoiser)
        denoiser.config.check_numbers(NumberChannels.from_config(config.text_encoder), f"{path}: ")
        denoiser.load_state_dict(load_file(path / "denoiser.safetensors"))
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

    # ------------------------------------------------------------------ conditioning
    def latent_frames(self, duration: float) -> int:
        return self.codec.latent_frames(round(duration * self.codec.sample_rate))

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        return self.text_encoder.encode(prompts)

    def conditioning(self, prompts: list[str], durations: list[float]) -> Conditioning:
        return Conditioning(self.encode_text(prompts), torch.tensor(durations, dtype=torch.float32))

    def unconditional_text(self, n: int) -> TextEmbedding:
        """The empty prompt's embedding (what condition dropout trained the unconditional branch on)."""
        if self._uncond is None:
            self._uncond = self.encode_text([""])
        u = self._uncond
        return TextEmbedding(u.tokens.expand(n, -1, -1), u.mask.expand(n, -1), u.pooled.expand(n, -1))

    # ------------------------------------------------------------------ one denoiser call
    @torch.inference_mode()
    def predict_x0(self, z: Tensor, t: Tensor, cond: Conditioning, guidance: Tensor, frame_mask: Tensor) -> Tensor:
        """x0 predictions for a heterogeneous batch in ONE forward pass.

        z [B, C, T] (padded), t [B], guidance [B], frame_mask [B, T]. Samples with guidance != 1 get an extra
        unconditional row in the same forward (unless the model takes guidance as an input)."""
        dev = self.device
        z, t, guidance, frame_mask = z.to(dev), t.to(dev, torch.float32), guidance.to(dev), frame_mask.to(dev)
        # everything on the model's device: guidance picks rows of the conditioning by index
        out = guided_forward(self.denoiser, z, t, cond.to(dev), guidance, frame_mask,
                             lambda n: self.unconditional_text(n).to(dev), self.config.guidance_in_model,
                             lead_guidance(self.config))
        return self.parameterization.to_x0(out, z, t)

    def forward_count(self, guidance: Tensor) -> int:
        """Rows of the denoiser batch that ``predict_x0`` runs for these samples."""
        if self.config.guidance_in_model:
            return guidance.numel()
        return guidance.numel() + int((guidance != 1.0).sum())

    # ------------------------------------------------------------------ whole generation (CLI, benchmarks)
    def initial_noise(self, seed: int, frames: int) -> tuple[Tensor, torch.Generator]:
        return initial_noise(self.config, self.codec.latent_dim, seed, frames)

    def step_noise(self, generator: torch.Generator, frames: int) -> Tensor:
        """Fresh noise for one step of a stochastic sampler (ping-pong), drawn from the sample's own generator."""
        return torch.randn(self.codec.latent_dim, frames, generator=generator)

    @torch.inference_mode()
    def generate_latents(self, prompts: list[str], durations: list[float], seeds: list[int], steps: int | None = None,
                         guidance: float | None = None, initial: Tensor | None = None) -> list[Tensor]:
        steps = steps or self.config.default_steps
        scale = self.config.default_guidance if guidance is None else guidance
        frames = [self.latent_frames(d) for d in durations]
        length = max(frames)
        gens, zs = [], []
        for i, (seed, f) in enumerate(zip(seeds, frames)):
            z, g = self.initial_noise(seed, f)
            if initial is not None:
                z = initial[i, :, :f]
            zs.append(z)
            gens.append(g)
        z = torch.stack([torch.nn.functional.pad(x, (0, length - x.shape[-1])) for x in zs])
        frame_mask = torch.arange(length)[None] < torch.tensor(frames)[:, None]
        cond = self.conditioning(prompts, durations)
        grid = self.sampler.timesteps(steps)
        g_t = torch.full((len(prompts),), float(scale))
        for i in range(steps):
            t = grid[i].expand(len(prompts)).float()
            t_next = grid[i + 1].expand(len(prompts)).float()
            x0 = self.predict_x0(z, t, cond, g_t, frame_mask)
            noise = None
            if self.sampler.stochastic:
                noise = torch.stack([torch.nn.functional.pad(self.step_noise(gen, f), (0, length - f))
                                     for f, gen in zip(frames, gens)])
            z = self.sampler.step(z, x0, t, t_next, noise) * frame_mask[:, None]
        return [z[i, :, :f] for i, f in enumerate(frames)]

    @torch.inference_mode()
    def decode(self, latents: list[Tensor], durations: list[float]) -> list[Tensor]:
        """Latents -> waveforms [2, round(duration * sr)] (``decode_grouped``)."""
        return decode_grouped(latents, durations, self.codec.sample_rate,
                              lambda batch: self.codec.decode(batch.to(self.device)).cpu(),
                              decode_batch_limit(self.device))

    def generate(self, prompts: list[str], durations: list[float], seeds: list[int], steps: int | None = None,
                 guidance: float | None = None) -> list[Tensor]:
        return self.decode(self.generate_latents(prompts, durations, seeds, steps, guidance), durations)


def decode_batch_limit(device) -> int:
    """Clips per decoder call. The decoder's intermediates grow with the batch; on a CPU its time per clip does not
    fall (the embedded codec, 10 s clips, 2 cores: 64 / 67 / 94 ms per clip at 1 / 2 / 4 under PyTorch, 75 / 72 / 83
    under ONNX Runtime), so one clip per call there, which also keeps the peak memory of a large tick low. A GPU's
    decoder gains from a batch (not measured here)."""
    return 1 if torch.device(device).type == "cpu" else 4


def decode_grouped(latents: list[Tensor], durations: list[float], sample_rate: int, decode_batch,
                   max_batch: int) -> list[Tensor]:
    """Waveforms [2, round(duration * sample_rate)] from latents [D, T] through ``decode_batch`` ([B, D, T] ->
    [B, 2, N]). Latents of equal length decode together, at most ``max_batch`` per call (``decode_batch_limit``: that
    bounds the peak memory of a large batch); lengths are not padded together
    because the decoder's convolutions would let padding leak into a clip's last frames."""
    out: list[Tensor | None] = [None] * len(latents)
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(latents):
        groups.setdefault(x.shape[-1], []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), max_batch):
            part = idx[start: start + max_batch]
            wave = decode_batch(torch.stack([latents[i] for i in part]))
            for j, i in enumerate(part):
                out[i] = wave[j, :, : round(durations[i] * sample_rate)]
    return out


def pad_axis(x: Tensor, length: int, dim: int) -> Tensor:
    """Zero-pad axis ``dim`` (>= 0) of ``x`` to ``length`` (False for a bool tensor)."""
    if x.shape[dim] == length:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, length - x.shape[dim]]
    return torch.nn.functional.pad(x, pad)


def pad_tokens(x: Tensor, length: int) -> Tensor:
    """Zero-pad the token axis (dim 1) of a text batch to ``length``."""
    return pad_axis(x, length, 1)


def initial_noise(config: BundleConfig, latent_dim: int, seed: int, frames: int) -> tuple[Tensor, torch.Generator]:
    """A sample's starting noise [C, frames] and the generator its later step noise comes from, for every runtime:
    every random number of a sample depends only on its own seed, never on its batch companions. The pitch channels
    (``BundleConfig.pitch_channels``) start at ``pitch_noise`` times the draw."""
    g = torch.Generator().manual_seed(int(seed))
    z = torch.randn(latent_dim, frames, generator=g)
    if config.pitch_channels and config.pitch_noise != 1.0:
        z[: config.pitch_channels] *= config.pitch_noise
    return z, g


def lead_guidance(config: BundleConfig) -> tuple[int, float] | None:
    """``apply_guidance``'s ``lead`` for this model: its pitch channels' own guidance scale, if it has one."""
    if config.pitch_channels and config.pitch_guidance is not None:
        return config.pitch_channels, float(config.pitch_guidance)
    return None


def guided_forward(denoise, z: Tensor, t: Tensor, cond: Conditioning, guidance: Tensor, frame_mask: Tensor,
                   unconditional_text, guidance_in_model: bool, lead: tuple[int, float] | None = None) -> Tensor:
    """Classifier-free guidance batched into ONE denoiser call, for every runtime: samples with guidance != 1 get
    an unconditional row (``unconditional_text(n)``: the empty prompt) appended to the same batch, and their raw
    outputs are combined by ``apply_guidance``; a model that takes guidance as an input (a guidance-distilled
    student) gets it directly. ``denoise(z, t, tokens, mask, pooled, seconds, frame_mask, guidance=None)`` runs the
    network and returns its raw output. ``lead`` (``lead_guidance``): the leading channels' own guidance scale in the
    guided samples."""
    text = cond.text
    if guidance_in_model:
        return denoise(z, t, text.tokens, text.mask, text.pooled, cond.seconds, frame_mask, guidance=guidance)
    guided = torch.nonzero(guidance != 1.0).flatten()
    n, g = z.shape[0], guided.numel()
    if not g:
        return denoise(z, t, text.tokens, text.mask, text.pooled, cond.seconds, frame_mask)
    u = unconditional_text(g)
    length = max(text.tokens.shape[1], u.tokens.shape[1])
    out = denoise(torch.cat([z, z[guided]]), torch.cat([t, t[guided]]),
                  torch.cat([pad_tokens(text.tokens, length), pad_tokens(u.tokens, length)]),
                  torch.cat([pad_tokens(text.mask, length), pad_tokens(u.mask, length)]),
                  torch.cat([text.pooled, u.pooled]), torch.cat([cond.seconds, cond.seconds[guided]]),
                  torch.cat([frame_mask, frame_mask[guided]]))
    cond_out = out[:n].clone()
    cond_out[guided] = apply_guidance(out[:n][guided], out[n:], guidance[guided], lead)
    return cond_out


def available_models(model_dir: str | Path = ZOO) -> list[Path]:
    """Model directories under ``model_dir``: a config.json beside denoiser weights (codec-only dirs are skipped), or
    a downloaded checkpoint in a format ``models.checkpoints`` reads; ``model_dir`` may also be such a checkpoint."""
    # imported here because models.checkpoints builds on this module
    from models.checkpoints import is_checkpoint_dir

    root = Path(model_dir)
    if not root.is_dir():
        return []
    if is_checkpoint_dir(root):
        return [root]
    return sorted(p for p in root.iterdir()
                  if ((p / "config.json").is_file() and (p / "denoiser.safetensors").is_file())
                  or is_checkpoint_dir(p))
