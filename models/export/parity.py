"""How exported graphs are compared with PyTorch, and the tolerances they must meet.

Metrics (float64 arithmetic on float32 outputs):
- ``max_rel``: max |actual - expected| / max |expected|. An element-wise relative error is meaningless where the
  reference crosses zero, so errors are measured against the tensor's scale.
- ``rms_rel``: ||actual - expected|| / ||expected|| per clip (the signal-to-error ratio is -20 log10 of it).
- ``spectral_rel``: the same on STFT magnitudes (n_fft 2048, hop 512), per clip (spectral convergence).

Tolerances:
- text encoder and denoiser: ``max_rel`` <= 1e-4. A denoiser exported in three graphs (its per-request context and
  inpainting embeddings, and the step) is checked graph by graph to the same bound, and the three together against
  the whole denoiser.
- encoder (the codec's, fed what the runtime computes before it): ``max_rel`` <= 1e-4 on the latents of clips of
  tones over noise with silent ends, short ones and one of the model's maximum length. The harmonic codec's pitch
  analyser makes discrete choices (the peak bin, the harmonics it masks), but its phase-advance refinement puts the
  pitch of a peak that two bins share at the same place whichever bin wins, so the graph stays as close as the
  other graphs: about 2e-6 for the embedded codec at 10 s, on silence, DC, exact-bin and half-bin tones and
  anti-phase stereo too.
- decoder: ``spectral_rel`` <= 1e-2 on every clip up to the model's maximum length (magnitude error 40 dB below
  the signal) and ``rms_rel`` <= 1e-2 on a short clip (about 0.5 s), which pins the phases and the real-valued
  iSTFT sample by sample.

Why the decoder's long clips are judged on magnitudes, not samples: the decoder integrates each partial's frequency
over the clip and multiplies that phase by the harmonic number, so a relative change of 1e-7 in a frequency (one
float32 rounding) moves a high partial's phase by about 2 pi n f t 1e-7, a sizeable fraction of a radian after
several seconds. PyTorch's own decoder is no more reproducible than that: perturbing its input latents by 1e-7
(relative) moves its output by about 1 % rms on 10 s clips of the full-size codec with random weights
(``float32_sensitivity`` in the manifest records this for each export). ONNX Runtime rounds differently from
PyTorch, so a sample-wise bound on long clips tighter than the reference's own float32 reproducibility would reject
correct graphs. Measured on that codec at 10 s: ONNX Runtime vs PyTorch 0.7 % rms, 0.36 % on magnitudes; both
float32 decoders are equally far (0.5-0.6 % rms) from a float64 PyTorch decode. A phase drift of upper partials is
inaudible; a wrong graph (a sign, an axis, a window, a gain) moves magnitudes by tens of percent.

That bound holds because ``HarmonicAutoencoder.render_parts`` caps the integrated frequency at Nyquist. Gated-off
slots of random or generated latents can hold frequencies of 1e12 Hz; integrated uncapped, one float32 rounding of
such a frequency (ONNX Runtime's logf or exp one ulp off PyTorch's) moved every later phase by radians, and the
trained codec's short clips differed by rms_rel 1.7 (spectral_rel 3 %) with magnitudes intact.

The export translates three operators itself (``onnx_export._SYMBOLICS``) because the exporter's defaults are less
accurate than PyTorch exactly where the codec needs it: ``cumsum`` accumulates in float64 (as PyTorch's CPU kernel
does) and ``remainder`` uses an exact fmod. With the defaults the 10 s decode was 5-10 times further from float64
than PyTorch's (5.6 % rms against 0.5 %). ``atan2`` (the encoder's phase) gets PyTorch's values at 0 / 0, where the
default gives NaN: every silent frame's pitch would have been NaN.
"""
from __future__ import annotations

import numpy as np
import torch

TOLERANCES = {
    "text_encoder": {"max_rel": 1e-4},
    "denoiser": {"max_rel": 1e-4},
    "decoder": {"spectral_rel": 1e-2, "rms_rel_short": 1e-2},
    "encoder": {"max_rel": 1e-4},
    # a request-split denoiser's per-request graphs (Stable Audio 3: ``export_request_split_denoiser``)
    "context": {"max_rel": 1e-4},
    "inpaint": {"max_rel": 1e-4},
}


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def max_abs_error(actual, expected) -> float:
    return float(np.abs(_np(actual).astype(np.float64) - _np(expected).astype(np.float64)).max())


def max_rel_error(actual, expected) -> float:
    expected = _np(expected).astype(np.float64)
    scale = float(np.abs(expected).max())
    return max_abs_error(actual, expected) / max(scale, 1e-30)


def rms_rel_error(actual, expected) -> float:
    a, e = _np(actual).astype(np.float64), _np(expected).astype(np.float64)
    return float(np.sqrt(((a - e) ** 2).sum() / max((e ** 2).sum(), 1e-30)))


def spectral_rel_error(actual, expected, n_fft: int = 2048, hop: int = 512) -> float:
    """|| |STFT(actual)| - |STFT(expected)| || / || |STFT(expected)| || over the whole clip (all channels). A clip
    shorter than the window (a tiny test model's) is analysed with the longest power-of-two window that fits."""
    from models.audio.spectral import stft

    a = torch.from_numpy(_np(actual).astype(np.float64))
    e = torch.from_numpy(_np(expected).astype(np.float64))
    if a.shape[-1] <= n_fft:
        n_fft = 2 ** max(1, int(np.log2(max(2, a.shape[-1] - 1))))
        hop = max(1, min(hop, n_fft // 4))
    ma, me = stft(a, n_fft, hop).abs(), stft(e, n_fft, hop).abs()
    return float((ma - me).norm() / me.norm().clamp(min=1e-30))


def worst(*errors: float) -> float:
    """The largest of these errors, NaN if any is NaN (a graph that gives NaN where PyTorch does not): Python's
    ``max`` keeps whichever comes first, so a running maximum would drop it and pass the check."""
    return float("nan") if any(np.isnan(e) for e in errors) else max(errors)


def within(graph: str, errors: dict) -> bool:
    return all(errors[metric] <= limit for metric, limit in TOLERANCES[graph].items())


def failures(graph: str, errors: dict) -> list[str]:
    return [f"{metric} {errors[metric]:.3g} > {limit:g}" for metric, limit in TOLERANCES[graph].items()
            if not errors[metric] <= limit]
