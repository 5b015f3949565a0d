"""Test helpers that drive ``models.pipeline`` the way the engine does."""
from __future__ import annotations

import copy

import torch

from models.bundle import ModelBundle
from models.pipeline import DenoiseBatch, Networks, Pipeline, SampleRequest

META = torch.device("meta")


def join_and_leave(pipeline: Pipeline, requests: list[SampleRequest]) -> list[torch.Tensor]:
    """Three requests (steps >= 5, 8, 4) run as the engine runs them: the third joins after 3 steps, the first
    leaves after its 5th, the second after its 8th; their final latents."""
    a, b, c = pipeline.start(requests)
    for members, steps in (([a, b], 3), ([a, b, c], 2), ([b, c], 3), ([c], 1)):
        batch = DenoiseBatch(members)
        for _ in range(steps):
            pipeline.step(batch)
    assert all(s.finished for s in (a, b, c))
    return [s.z for s in (a, b, c)]


class EagerReplay:
    """What ``record_eagerly`` returns in place of a CUDA graph: ``replay()`` reruns the recorded program and writes
    its result into the tensor the recording returned, as a graph rewrites its static output."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self) -> None:
        result = self.fn()
        if isinstance(self.out, torch.Tensor):
            self.out.copy_(result)
        self.replays += 1


def record_eagerly(fn, pool=None, warmups: int = 2, before_capture=None):
    """``models.cuda_capture.capture``'s contract without CUDA (the warm-ups, ``before_capture``, the recorded call),
    for the CPU tests of everything around a replay: what is copied into a recorded program's fixed tensors, and
    what is copied out of its output."""
    for _ in range(warmups):
        fn()
    if before_capture is not None:
        before_capture()
    out = fn()
    return EagerReplay(fn, out), out


class MetaNetworks(Networks):
    """The embedded ARC model with its denoiser on the meta device (the text and audio encoders stay on the CPU,
    where the pipeline runs them before a sample starts)."""

    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle
        self.config, self.schedule = bundle.config, bundle.schedule
        self.sample_rate, self.samples_per_latent = bundle.sample_rate, bundle.samples_per_latent
        self.latent_dim = bundle.latent_dim
        self.device = META
        self.denoiser = copy.deepcopy(bundle.denoiser).to(META)
        self.calls: list[dict] = []

    def latent_frames(self, duration):
        return self.bundle.latent_frames(duration)

    def encode_text(self, prompts):
        return self.bundle.encode_text(prompts)

    def unconditional_text(self, n):
        return self.bundle.unconditional_text(n)

    def encode_audio(self, wave):
        return self.bundle.encode_audio(wave)

    def denoise(self, z, t, tokens, token_mask, pooled, seconds, frame_mask, guidance=None, local_cond=None):
        args = (z, t, tokens, token_mask, pooled, seconds, frame_mask)
        self.calls.append({"rows": z.shape[0], "devices": {x.device.type for x in args}})
        return self.denoiser(*args, guidance=guidance)

    def decode_latents(self, latents):
        raise AssertionError("not decoded on the meta device")
