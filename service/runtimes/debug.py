"""A test/debug wrapper around a real runtime (enabled by ``TTA_DEBUG_FAULTS=1``, never by default).

Prompts carrying ``[[fail]]`` make the denoiser call raise a real ``RuntimeError`` for the batch they are in (the
engine's real error path handles it); ``[[fail:encode]]`` does the same in the encode stage; ``[[slow=MS]]`` adds MS
milliseconds to every denoiser call that includes the prompt (to make cancellation, deadlines and back-pressure
observable with a tiny model). The wrapper recognises a marked sample inside ``predict_x0`` by its pooled text
embedding, so the runtime interface stays exactly the one real runtimes implement.
"""
from __future__ import annotations

import re
import threading
import time

import torch
from torch import Tensor

from models.bundle import Conditioning
from service.runtimes.base import Runtime

_SLOW = re.compile(r"\[\[slow=(\d+)\]\]")


class InjectedFault(RuntimeError):
    pass


class FaultInjectingRuntime(Runtime):
    def __init__(self, inner: Runtime):
        self.inner = inner
        self.name = inner.name
        self.config, self.sampler = inner.config, inner.sampler
        self.sample_rate, self.latent_dim = inner.sample_rate, inner.latent_dim
        self._marked: list[tuple[Tensor, str, float]] = []  # (pooled embedding, action, argument)
        self._lock = threading.Lock()

    def latent_frames(self, duration: float) -> int:
        return self.inner.latent_frames(duration)

    def prepare(self) -> None:
        self.inner.prepare()

    def encode_text(self, prompts: list[str], durations: list[float]) -> Conditioning:
        if any("[[fail:encode]]" in p for p in prompts):
            raise InjectedFault("injected fault in the encode stage")
        cond = self.inner.encode_text(prompts, durations)
        with self._lock:
            for i, p in enumerate(prompts):
                if "[[fail]]" in p:
                    self._marked.append((cond.text.pooled[i].clone(), "fail", 0.0))
                if m := _SLOW.search(p):
                    self._marked.append((cond.text.pooled[i].clone(), "slow", float(m.group(1)) / 1000))
            del self._marked[:-256]
        return cond

    def _actions(self, pooled: Tensor) -> list[tuple[str, float]]:
        with self._lock:
            marked = list(self._marked)
        found = []
        for vec, action, arg in marked:
            if any(torch.equal(row, vec) for row in pooled):
                found.append((action, arg))
        return found

    def predict_x0(self, z, t, cond, guidance, frame_mask):
        actions = self._actions(cond.text.pooled)
        for action, arg in actions:
            if action == "fail":
                raise InjectedFault("injected fault in the denoiser forward")
        delay = max((arg for action, arg in actions if action == "slow"), default=0.0)
        if delay:
            time.sleep(delay)
        return self.inner.predict_x0(z, t, cond, guidance, frame_mask)

    def decode(self, latents, durations):
        return self.inner.decode(latents, durations)

    def initial_noise(self, seed, frames):
        return self.inner.initial_noise(seed, frames)

    def step_noise(self, generator, frames):
        return self.inner.step_noise(generator, frames)
