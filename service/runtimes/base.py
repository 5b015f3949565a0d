"""The runtime interface: a ``models.pipeline.Networks`` backend with a name.

A runtime runs the three networks of one model (text encoder, denoiser, decoder) on its backend and nothing else:
the sampling loop, guidance batching, the x0 conversion, the sampler step and every random number belong to
``models.pipeline.Pipeline``, which the engine drives over the runtime. So a seed means the same audio whatever the
runtime."""
from __future__ import annotations

from models.pipeline import Networks


class Runtime(Networks):
    name: str  # runtime name reported by /models and tta_model_loaded ("torch", "onnxruntime", ...)

    def graph_captures(self) -> dict[str, int]:
        """CUDA graphs this runtime has captured so far, by kind (the torch runtime's "forward" graphs); none by
        default."""
        return {}
