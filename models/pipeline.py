"""The pipeline: the one implementation of the sampling loop, over whichever backend runs the networks.

A generation is a set of ``Trajectory`` objects, one per requested sample, each with its own time grid (its own step
count), its own random generator (seeded by the request, so companions never change a sample's noise), its own
guidance scale and duration. ``Pipeline.step`` advances a ``DenoiseBatch`` of trajectories by one step each in ONE
denoiser forward: samples at different points of different grids, with different guidance and lengths, share it.
Everything between the networks lives here and nowhere else:

- the time grid (``Sampler.timesteps``) and the per-request noise (initial and per-step, ``initial_noise``);
- classifier-free guidance batched into the same forward (unconditional rows appended, ``guided_forward``);
- the conversion of the network's raw output to x0 (``Parameterization.to_x0``);
- the masked per-sample sampler step (padded frames stay zero);
- the grouped decode (equal lengths share a decoder call, ``decode_grouped``);
- the generation modes, as per-sample data that never force a batch of their own: audio-to-audio (the sample's
  grid starts part-way, at ``init_noise_level``, from its init clip's latents noised to that level), inpainting and
  outpainting (known latents and a keep mask: the model's trained inpainting input where it has one, else the known
  region's x0 prediction replaced by the known latents at every step), and a negative prompt (the condition of the
  sample's unconditional guidance row).

The backends (``Networks``: eager PyTorch in ``models.bundle.ModelBundle``, the service's compiled / CUDA-graph /
ONNX Runtime runtimes) only run the text encoder, the denoiser and the decoder. The serving engine drives
``start`` / ``step`` / ``decode`` tick by tick with samples joining and leaving between ticks; ``generate`` runs the
same calls to completion for the offline CLI, benchmarks, training-time validation and the tests. So a seed gives the
same audio through every path and every backend (up to float rounding across backends).

Every random number is drawn on the CPU from the sample's own generator when the sample starts (its initial noise
and, for a stochastic sampler, the noise of each of its steps, in the order the steps use them), so seeds keep their
meaning on every device. A running batch then lives where the backend computes (``Networks.batch_device``): its
latents, pre-drawn noise, grids, masks and guidance scales, the x0 conversion and the sampler step (float32) stay
there, and a step makes no host round-trip. Only per-request conditioning (a few KiB of text embedding) stays on the
host, and is copied once when a batch is formed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.conditioning import Conditioning, concat_conditioning, concat_text, pad_tokens
from models.config import BundleConfig
from models.diffusion import NoiseSchedule, apply_guidance, make_parameterization, make_sampler
from models.text import TextEmbedding


class Networks(ABC):
    """A backend: the three networks of a model and the geometry of its latents, nothing else.

    ``denoise`` takes the network's inputs as CPU tensors and returns its raw output (what the parameterisation
    converts), in any float type and on any device; ``decode_latents`` turns a batch of equal-length latents into
    waveforms on the CPU."""

    config: BundleConfig
    schedule: NoiseSchedule  # the schedule the denoiser was trained on (its time conditioning depends on it)
    sample_rate: int
    samples_per_latent: int
    latent_dim: int
    device: torch.device | str

    @property
    def model_name(self) -> str:
        return self.config.name

    @abstractmethod
    def latent_frames(self, duration: float) -> int:
        """Latent frames of a clip of ``duration`` seconds."""

    @abstractmethod
    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        """Batched text encoding; each row is independent of its batch companions."""

    @abstractmethod
    def unconditional_text(self, n: int) -> TextEmbedding:
        """``n`` rows of the condition the model's unconditional branch was trained on (the empty prompt, or a
        null condition)."""

    @abstractmethod
    def denoise(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                frame_mask: Tensor, guidance: Tensor | None = None, local_cond: Tensor | None = None) -> Tensor:
        """One forward of the denoiser: z [B, C, T] at times t [B] -> raw output [B, C, T]. ``local_cond``
        [B, 1 + C, T] (only for a model with ``config.inpaint_conditioning``): the keep mask, then the known
        latents times the mask; a row that is all zero has no local conditioning."""

    @abstractmethod
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents [B, C, T] of one length -> float32 waveforms [B, 2, N] on the CPU (N >= T x samples per
        latent; the pipeline cuts each clip to its duration)."""

    def decode_on_device(self, latents: Tensor) -> Tensor:
        """``decode_latents`` with the waveforms left where the decoder computed them (a whole generation's graph
        converts and copies them itself); a backend that decodes on the host returns them there."""
        return self.decode_latents(latents)

    def encode_audio(self, wave: Tensor) -> Tensor:
        """Waveforms [B, 2, N] at ``sample_rate`` -> latents [B, C, ceil(N / samples_per_latent)] (the codec's
        encoder: audio-to-audio and inpainting need it). A backend without an encoder says so here."""
        raise NotImplementedError(f"the {type(self).__name__} backend of {self.model_name} has no audio encoder")

    @property
    def encodes_audio(self) -> bool:
        return type(self).encode_audio is not Networks.encode_audio

    def prepare(self) -> None:
        """Work to do once before serving (compilation, graph capture): nothing, unless a backend has some."""

    @property
    def batch_device(self) -> torch.device:
        """Where the pipeline keeps a running batch's tensors (latents, noise, masks, the sampler's maths): the
        networks' own device, unless a backend takes its inputs on the host (ONNX Runtime feeds NumPy arrays)."""
        return torch.device(self.device)


MODES = ("text-to-audio", "audio-to-audio", "inpainting", "negative-prompt")


class RequestError(ValueError):
    """A request the model cannot run as asked; ``field`` names the request field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, eq=False)
class SampleRequest:
    """What one sample is asked to be. With ``init_audio`` (a float waveform [2, N] at the model's sample rate, cut
    or zero-padded to ``duration``): audio-to-audio from ``init_noise_level`` (in (0, 1]; 1 is plain generation),
    and / or inpainting of the span ``inpaint`` = (start, end) seconds, the rest of the clip kept (a span past the
    init clip's end, with a longer duration, outpaints). ``negative_prompt`` is what guidance steers away from."""

    prompt: str
    duration: float
    steps: int
    guidance: float
    seed: int
    negative_prompt: str | None = None
    init_audio: Tensor | None = None
    init_noise_level: float = 1.0
    inpaint: tuple[float, float] | None = None

    @property
    def modes(self) -> list[str]:
        """The modes this request uses beyond text-to-audio."""
        out = []
        if self.init_audio is not None and self.init_noise_level < 1.0:
            out.append("audio-to-audio")
        if self.inpaint is not None:
            out.append("inpainting")
        if self.negative_prompt is not None:
            out.append("negative-prompt")
        return out


@dataclass(eq=False)
class Trajectory:
    """One sample on its way from noise to latents. ``z`` [C, frames] is a view of its row in the current
    ``DenoiseBatch`` while it runs, and its own tensor once finished."""

    request: SampleRequest
    frames: int
    grid: Tensor  # [steps + 1] float64, the sampler's time grid for this sample's step count
    z: Tensor
    generator: torch.Generator  # the request's own: every random number of the sample comes from it
    cond: Conditioning  # batch of one, on the host
    index: int = 0  # steps taken
    known: Tensor | None = None  # [C, frames] latents to keep (inpainting), where ``keep`` is True
    keep: Tensor | None = None  # [frames] bool
    negative: TextEmbedding | None = None  # batch of one, on the host: the unconditional row's condition
    noise: Tensor | None = None  # [steps, C, frames]: a stochastic sampler's noise for each step (zero before start)

    @property
    def steps(self) -> int:
        return self.grid.numel() - 1

    @property
    def finished(self) -> bool:
        return self.index >= self.steps


class DenoiseBatch:
    """A set of trajectories as batch tensors, built when samples join or leave and reused while the set stays the
    same: between changes a step only gathers each sample's (t, t_next) from its own grid, runs the forward and the
    sampler step on the batch latents. Its tensors are inference tensors, as everything the pipeline makes (a
compiled denoiser's graphs are specialised on that). Latents are padded to the longest sample; the frame mask keeps padded frames
    out of attention and at zero, so a sample's result does not depend on its companions beyond float rounding."""

    @torch.inference_mode()
    def __init__(self, trajectories: Sequence[Trajectory], length: int | None = None):
        """``length``: latent frames to pad to (at least the longest sample's; by default exactly that)."""
        self.trajectories = list(trajectories)
        self.device = device = self.trajectories[0].z.device
        frames = [s.frames for s in self.trajectories]
        if length is not None and length < max(frames):
            raise ValueError(f"a batch of {length} frames cannot hold a sample of {max(frames)}")
        self.length = max(frames) if length is None else length
        self.z = torch.stack([F.pad(s.z, (0, self.length - s.frames)) for s in self.trajectories])
        self.frame_mask = (torch.arange(self.length)[None] < torch.tensor(frames)[:, None]).to(device)
        self.keep = self.frame_mask[:, None]
        width = max(s.grid.numel() for s in self.trajectories)
        self.grids = torch.stack([F.pad(s.grid, (0, width - s.grid.numel())) for s in self.trajectories]).to(device)
        self.rows = torch.arange(len(self.trajectories), device=device)
        self.index = torch.tensor([s.index for s in self.trajectories], device=device)
        scales = [float(s.request.guidance) for s in self.trajectories]
        self.guidance = torch.tensor(scales, dtype=torch.float32, device=device)
        self.cond = concat_conditioning([s.cond for s in self.trajectories]).to(device)
        self.negatives = [s.negative for s in self.trajectories]
        # what a forward derives from the fixed parts (``guided_forward``), while the batch lives; the guided rows
        # are known here, on the host, so that no step reads them back from the device
        self.memo: dict = {"guided_rows": [i for i, g in enumerate(scales) if g != 1.0]}
        self.noise = None  # [B, steps, C, L]: each sample's pre-drawn step noise, when the sampler takes some
        if any(s.noise is not None for s in self.trajectories):
            self.noise = torch.stack([F.pad(s.noise, (0, self.length - s.frames, 0, 0, 0, width - 1 - s.steps))
                                      for s in self.trajectories])
        self.known = self.keep_known = None  # [B, C, L] and [B, 1, L] when a sample inpaints
        if any(s.keep is not None for s in self.trajectories):
            self.known = torch.stack([F.pad(s.known, (0, self.length - s.frames)) if s.keep is not None
                                      else torch.zeros_like(self.z[0]) for s in self.trajectories])
            self.keep_known = torch.stack([F.pad(s.keep, (0, self.length - s.frames)) if s.keep is not None
                                           else torch.zeros(self.length, dtype=torch.bool, device=device)
                                           for s in self.trajectories])[:, None]

    def local_cond(self) -> Tensor | None:
        """The trained inpainting input [B, 1 + C, L] (keep mask, then the known latents times it); rows of
        samples that do not inpaint are zero."""
        if self.keep_known is None:
            return None
        mask = self.keep_known.to(self.z.dtype)
        return torch.cat([mask, self.known * mask], dim=1)

    def __len__(self) -> int:
        return len(self.trajectories)

    def holds(self, trajectories: Sequence[Trajectory]) -> bool:
        """True when ``trajectories`` are exactly this batch's, in the same order."""
        return len(trajectories) == len(self.trajectories) and all(
            a is b for a, b in zip(trajectories, self.trajectories))

    def times(self) -> tuple[Tensor, Tensor]:
        """This step's per-sample t and t_next, float32."""
        return self.grids[self.rows, self.index].float(), self.grids[self.rows, self.index + 1].float()

    @property
    def tokens(self) -> int:
        """The token length of the batch's text conditioning, its guided rows' included once built."""
        rows = self.memo.get("guided", ())
        return max([self.cond.text.tokens.shape[1]] + [x.shape[1] for x in rows[1:2]])

    def pad_tokens(self, length: int) -> None:
        """Pad the batch's text conditioning (and its guided rows', once built) to ``length`` tokens, masked: a
        batch held in fixed tensors (``models.generation_graph``) takes prompts of any length up to it."""
        if self.tokens > length:
            raise ValueError(f"a batch with {self.tokens} prompt tokens does not fit {length}")
        text, rows = self.cond.text, self.memo.get("guided")
        self.cond = Conditioning(TextEmbedding(pad_tokens(text.tokens, length), pad_tokens(text.mask, length),
                                               text.pooled), self.cond.seconds)
        if rows is not None and len(rows) > 1:
            self.memo["guided"] = (rows[0], pad_tokens(rows[1], length), pad_tokens(rows[2], length)) + rows[3:]

    def state(self) -> list[Tensor]:
        """The tensors a step reads that differ between batches of the same shape: the latents, the step index, the
        guidance scales, the conditioning (with the guided rows', once built), the grids, the frame mask (``keep``
        is a view of it), and the noise and inpainting data where the batch has them."""
        text, rows = self.cond.text, self.memo.get("guided", ())
        out = [self.z, self.index, self.guidance, text.tokens, text.mask, text.pooled, self.cond.seconds,
               self.grids, self.frame_mask, *rows[1:]]
        return out + [x for x in (self.noise, self.known, self.keep_known) if x is not None]

    @torch.inference_mode()
    def load(self, other: DenoiseBatch) -> None:
        """Copy ``other``'s state into this batch's own tensors, in place: a batch of the same rows, grid width and
        guided rows, with prompts no longer than this batch's token length and no more frames. Shorter ones are
        padded as the batch pads its own: every state tensor's last axis is one where zero means absent (frames:
        zero latents and noise, masked; tokens: masked)."""
        other.pad_tokens(self.tokens)
        mine, theirs = self.state(), other.state()
        if len(mine) != len(theirs) or any(a.shape[:-1] != b.shape[:-1] or b.shape[-1] > a.shape[-1]
                                           or (a.dim() == 1 and a.shape != b.shape) for a, b in zip(mine, theirs)):
            raise ValueError("load: the batches differ in shape")
        for a, b in zip(mine, theirs):
            a.copy_(b if a.shape == b.shape else F.pad(b, (0, a.shape[-1] - b.shape[-1])))

    def step_noise(self) -> Tensor | None:
        """This step's per-sample noise [B, C, L] (pre-drawn), or None for a deterministic sampler."""
        return None if self.noise is None else self.noise[self.rows, self.index]


class Pipeline:
    """The sampling loop of one model over one backend (see the module docstring)."""

    def __init__(self, networks: Networks):
        self.networks = networks
        self.config = networks.config
        self.schedule = networks.schedule
        self.parameterization = make_parameterization(self.config.parameterization, self.schedule)
        self.sampler = make_sampler(self.config.sampler, self.schedule, self.config.sampler_options)
        self._grids: dict[tuple[int, float], Tensor] = {}

    @property
    def sample_rate(self) -> int:
        return self.networks.sample_rate

    def latent_frames(self, duration: float) -> int:
        return self.networks.latent_frames(duration)

    def grid(self, steps: int, start: float = 1.0) -> Tensor:
        """The sampler's time grid for ``steps`` steps from ``start`` (cached: samples with the same ones share
        it)."""
        key = (steps, float(start))
        if key not in self._grids:
            self._grids[key] = self.sampler.timesteps(steps, start)
        return self._grids[key]

    @property
    def modes(self) -> list[str]:
        """What this model and backend can do (``MODES``): init audio needs an audio encoder, a negative prompt
        needs an unconditional branch (not a model that takes guidance as an input)."""
        out = ["text-to-audio"]
        if self.networks.encodes_audio:
            out += ["audio-to-audio", "inpainting"]
        if not self.config.guidance_in_model:
            out.append("negative-prompt")
        return out

    def check(self, r: SampleRequest) -> None:
        """A ``RequestError`` (naming the field) for a request this model cannot run as asked; the HTTP layer
        answers it with a 422."""
        missing = [m for m in r.modes if m not in self.modes]
        if r.init_audio is not None and "audio-to-audio" not in self.modes:
            missing.append("init audio")
        if missing:
            field = {"negative-prompt": "negative_prompt", "inpainting": "inpaint_start"}.get(missing[0], "init_audio")
            raise RequestError(field, f"model {self.config.name} ({getattr(self.networks, 'name', 'torch')} runtime) "
                                      f"does not support {', '.join(missing)}; it supports {', '.join(self.modes)}")
        if not 0.0 < r.init_noise_level <= 1.0:
            raise RequestError("init_noise_level", f"init_noise_level: {r.init_noise_level} is outside (0, 1]")
        if r.init_noise_level < 1.0 and r.init_audio is None:
            raise RequestError("init_noise_level", "init_noise_level needs init_audio (the clip to start from)")
        if r.inpaint is not None:
            start, end = r.inpaint
            if r.init_audio is None:
                raise RequestError("init_audio", "inpainting needs init_audio (the clip whose span is regenerated)")
            if not 0.0 <= start < end:
                raise RequestError("inpaint_end", f"inpaint: the span must have 0 <= start < end, got {start} .. {end} s")
            if end > r.duration:
                raise RequestError("inpaint_end", f"inpaint: the span ends at {end} s, after the clip's {r.duration} s")
        if r.init_audio is not None and (r.init_audio.dim() != 2 or r.init_audio.shape[0] != 2
                                         or r.init_audio.shape[1] == 0):
            raise RequestError("init_audio", "init_audio: expected a stereo waveform [2, samples], got "
                                             f"{tuple(r.init_audio.shape)}")
        if r.negative_prompt is not None and r.guidance == 1.0:
            raise RequestError("negative_prompt", "negative_prompt needs guidance other than 1 (guidance 1 has no "
                                                  "unconditional branch)")

    # ------------------------------------------------------------------ starting samples
    def conditioning(self, prompts: list[str], durations: list[float]) -> Conditioning:
        return Conditioning(self.networks.encode_text(prompts), torch.tensor(durations, dtype=torch.float32))

    def initial_noise(self, seed: int, frames: int) -> tuple[Tensor, torch.Generator]:
        return initial_noise(self.networks.latent_dim, seed, frames)

    @torch.inference_mode()
    def start(self, requests: Sequence[SampleRequest]) -> list[Trajectory]:
        """Trajectories for these requests at their first step: ONE batched text-encoder call for the prompts and
        the negative prompts, one encoder call per init clip. Raises ``ValueError`` (``check``) first."""
        for r in requests:
            self.check(r)
        negatives = [r.negative_prompt for r in requests if r.negative_prompt is not None]
        text = self.networks.encode_text([r.prompt for r in requests] + negatives).to("cpu")
        cond = Conditioning(text.select(list(range(len(requests)))),
                            torch.tensor([r.duration for r in requests], dtype=torch.float32))
        out, k = [], len(requests)
        for i, r in enumerate(requests):
            frames = self.latent_frames(r.duration)
            z, generator = self.initial_noise(r.seed, frames)
            tr = Trajectory(r, frames, self.grid(r.steps), z, generator, cond.select([i]))
            if r.negative_prompt is not None:
                tr.negative, k = text.select([k]), k + 1
            if r.init_audio is not None:
                known = self.init_latents(r.init_audio, frames)
                if r.init_noise_level < 1.0:
                    self.enter(tr, known, r.init_noise_level)
                if r.inpaint is not None:
                    tr.known, tr.keep = known, self.keep_mask(r, frames)
            out.append(self.place(tr))
        return out

    def place(self, tr: Trajectory) -> Trajectory:
        """The trajectory ready to run: a stochastic sampler's noise for each of its remaining steps drawn now,
        from its own generator in step order (the numbers a draw per step would give), and its latents, noise
        and inpainting data moved to the backend's ``batch_device``. The noise holds steps x C x frames floats,
        twice while the sample is in a batch (its own and the batch's copy): 0.2 MiB for the embedded ARC model's
        10 s at its 8 default steps, 14 MiB at its 500-step maximum."""
        if self.sampler.stochastic:
            tr.noise = torch.zeros(tr.steps, self.networks.latent_dim, tr.frames)
            for k in range(tr.index, tr.steps):
                tr.noise[k] = step_noise(tr.generator, self.networks.latent_dim, tr.frames)
        device = self.networks.batch_device
        tr.z = tr.z.to(device)
        tr.noise, tr.known, tr.keep = (None if x is None else x.to(device) for x in (tr.noise, tr.known, tr.keep))
        return tr

    def enter(self, tr: Trajectory, known: Tensor, level: float) -> None:
        """Audio-to-audio: the trajectory starts from the clip's latents noised, with its own initial noise, to the
        first time of its grid: the model's own grid entered at its first time at or below ``level`` (at least one
        step is left), or the full step count compressed into [level, 0] (``BundleConfig.audio_to_audio_grid``)."""
        if self.config.audio_to_audio_grid == "compress":
            tr.grid = self.grid(tr.steps, level)
        else:
            below = torch.nonzero(tr.grid <= level).flatten()
            tr.index = min(int(below[0]), tr.steps - 1)
        a, s = self.schedule.alpha_sigma(tr.grid[tr.index: tr.index + 1].to(tr.z.dtype))
        tr.z = a * known + s * tr.z

    def init_latents(self, wave: Tensor, frames: int) -> Tensor:
        """An init clip's latents [C, frames]: encoded, then cut or zero-padded to the sample's length."""
        latents = self.networks.encode_audio(wave[None].float())[0].to("cpu", torch.float32)
        return F.pad(latents, (0, max(0, frames - latents.shape[-1])))[:, :frames]

    def keep_mask(self, r: SampleRequest, frames: int) -> Tensor:
        """[frames] bool: True where the init clip is kept: outside the inpaint span (frame of a time = floor(time
        x latent rate), as Stable Audio 3 maps its mask) and within the clip."""
        rate = self.networks.sample_rate / self.networks.samples_per_latent
        start, end = (int(x * rate) for x in r.inpaint)
        keep = torch.ones(frames, dtype=torch.bool)
        keep[start: min(end, frames)] = False
        keep[-(-r.init_audio.shape[-1] // self.networks.samples_per_latent):] = False  # past the init clip
        return keep

    # ------------------------------------------------------------------ one step
    def forward_count(self, guidance: Tensor) -> int:
        """Rows of the denoiser batch that ``predict_x0`` runs for samples with these guidance scales."""
        if self.config.guidance_in_model:
            return guidance.numel()
        return guidance.numel() + int((guidance != 1.0).sum())

    @torch.inference_mode()
    def predict_x0(self, z: Tensor, t: Tensor, cond: Conditioning, guidance: Tensor, frame_mask: Tensor,
                   negatives: Sequence[TextEmbedding | None] | None = None,
                   local_cond: Tensor | None = None, memo: dict | None = None) -> Tensor:
        """x0 predictions for a heterogeneous batch in ONE denoiser forward: z [B, C, T] (padded), t [B],
        guidance [B], frame_mask [B, T]; the result has z's device and type, whatever the backend computed in.
        ``negatives``: per sample, the condition of its unconditional row (None: the model's own); ``local_cond``:
        the trained inpainting input (``Networks.denoise``); ``memo``: a batch's ``DenoiseBatch.memo``."""
        t = t.float()
        out = guided_forward(self.networks.denoise, z, t, cond, guidance, frame_mask,
                             lambda rows: self.unconditional(negatives, rows, z.device),
                             self.config.guidance_in_model, local_cond, memo)
        return self.parameterization.to_x0(out.to(z.device, z.dtype), z, t)

    def unconditional(self, negatives: Sequence[TextEmbedding | None] | None, rows: list[int],
                      device) -> TextEmbedding:
        """The conditions of these samples' unconditional rows, on ``device``: each one's negative prompt, else the
        model's own unconditional condition."""
        own = [negatives[i] for i in rows] if negatives is not None else []
        if not any(x is not None for x in own):
            return self.networks.unconditional_text(len(rows)).to(device)
        return concat_text([(x if x is not None else self.networks.unconditional_text(1)).to("cpu")
                            for x in own]).to(device)

    def prime(self, batch: DenoiseBatch) -> None:
        """Build what the batch's first step would build from its fixed parts (the guided rows' conditioning), now,
        without a forward."""
        if not self.config.guidance_in_model:
            guided_inputs(batch.cond, batch.guidance, batch.frame_mask,
                          lambda rows: self.unconditional(batch.negatives, rows, batch.device), batch.memo)

    @torch.inference_mode()
    def step(self, batch: DenoiseBatch) -> None:
        """One denoiser forward over the batch, then one sampler step for each of its trajectories (in place)."""
        self.take_step(batch, self.advance(batch))

    @torch.inference_mode()
    def advance(self, batch: DenoiseBatch) -> Tensor:
        """The batch's latents one step on [B, C, L], from its current state, which it leaves as it is: the forward
        and the sampler step, all on the batch's device (what a tick's CUDA graph records, ``models.tick_graph``)."""
        t, t_next = batch.times()
        trained = self.config.inpaint_conditioning
        x0 = self.predict_x0(batch.z, t, batch.cond, batch.guidance, batch.frame_mask, batch.negatives,
                             batch.local_cond() if trained else None, batch.memo)
        if batch.keep_known is not None and not trained:  # the known region's prediction is the known latents
            x0 = torch.where(batch.keep_known, batch.known, x0)
        return self.sampler.step(batch.z, x0, t, t_next, batch.step_noise()) * batch.keep

    @staticmethod
    def take_step(batch: DenoiseBatch, z: Tensor) -> None:
        """The batch moves to latents ``z`` (``advance``'s), each trajectory one step on; a finished one keeps its
        own copy of its latents."""
        batch.z = z
        batch.index += 1
        for i, s in enumerate(batch.trajectories):
            s.z = z[i, :, : s.frames]
            s.index += 1
            if s.finished:
                s.z = s.z.clone()  # a finished sample must not keep the whole batch tensor alive

    # ------------------------------------------------------------------ the end
    @torch.inference_mode()
    def decode(self, latents: list[Tensor], durations: list[float]) -> list[Tensor]:
        """Latents [C, T_i] -> float waveforms [2, round(duration * sample_rate)] on the CPU."""
        return decode_grouped(latents, durations, self.sample_rate, self.networks.decode_latents,
                              decode_batch_limit(self.networks.device))

    # ------------------------------------------------------------------ whole generations
    def run(self, trajectories: Sequence[Trajectory], batch: DenoiseBatch | None = None) -> None:
        """Step every trajectory to its end, unfinished ones sharing each forward (starting with ``batch``, when it
        holds them)."""
        active = [s for s in trajectories if not s.finished]
        while active:
            batch = batch if batch is not None and batch.holds(active) else DenoiseBatch(active)
            self.step(batch)
            active = [s for s in active if not s.finished]

    def requests(self, prompts: list[str], durations: list[float], seeds: list[int], steps: int | None = None,
                 guidance: float | None = None) -> list[SampleRequest]:
        """Requests with the model's default steps and guidance where not given."""
        steps = steps or self.config.default_steps
        scale = self.config.default_guidance if guidance is None else guidance
        return [SampleRequest(p, float(d), int(steps), float(scale), int(s))
                for p, d, s in zip(prompts, durations, seeds, strict=True)]

    @torch.inference_mode()
    def generate_latents(self, prompts: list[str], durations: list[float], seeds: list[int], steps: int | None = None,
                         guidance: float | None = None) -> list[Tensor]:
        trajectories = self.start(self.requests(prompts, durations, seeds, steps, guidance))
        self.run(trajectories)
        return [s.z for s in trajectories]

    def generate(self, prompts: list[str], durations: list[float], seeds: list[int], steps: int | None = None,
                 guidance: float | None = None) -> list[Tensor]:
        """Waveforms [2, round(duration * sample_rate)] for these prompts, one seed each."""
        return self.decode(self.generate_latents(prompts, durations, seeds, steps, guidance), durations)


def guided_first(requests: Sequence[SampleRequest]) -> list[int]:
    """An order for a batch of these requests: the guided ones first, each group as given. A captured graph
    (``models.tick_graph``, ``models.generation_graph``) then depends on how many rows are guided, not on which; a
    sample's result depends on its row by float rounding only."""
    return sorted(range(len(requests)), key=lambda i: requests[i].guidance == 1.0)


def initial_noise(latent_dim: int, seed: int, frames: int) -> tuple[Tensor, torch.Generator]:
    """A sample's starting noise [C, frames] and the generator its later step noise comes from: every random number
    of a sample depends only on its own seed, never on its batch companions or the backend."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(latent_dim, frames, generator=g), g


def step_noise(generator: torch.Generator, latent_dim: int, frames: int) -> Tensor:
    """Fresh noise for one step of a stochastic sampler (ping-pong), from the sample's own generator."""
    return torch.randn(latent_dim, frames, generator=generator)


def guided_forward(denoise: Callable[..., Tensor], z: Tensor, t: Tensor, cond: Conditioning, guidance: Tensor,
                   frame_mask: Tensor, unconditional: Callable[[list[int]], TextEmbedding],
                   guidance_in_model: bool, local_cond: Tensor | None = None, memo: dict | None = None) -> Tensor:
    """Classifier-free guidance batched into ONE denoiser call: samples with guidance != 1 get an unconditional row
    (``unconditional(rows)``: the condition of those samples' unconditional branch, on z's device) appended to the
    same batch, and
    their raw outputs are combined by ``apply_guidance``; a model that takes guidance as an input (a
    guidance-distilled student) gets it directly. ``local_cond`` goes to the denoiser only when given. ``memo``
    (a dict that lives as long as ``cond``, ``guidance`` and ``frame_mask`` stay the same: a ``DenoiseBatch``'s)
    keeps the guided rows' conditioning, so that every step hands the denoiser the same tensors (a denoiser that
    keeps per-request results finds them by identity) and builds them once; its ``guided_rows`` (a list), when
    given, names the guided samples without reading ``guidance`` back from the device."""
    text = cond.text
    extra = {} if local_cond is None else {"local_cond": local_cond}
    if guidance_in_model:
        return denoise(z, t, text.tokens, text.mask, text.pooled, cond.seconds, frame_mask, guidance=guidance, **extra)
    rows = guided_inputs(cond, guidance, frame_mask, unconditional, memo)
    guided, n = rows[0], z.shape[0]
    if not guided.numel():
        return denoise(z, t, text.tokens, text.mask, text.pooled, cond.seconds, frame_mask, **extra)
    if local_cond is not None:
        extra = {"local_cond": torch.cat([local_cond, local_cond[guided]])}
    out = denoise(torch.cat([z, z[guided]]), torch.cat([t, t[guided]]), *rows[1:], **extra)
    cond_out = out[:n].clone()
    cond_out[guided] = apply_guidance(out[:n][guided], out[n:], guidance[guided].to(out.device))
    return cond_out


def guided_inputs(cond: Conditioning, guidance: Tensor, frame_mask: Tensor,
                  unconditional: Callable[[list[int]], TextEmbedding], memo: dict | None = None) -> tuple:
    """(guided row indices, then the denoiser's tokens, token mask, pooled, seconds and frame mask over the
    conditional rows followed by the guided samples' unconditional rows); only the indices when no sample is
    guided. Kept in ``memo`` (see ``guided_forward``)."""
    rows = memo.get("guided") if memo is not None else None
    if rows is not None:
        return rows
    listed = memo.get("guided_rows") if memo is not None else None
    listed = torch.nonzero(guidance != 1.0).flatten().tolist() if listed is None else listed
    guided = torch.tensor(listed, dtype=torch.long, device=guidance.device)
    rows, text = (guided,), cond.text
    if listed:
        u = unconditional(listed)
        length = max(text.tokens.shape[1], u.tokens.shape[1])
        rows += (torch.cat([pad_tokens(text.tokens, length), pad_tokens(u.tokens, length)]),
                 torch.cat([pad_tokens(text.mask, length), pad_tokens(u.mask, length)]),
                 torch.cat([text.pooled, u.pooled]), torch.cat([cond.seconds, cond.seconds[guided]]),
                 torch.cat([frame_mask, frame_mask[guided]]))
    if memo is not None:
        memo["guided"] = rows
    return rows


def decode_batch_limit(device) -> int:
    """Clips per decoder call. The decoder's intermediates grow with the batch; on a CPU its time per clip does not
    fall (the embedded codec, 10 s clips, 2 cores: 64 / 67 / 94 ms per clip at 1 / 2 / 4 under PyTorch, 75 / 72 / 83
    under ONNX Runtime), so one clip per call there, which also keeps the peak memory of a large tick low. A GPU's
    decoder gains from a batch."""
    return 1 if torch.device(device).type == "cpu" else 4


def decode_grouped(latents: list[Tensor], durations: list[float], sample_rate: int,
                   decode_batch: Callable[[Tensor], Tensor], max_batch: int) -> list[Tensor]:
    """Waveforms [2, round(duration * sample_rate)] from latents [D, T] through ``decode_batch`` ([B, D, T] ->
    [B, 2, N]). Latents of equal length decode together, at most ``max_batch`` per call; lengths are not padded
    together because the decoder's convolutions would let padding leak into a clip's last frames."""
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
