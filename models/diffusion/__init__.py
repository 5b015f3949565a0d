"""Diffusion maths: noise schedules, parameterisations, samplers and guidance.

Pure tensor functions and small objects without nn.Module state, so that training, distillation,
ARC post-training and the serving scheduler all share one implementation of every formula.
"""
from models.diffusion.discrete import DiscreteVPSchedule
from models.diffusion.guidance import apply_guidance
from models.diffusion.parameterization import (
    EpsPrediction,
    Parameterization,
    RFVelocity,
    VPrediction,
    X0Prediction,
    make_parameterization,
)
from models.diffusion.samplers import DDIMSampler, PingPongSampler, Sampler, make_sampler
from models.diffusion.schedule_factory import make_schedule
from models.diffusion.schedules import NoiseSchedule, RectifiedFlowSchedule, VPCosineSchedule

__all__ = [
    "DDIMSampler",
    "DiscreteVPSchedule",
    "EpsPrediction",
    "NoiseSchedule",
    "Parameterization",
    "PingPongSampler",
    "RFVelocity",
    "RectifiedFlowSchedule",
    "Sampler",
    "VPCosineSchedule",
    "VPrediction",
    "X0Prediction",
    "apply_guidance",
    "make_parameterization",
    "make_sampler",
    "make_schedule",
]
