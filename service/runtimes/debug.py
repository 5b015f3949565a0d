"""A test/debug wrapper around a real runtime (enabled by ``TTA_DEBUG_FAULTS=1``, never by default).

Prompts carrying ``[[fail]]`` make the denoiser call raise a real ``RuntimeError`` for the batch they are in (the
engine's real error path handles it); ``[[fail:encode]]`` does the same in the encode stage; ``[[slow=MS]]`` adds MS
milliseconds to every denoiser call that includes the prompt (to make cancellation, deadlines and back-pressure
observable with a tiny model). The wrapper recognises a marked sample inside ``denoise`` by its pooled text
embedding, so the runtime interface stays exactly the one real runtimes implement.
"""
from __future__ import annotations

import re
import threading
import time

import torch
from torch import Tensor

from models.text import TextEmbedding
from service.runtimes.base import Runtime

_SLOW = re.compile(r"\[\[slow=(\d+)\]\]")


class InjectedFault(RuntimeError):
    pass


class FaultInjectingRuntime(Runtime):
    def __init__(self, inner: Runtime):
        self.inner = inner
        self.name = inner.name
        self.config, self.schedule, self.device = inner.config, inner.schedule, inner.device
        self.sample_rate, self.latent_dim = inner.sample_rate, inner.latent_dim
        self.samples_per_latent = inner.samples_per_latent
        self._marked: list[tuple[Tensor, str, float]] = []  # (pooled embedding, action, argument)
        self._lock = threading.Lock()

    def latent_frames(self, duration: float) -> int:
        return self.inner.latent_frames(duration)

    def prepare(self) -> None:
        self.inner.prepare()

    def encode_text(self, prompts: list[str]) -> TextEmbedding:
        if any("[[fail:encode]]" in p for p in prompts):
            raise InjectedFault("injected fault in the encode stage")
        text = self.inner.encode_text(prompts)
        with self._lock:
            for i, p in enumerate(prompts):
                if "[[fail]]" in p:
                    self._marked.append((text.pooled[i].clone(), "fail", 0.0))
                if m := _SLOW.search(p):
                    self._marked.append((text.pooled[i].clone(), "slow", float(m.group(1)) / 1000))
            del self._marked[:-256]
        return text

    def unconditional_text(self, n: int) -> TextEmbedding:
        return self.inner.unconditional_text(n)

    def _actions(self, pooled: Tensor) -> list[tuple[str, float]]:
        with self._lock:
            marked = list(self._marked)
        found = []
        for vec, action, arg in marked:
            if any(torch.equal(row, vec) for row in pooled):
                found.append((action, arg))
        return found

    def denoise(self, z, t, tokens, token_mask, pooled, seconds, frame_mask, guidance=None, local_cond=None):
        actions = self._actions(pooled)
        for action, arg in actions:
            if action == "fail":
                raise InjectedFault("injected fault in the denoiser forward")
        delay = max((arg for action, arg in actions if action == "slow"), default=0.0)
        if delay:
            time.sleep(delay)
        return self.inner.denoise(z, t, tokens, token_mask, pooled, seconds, frame_mask, guidance, local_cond)

    @property
    def encodes_audio(self) -> bool:
        return self.inner.encodes_audio

    def encode_audio(self, wave):
        return self.inner.encode_audio(wave)

    def decode_latents(self, latents):
        return self.inner.decode_latents(latents)
