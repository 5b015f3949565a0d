"""Loss weights on the x0-MSE as a function of the signal-to-noise ratio, by name (BSA paper, Eqs. 6-10).

All weights multiply ||x0 - x0_hat||^2. The equivalent eps- and v-MSE forms differ by a factor SNR and SNR + 1:
eps-MSE = SNR * x0-MSE, v-MSE = (SNR + 1) * x0-MSE, which is why ``snr`` is "the eps loss" and ``snr+1`` "the v loss".
"""
from __future__ import annotations

import torch
from torch import Tensor

WEIGHTINGS = ("bsa", "min-snr", "truncated-snr", "snr+1", "snr")


def loss_weight(name: str, snr: Tensor | None = None, *, logsnr: Tensor | None = None, gamma: float = 5.0) -> Tensor:
    """Per-sample weight on the x0-MSE for SNR = alpha^2 / sigma^2 (pass ``snr`` or ``logsnr``, not both).

    - ``bsa``:           min(SNR + 1, gamma)  (Eq. 10, gamma = 5): 1 at low SNR, capped at gamma at high SNR
    - ``min-snr``:       min(SNR, gamma)      (Eq. 9, Hang et al.); 1 where SNR == 0 exactly, as the reference code
    - ``truncated-snr``: max(SNR, 1)          (Eq. 7, Salimans & Ho)
    - ``snr+1``:         SNR + 1              (Eq. 8, the v-MSE)
    - ``snr``:           SNR                  (Eq. 6, the eps-MSE of Ho et al.)
    """
    if (snr is None) == (logsnr is None):
        raise ValueError("pass exactly one of snr and logsnr")
    if snr is None:
        snr = torch.exp(logsnr)
    if name == "bsa":
        return torch.clamp(snr + 1, max=gamma)
    if name == "min-snr":
        return torch.where(snr == 0, torch.ones_like(snr), torch.clamp(snr, max=gamma))
    if name == "truncated-snr":
        return torch.clamp(snr, min=1.0)
    if name == "snr+1":
        return snr + 1
    if name == "snr":
        return snr.clone()
    raise ValueError(f"unknown loss weighting {name!r}; expected one of {', '.join(WEIGHTINGS)}")
