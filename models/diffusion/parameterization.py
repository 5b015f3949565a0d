"""What the network predicts, and the one place where eps, x0 and v are converted into each other.

All conversions take per-sample times t of shape [B] and tensors z of shape [B, ...].
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from models.diffusion.schedules import NoiseSchedule, RectifiedFlowSchedule, _bc


class Parameterization(ABC):
    name: str

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def coeffs(self, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        a, s = self.schedule.alpha_sigma(t)
        return _bc(a, z), _bc(s, z)

    # generic identities of z = alpha x0 + sigma eps
    def eps_from_x0(self, z: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        a, s = self.coeffs(z, t)
        return (z - a * x0) / s

    def x0_from_eps(self, z: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, s = self.coeffs(z, t)
        return (z - s * eps) / a

    @abstractmethod
    def to_x0(self, out: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """The network's raw output -> its x0 prediction."""

    @abstractmethod
    def to_eps(self, out: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """The network's raw output -> its eps prediction."""

    @abstractmethod
    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The raw output a perfect network would give at z_t = alpha x0 + sigma eps."""


class VPrediction(Parameterization):
    """v = alpha eps - sigma x0 on a variance-preserving schedule (alpha^2 + sigma^2 = 1)."""

    name = "v"

    def to_x0(self, out, z, t):
        a, s = self.coeffs(z, t)
        return a * z - s * out

    def to_eps(self, out, z, t):
        a, s = self.coeffs(z, t)
        return s * z + a * out

    def target(self, x0, eps, t):
        a, s = self.coeffs(x0, t)
        return a * eps - s * x0


class RFVelocity(Parameterization):
    """Rectified-flow velocity v = eps - x0, so x0 = z - t v and eps = z + (1 - t) v."""

    name = "rf-velocity"

    def to_x0(self, out, z, t):
        return z - _bc(t, z) * out

    def to_eps(self, out, z, t):
        return z + (1 - _bc(t, z)) * out

    def target(self, x0, eps, t):
        return eps - x0


class EpsPrediction(Parameterization):
    name = "eps"

    def to_x0(self, out, z, t):
        return self.x0_from_eps(z, out, t)

    def to_eps(self, out, z, t):
        return out

    def target(self, x0, eps, t):
        return eps


class X0Prediction(Parameterization):
    name = "x0"

    def to_x0(self, out, z, t):
        return out

    def to_eps(self, out, z, t):
        return self.eps_from_x0(z, out, t)

    def target(self, x0, eps, t):
        return x0


def make_parameterization(name: str, schedule: NoiseSchedule) -> Parameterization:
    if name == "v":
        if isinstance(schedule, RectifiedFlowSchedule):
            return RFVelocity(schedule)
        return VPrediction(schedule)
    for cls in (RFVelocity, EpsPrediction, X0Prediction):
        if cls.name == name:
            return cls(schedule)
    raise ValueError(f"unknown parameterization {name!r}; expected one of v, rf-velocity, eps, x0")
