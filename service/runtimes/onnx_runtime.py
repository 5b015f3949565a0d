"""The ONNX Runtime runtime: text encoder, denoiser, decoder and the codec's encoder (audio-to-audio, inpainting) run
as exported graphs in onnxruntime sessions. A denoiser exported split at the request boundary (Stable Audio 3: its
context, inpainting and step graphs) has its per-request graphs run once per request, their outputs kept while the
request's batch lives (``RequestCache``), so that a step runs only the step graph; its inpainting graph serves the
model's trained inpainting input.

Exports are made on first use (``models.export.ensure_onnx_export``: ``<model_dir>/onnx``, re-made when the model's
weights or the graph-defining code change). Tokenisation and the prompt-embedding cache stay in Python; the sampling
loop is ``models.pipeline.Pipeline``'s, as for every runtime, so a seed gives the same audio whichever runtime serves
it (up to float rounding). No torch model is loaded: only the tokenizer and the sessions.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.checkpoints.denoisers import per_length
from models.checkpoints.request_cache import RequestCache, context_rows, row_digest
from models.diffusion import make_schedule
from models.export import OnnxExport, ensure_onnx_export
from models.export.graphs import (
    DECODER_OUTPUTS,
    DENOISER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    TEXT_INPUTS,
    TEXT_OUTPUTS,
    finish_native,
    start_native,
)
from models.export.manifest import tokenizer_dir
from models.export.ort import import_onnxruntime, per_length_call, request_split_call, run_session, session
from models.export.serving import latent_frames, serving_config
from models.text import CachedTextEncoder, TextEmbedding
from models.text.encoders import NumberChannels, null_embedding, tokenize, unpad_with_numbers
from service.runtimes.base import Runtime

log = logging.getLogger("tta.runtimes")

_ENCODERS: dict[str, CachedTextEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


class OnnxTextEncoder:
    """The tokenizer in Python, the encoder graph in onnxruntime; ``encode_unpadded`` as ``HFTextEncoder``'s (the
    ``CachedTextEncoder`` in front of it only needs that method and the dims)."""

    def __init__(self, path: Path, tokenizer_dir: Path, info: dict, device: str, graph_session=None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        # ``graph_session``: an open session for the graph (the TensorRT runtime hands in its engine's)
        self.session = graph_session if graph_session is not None else session(path, device)
        self.max_length = int(info["max_length"])
        self.dim, self.pooled_dim, self.name = int(info["dim"]), int(info["pooled_dim"]), info.get("name", "text")
        self.numbers = NumberChannels.from_config(info)

    def encode_unpadded(self, prompts: list[str]) -> list[tuple[Tensor, Tensor]]:
        batch, spans = tokenize(self.tokenizer, prompts, self.numbers, self.max_length, "np")
        feed = {k: np.ascontiguousarray(batch[k], dtype=np.int64) for k in TEXT_INPUTS}
        states, pooled = self.session.run(TEXT_OUTPUTS, feed)
        return unpad_with_numbers(spans, torch.from_numpy(states), torch.from_numpy(pooled),
                                  feed["attention_mask"].sum(1).tolist(), batch.get("offset_mapping"), self.numbers)


def shared_onnx_text_encoder(export: OnnxExport, config: dict, device: str, open_graph=None,
                             backend: str = "onnxruntime") -> CachedTextEncoder:
    """One encoder session and prompt cache per backend, distinct encoder graph and number channels (models sharing
    a text encoder share it; the same graph with other number channels, or masking, gives other embeddings).
    ``open_graph``: the runtime's way to open a graph by name (default: an ONNX Runtime session)."""
    info = export.manifest["text_encoder"]
    key = f'{backend}:{export.manifest["graphs"]["text_encoder"]["sha256"]}:{NumberChannels.from_config(info)}@{device}'
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            enc = OnnxTextEncoder(export.path("text_encoder"), tokenizer_dir(config), info, device,
                                  open_graph("text_encoder") if open_graph else None)
            _ENCODERS[key] = CachedTextEncoder(enc)
        return _ENCODERS[key]


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, path: Path, export: OnnxExport, device: str = "cpu"):
        self.path = Path(path)
        self.export = export
        self.device = device
        self.config = serving_config(self.path, export.manifest, f"{export.dir} manifest")
        checkpoint = export.manifest.get("checkpoint")
        self.null_condition = bool(checkpoint and checkpoint.get("null_condition"))
        self.schedule = make_schedule(self.config.schedule)
        codec = export.manifest["codec"]
        self.sample_rate, self.latent_dim = int(codec["sample_rate"]), int(codec["latent_dim"])
        self.samples_per_latent = int(codec["samples_per_latent"])
        # names what follows the decoder graph (``finish_native``) and what precedes the encoder graph
        # (``start_native``)
        self.codec_entry = codec
        self.max_latent_frames = int(export.manifest["limits"]["max_latent_frames"])
        self.text_encoder = shared_onnx_text_encoder(export, {"text_encoder": self.config.text_encoder}, device,
                                                     self.open_graph, self.name)
        self.denoiser = self.open_graph("denoiser")
        self.decoder = self.open_graph("decoder")
        # an export without an encoder graph (its manifest's codec entry says why) serves no audio-to-audio
        self.encoder = self.open_graph("encoder") if "encoder" in export.manifest["graphs"] else None
        self.denoiser_inputs = [i.name for i in self.denoiser.get_inputs()]
        # a UNet's graph holds one length's forward; the runtime loops over lengths (``PerLengthDenoiserGraph``)
        layout = export.manifest["graphs"]["denoiser"].get("layout")
        self._fixed_length = per_length_call(self.denoiser) if layout == "per-length" else None
        # Stable Audio 3: the request's part of the denoiser in graphs of its own, run once per request
        # (``RequestCache``); the step graph every step
        self.request_split = None
        if layout == "request-split":
            graphs = export.manifest["graphs"]
            inpaint = self.open_graph("inpaint") if "inpaint" in graphs else None
            self.request_split = request_split_call(self.open_graph("context"), self.denoiser, inpaint)
            self.text_len = int(graphs["context"]["text_len"])
            self.request_cache, self.local_cache = RequestCache(), RequestCache()
        self.providers = self.denoiser.get_providers()
        self._uncond: TextEmbedding | None = None

    @property
    def batch_device(self) -> torch.device:
        """The host: sessions (and TensorRT's engines behind the same interface) take NumPy feeds."""
        return torch.device("cpu")

    def open_graph(self, graph: str):
        """A session for one of the export's graphs (the TensorRT runtime opens its engines here instead)."""
        return session(self.export.path(graph), self.device)

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> OnnxRuntime:
        import_onnxruntime()  # a clear MissingPackage before anything is exported
        export = ensure_onnx_export(path)
        rt = cls(path, export, device=device)
        log.info("onnxruntime model ready", extra={"model": rt.model_name, "export_dir": str(export.dir),
                                                   "providers": rt.providers})
        return rt

    # ------------------------------------------------------------------ text
    def latent_frames(self, duration: float) -> int:
        return latent_frames(duration, self.sample_rate, self.samples_per_latent)

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        return self.text_encoder.encode(prompts)

    def unconditional_text(self, n: int) -> TextEmbedding:
        """The empty prompt's embedding, as ``ModelBundle.unconditional_text``; for a checkpoint trained with a null
        condition (Stable Audio) no real token at all, as ``CheckpointBundle.unconditional_text``."""
        if self.null_condition:
            return null_embedding(n, self.text_encoder.dim, self.text_encoder.pooled_dim)
        if self._uncond is None:
            self._uncond = self.text_encoder.encode([""])
        u = self._uncond
        return TextEmbedding(u.tokens.expand(n, -1, -1), u.mask.expand(n, -1), u.pooled.expand(n, -1))

    # ------------------------------------------------------------------ denoiser
    @torch.inference_mode()
    def denoise(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, pooled: Tensor, seconds: Tensor,
                frame_mask: Tensor, guidance: Tensor | None = None, local_cond: Tensor | None = None) -> Tensor:
        """One session run (a per-length graph: one run per distinct length; a request-split one: the step graph,
        after the per-request graphs for requests not seen before)."""
        if self.request_split is not None:
            return self._denoise_split(z.float().cpu(), t.float().cpu(), tokens, token_mask, seconds,
                                       frame_mask.cpu(), local_cond)
        if local_cond is not None:
            raise ValueError(f"the exported denoiser of {self.model_name} takes no inpainting input")
        z, t, frame_mask = z.float().cpu(), t.float().cpu(), frame_mask.cpu()
        if self._fixed_length is not None:
            return per_length(self._fixed_length, z, self.schedule.model_timestep(t), tokens, token_mask, frame_mask)
        values = {"z": z, "t": t, "tokens": tokens, "token_mask": token_mask, "pooled": pooled, "seconds": seconds,
                  "frame_mask": frame_mask, "guidance": None if guidance is None else guidance.float().cpu()}
        return run_session(self.denoiser, self.denoiser_inputs, DENOISER_OUTPUTS[0], values)

    def _denoise_split(self, z: Tensor, t: Tensor, tokens: Tensor, token_mask: Tensor, seconds: Tensor,
                       frame_mask: Tensor, local_cond: Tensor | None) -> Tensor:
        """The step graph on the request's keys, values and global embedding (kept per request), and its
        inpainting embeddings (zeros for a batch without inpainting)."""
        split, state = self.request_split, ("onnxruntime",)  # the graphs' weights never change under a session
        context = self.request_cache.get((tokens, token_mask, seconds), state, split.context,
                                         lambda *x: context_rows(*x, self.text_len), axes=(1, 1, 0))
        if local_cond is None:
            local = split.no_inpainting(z.shape[0], z.shape[-1])
        elif split.inpaint_session is None:
            raise ValueError(f"the exported denoiser of {self.model_name} takes no inpainting input")
        else:
            local = self.local_cache.get((local_cond,), state, split.inpaint, lambda x: [row_digest(r) for r in x],
                                         axes=(1,))[0]
        return split.step(z, t, frame_mask, context, local)

    # ------------------------------------------------------------------ decoder
    @torch.inference_mode()
    def decode_latents(self, latents: Tensor) -> Tensor:
        if latents.shape[-1] > self.max_latent_frames:
            raise ValueError(f"{latents.shape[-1]} latent frames is longer than the exported decoder was checked "
                             f"for ({self.max_latent_frames}, the model's max_duration)")
        out = torch.from_numpy(self.decoder.run(DECODER_OUTPUTS, {"latents": latents.float().cpu().numpy()})[0])
        return finish_native(out, self.codec_entry, self.sample_rate)

    # ------------------------------------------------------------------ encoder
    @property
    def encodes_audio(self) -> bool:
        """An encoder graph is there, and the denoiser graphs can inpaint: a model trained with an inpainting input
        (``config.inpaint_conditioning``) needs an export that takes it (Stable Audio 3's inpaint graph), and the
        pipeline offers audio-to-audio and inpainting together."""
        takes_inpainting = self.request_split is not None and self.request_split.inpaint_session is not None
        return self.encoder is not None and (not self.config.inpaint_conditioning or takes_inpainting)

    @torch.inference_mode()
    def encode_audio(self, wave: Tensor) -> Tensor:
        """The codec's analysis before the graph in torch (``start_native``: an STFT, a resampler, loudness
        normalisation, or padding to a whole latent frame, as the manifest's codec entry names it), then one
        session run over the batch as given."""
        if self.encoder is None:
            return super().encode_audio(wave)  # NotImplementedError: this export has no encoder graph
        if -(-wave.shape[-1] // self.samples_per_latent) > self.max_latent_frames:
            raise ValueError(f"{wave.shape[-1]} samples is longer than the exported encoder was checked for "
                             f"({self.max_latent_frames} latent frames, the model's max_duration)")
        analysis = start_native(wave.float().cpu(), self.codec_entry["native_head"], self.sample_rate,
                                self.samples_per_latent)
        return run_session(self.encoder, ENCODER_INPUTS, ENCODER_OUTPUTS[0], {ENCODER_INPUTS[0]: analysis})
