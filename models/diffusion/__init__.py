"""Diffusion maths: noise schedules, parameterisations, samplers and guidance.

Pure tensor functions and small objects without nn.Module state, so that training, distillation,
ARC post-training and the serving scheduler all share one implementation of every formula.
"""
from models.diffusion.schedules import NoiseSchedule, RectifiedFlowSchedule, VPCosineSchedule, make_schedule
from models.diffusion.parameterization import (
    EpsPrediction,
    Parameterization,
    RFVelocity,
    VPrediction,
    X0Prediction,
    make_parameterization,
)
from models.diffusion.samplers import DDIMSampler, PingPongSampler, Sampler, make_sampler
from models.diffusion.guidance import apply_guidance

__all__ = [
    "NoiseSchedule", "VPCosineSchedule", "RectifiedFlowSchedule", "make_schedule",
    "Parameterization", "VPrediction", "RFVelocity", "EpsPrediction", "X0Prediction", "make_parameterization",
    "Sampler", "DDIMSampler", "PingPongSampler", "make_sampler", "apply_guidance",
]
