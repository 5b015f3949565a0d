"""The four graphs a serving runtime runs, as nn.Modules with flat tensor signatures that trace to ONNX.

Each wrapper calls the model's own code (no re-implementation), so an exported graph computes what the PyTorch
runtime computes; only the shapes of the interface are fixed here: tokenisation stays in Python (the text graph takes
token ids), the denoiser takes the padded batch the scheduler builds, the decoder takes normalised latents and the
encoder (audio-to-audio, inpainting) what ``start_native`` makes of a waveform.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEXT_INPUTS = ["input_ids", "attention_mask"]
TEXT_OUTPUTS = ["tokens", "pooled"]
DENOISER_INPUTS = ["z", "t", "tokens", "token_mask", "pooled", "seconds", "frame_mask"]
DENOISER_OUTPUTS = ["out"]
PER_LENGTH_INPUTS = ["z", "timestep", "tokens", "token_mask"]
DECODER_INPUTS = ["latents"]
DECODER_OUTPUTS = ["decoded"]
ENCODER_INPUTS = ["analysis"]
ENCODER_OUTPUTS = ["latents"]
# a denoiser split at the request boundary (``RequestSplitGraphs``: Stable Audio 3)
CONTEXT_INPUTS = ["tokens", "token_mask", "seconds"]
CONTEXT_OUTPUTS = ["keys", "values", "global_embed"]
INPAINT_INPUTS = ["local_cond"]
INPAINT_OUTPUTS = ["local"]
STEP_INPUTS = ["z", "t", "frame_mask", "keys", "values", "global_embed", "local"]


class TextEncoderGraph(nn.Module):
    """Token ids -> (token states [B, L, D], pooled [B, P]) exactly as ``HFTextEncoder.encode_unpadded`` computes
    them: the masked mean of the token states, L2-normalised for sentence-transformer (BERT-like) models.

    The padding mask goes in as an additive 4-D mask that transformers uses as given. With a 2-D mask, transformers
    decides in Python whether any padding exists (and drops the mask when none does), and a trace would freeze that
    decision for every later input."""

    def __init__(self, model: nn.Module, normalize_pooled: bool):
        super().__init__()
        self.model = model
        self.normalize_pooled = normalize_pooled

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        keep = (attention_mask > 0)[:, None, None, :]  # [B, 1, 1, L]
        length = input_ids.shape[1]
        keep = keep.expand(-1, -1, length, -1)  # [B, 1, L, L]
        additive = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill(
            ~keep, torch.finfo(torch.float32).min)
        states = self.model(input_ids=input_ids, attention_mask=additive).last_hidden_state.float()
        weights = (attention_mask > 0).unsqueeze(-1).float()
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        if self.normalize_pooled:
            pooled = F.normalize(pooled, dim=-1)
        return states, pooled


class DenoiserGraph(nn.Module):
    """The denoiser's call (the project's ``DiT``, or a checkpoint's adapter such as ``StableAudioDenoiser`` with its
    conditioning inside) with positional inputs (``DENOISER_INPUTS``, plus ``guidance`` for a guidance-embedding
    student) -> the raw prediction [B, C, T]. Inputs a network ignores (a Stable Audio DiT's pooled text) drop out of
    the exported graph."""

    def __init__(self, dit: nn.Module, takes_guidance: bool):
        super().__init__()
        self.dit = dit
        self.takes_guidance = bool(takes_guidance)

    @property
    def input_names(self) -> list[str]:
        return DENOISER_INPUTS + (["guidance"] if self.takes_guidance else [])

    def forward(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                frame_mask: Tensor, *guidance: Tensor) -> Tensor:
        return self.dit(z, t, tokens, token_mask, pooled, seconds, frame_mask,
                        guidance=guidance[0] if guidance else None)


class ContextGraph(nn.Module):
    """A request-split denoiser's per-request part (``request_state``: Stable Audio 3's every block's
    cross-attention keys and values and the global embedding) from ``CONTEXT_INPUTS``. The runtime runs it once per
    request (``RequestCache``), not at every step."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, tokens: Tensor, token_mask: Tensor, seconds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.denoiser.request_state(tokens, token_mask, seconds)


class InpaintGraph(nn.Module):
    """The blocks' embeddings of the trained inpainting input [depth, B, T, D] from ``local_cond`` [B, 1 + C, T]
    (``local_embeddings``; an all-zero row gives zeros), once per inpainting request."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, local_cond: Tensor) -> Tensor:
        return self.denoiser.local_embeddings(local_cond)


class StepGraph(nn.Module):
    """A request-split denoiser's per-step part (``run``) from ``STEP_INPUTS``: the latents, time and frame mask of
    the step, the request's ``ContextGraph`` outputs and its ``InpaintGraph`` output (zeros for a request without
    one: adding them changes nothing) -> the raw prediction [B, C, T]. ``with_local``: False for a network without
    an inpainting input (the graph then has no ``local`` input). Manifest layout: "request-split"."""

    def __init__(self, denoiser: nn.Module, with_local: bool):
        super().__init__()
        self.denoiser = denoiser
        self.with_local = with_local

    @property
    def input_names(self) -> list[str]:
        return STEP_INPUTS if self.with_local else STEP_INPUTS[:-1]

    def forward(self, z: Tensor, t: Tensor, frame_mask: Tensor, keys: Tensor, values: Tensor, global_embed: Tensor,
                *local: Tensor) -> Tensor:
        return self.denoiser.run(z, t, keys, values, global_embed, frame_mask, local[0] if local else None)


class PerLengthDenoiserGraph(nn.Module):
    """A denoiser that runs one forward per distinct length (``runs_per_length``: a UNet, whose convolutions would
    let padding leak into real frames): its ``fixed_length`` network on a batch of one length, with the network's
    own time input (``PER_LENGTH_INPUTS``: timestep = the denoiser's ``model_time(t)``) -> the raw prediction
    [B, C, T]. The runtime converts t and calls the graph once per length (``models.checkpoints.denoisers.per_length``),
    so the Python loop over lengths stays out of the graph. Manifest layout: "per-length"."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, z: Tensor, timestep: Tensor, tokens: Tensor, token_mask: Tensor) -> Tensor:
        return self.denoiser.fixed_length(z, timestep, tokens, token_mask)


class DecoderGraph(nn.Module):
    """Normalised latents [B, C, T] -> the codec's ``decode`` (waveform [B, channels, T * samples_per_latent] in
    [-1, 1]), or its ``decode_native`` for a codec that has one: the part of decoding before a step that no graph
    holds well (the harmonic codec's inverse STFT, the mel codec's polyphase resampler). The runtime then applies the
    rest, ``finish_native`` with the manifest codec's ``native_tail``."""

    def __init__(self, codec: nn.Module):
        super().__init__()
        self.codec = codec

    def forward(self, latents: Tensor) -> Tensor:
        return (getattr(self.codec, "decode_native", None) or self.codec.decode)(latents)


def native_tail(codec: nn.Module) -> dict:
    """What a runtime applies to the decoder graph's output (the manifest's codec entry): {} for none,
    {"istft": {"n_fft", "hop"}} or {"native_rate": Hz}."""
    return dict(getattr(codec, "native_tail", {}))


def decoder_output_axes(tail: dict) -> dict[int, str]:
    """The decoder graph's dynamic output axes for a ``native_tail``."""
    if "istft" in tail:
        return {0: "batch", 3: "frames"}  # [B, C, K, F, 2]
    if "native_rate" in tail:
        return {0: "batch", 1: "samples"}  # mono [B, N]
    return {0: "batch", 2: "samples"}  # [B, C, N]


def finish_native(out: Tensor, tail: dict, sample_rate: int) -> Tensor:
    """The decoder graph's output -> waveform [B, channels, N] at ``sample_rate``: the rest of the codec's ``decode``
    as ``tail`` names it (a ``native_tail``, or the manifest's codec entry, which holds one)."""
    if "istft" in tail:
        from models.codec.harmonic import wave_from_native

        return wave_from_native(out, int(tail["istft"]["n_fft"]), int(tail["istft"]["hop"]))
    if "native_rate" in tail:
        from models.checkpoints.mel_vae import native_to_output

        return native_to_output(out, int(tail["native_rate"]), sample_rate)
    return out


class EncoderGraph(nn.Module):
    """``start_native``'s output -> normalised latents [B, C, T]: the codec's ``encode`` after the steps that no
    graph holds well, which a runtime computes before the graph (``start_native`` with the manifest codec's
    ``native_head``): the harmonic codec's STFT (the graph holds its pitch analyser, posterior and analytic
    channels: ``encode_native``), the mel codec's resampler, loudness normalisation and STFT (the graph holds the
    mel projection, the log and the VAE encoder), and for a codec of plain convolutions (Oobleck) only the padding to
    a whole latent frame."""

    def __init__(self, codec: nn.Module):
        super().__init__()
        self.codec = codec
        self.head = native_head(codec)

    def forward(self, analysis: Tensor) -> Tensor:
        if hasattr(self.codec, "encode_native"):  # the harmonic and mel codecs
            return self.codec.encode_native(analysis)
        return self.codec.encode(analysis)  # a padded waveform: ``encode``'s own padding adds nothing


def _mel_codec(codec: nn.Module) -> bool:
    from models.checkpoints.mel_vae import MelLatentCodec

    return isinstance(codec, MelLatentCodec)


def native_head(codec: nn.Module) -> dict:
    """What a runtime computes before the encoder graph (the manifest codec's "native_head"): {} to pad the waveform
    to a whole latent frame, {"stft": {"n_fft", "hop"}} (the harmonic codec) or {"mel": {"native_rate", "n_fft",
    "hop", "frames_per_latent"}} (a mel codec: ``MelLatentCodec.encode`` up to its STFT magnitudes)."""
    if hasattr(codec, "native_head"):
        return dict(codec.native_head)
    if _mel_codec(codec):
        return {"mel": {"native_rate": codec.native_rate, "n_fft": codec.analysis.n_fft, "hop": codec.analysis.hop,
                        "frames_per_latent": codec.vae.config.factor}}
    return {}


def encoder_input_axes(head: dict) -> dict[int, str]:
    """The encoder graph's dynamic input axes for a ``native_head``."""
    if "stft" in head:
        return {0: "batch", 3: "frames"}  # [B, C, K, F, 2]
    if "mel" in head:
        return {0: "batch", 2: "frames"}  # mono magnitudes [B, K, F]
    return {0: "batch", 2: "samples"}  # [B, C, N]


def start_native(wave: Tensor, head: dict, sample_rate: int, samples_per_latent: int) -> Tensor:
    """A waveform [B, 2, N] at ``sample_rate`` -> the encoder graph's input, as ``head`` (a ``native_head``, or the
    manifest codec's entry "native_head") names it."""
    from models.audio.spectral import pad_to_multiple

    if "stft" in head:
        from models.codec.harmonic import native_from_wave

        return native_from_wave(wave, int(head["stft"]["n_fft"]), int(head["stft"]["hop"]), samples_per_latent)
    if "mel" in head:
        from models.checkpoints.mel_vae import encoder_input

        mel = head["mel"]
        return encoder_input(wave, sample_rate, int(mel["native_rate"]), int(mel["n_fft"]), int(mel["hop"]),
                             int(mel["frames_per_latent"]), samples_per_latent)
    return pad_to_multiple(wave, samples_per_latent)
