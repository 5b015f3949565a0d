"""What a denoiser forward costs on this device, learnt from the forwards the engine runs.

A forward over ``b`` samples padded to ``L`` latent frames is modelled as ``overhead + per_frame * b * L`` seconds:
the overhead (kernel launches, Python, weights read once per forward, a GPU's unused width) is what batching saves,
the per-frame part is what it cannot. On a CPU the overhead is a small share of a long clip's forward (batching
gains little); on a GPU it dominates (batching is nearly free). The adaptive scheduling policy decides with it.

Observations are kept per bin of work (``b * L``, a quarter octave wide) as running means, so the fit keeps the
sizes it has seen even when the traffic has settled on one size, and follows drift (an exponential mean once a bin
has seen 20 forwards). The fit is weighted least squares over the bins, constrained to non-negative terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Bin:
    count: int = 0
    work: float = 0.0
    seconds: float = 0.0


class ForwardCost:
    BINS_PER_OCTAVE = 4
    MAX_WEIGHT = 20  # a bin's weight in the fit, and 1 / the exponential mean's rate once it is reached

    def __init__(self) -> None:
        self._bins: dict[int, _Bin] = {}
        self._fit: tuple[float, float] | None = None

    def observe(self, work: float, seconds: float) -> None:
        """One forward over ``work`` = batch x padded frames took ``seconds``."""
        if work <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        b = self._bins.setdefault(round(math.log2(work) * self.BINS_PER_OCTAVE), _Bin())
        b.count += 1
        rate = 1.0 / min(b.count, self.MAX_WEIGHT)
        b.work += rate * (work - b.work)
        b.seconds += rate * (seconds - b.seconds)
        self._fit = None

    @property
    def known(self) -> bool:
        """Two sizes seen: overhead and per-frame cost can be told apart."""
        return len(self._bins) >= 2

    def fit(self) -> tuple[float, float]:
        """(overhead seconds, seconds per frame); (0, 0) before anything was observed."""
        if self._fit is None:
            self._fit = self._solve()
        return self._fit

    def _solve(self) -> tuple[float, float]:
        bins = list(self._bins.values())
        if not bins:
            return 0.0, 0.0
        w = [min(b.count, self.MAX_WEIGHT) for b in bins]
        sw = sum(w)
        mx = sum(wi * b.work for wi, b in zip(w, bins)) / sw
        my = sum(wi * b.seconds for wi, b in zip(w, bins)) / sw
        var = sum(wi * (b.work - mx) ** 2 for wi, b in zip(w, bins))
        cov = sum(wi * (b.work - mx) * (b.seconds - my) for wi, b in zip(w, bins))
        if var <= 0 or cov <= 0:  # one size, or time not growing with work: all of it is overhead
            return my, 0.0
        slope = cov / var
        overhead = my - slope * mx
        if overhead < 0:  # through the origin
            overhead = 0.0
            slope = (sum(wi * b.work * b.seconds for wi, b in zip(w, bins))
                     / sum(wi * b.work ** 2 for wi, b in zip(w, bins)))
        return overhead, slope

    def seconds(self, batch: int, frames: int) -> float:
        """Predicted seconds of one forward over ``batch`` samples padded to ``frames``."""
        overhead, per_frame = self.fit()
        return overhead + per_frame * batch * frames
