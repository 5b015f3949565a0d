"""Noise schedules by name, as a config's ``schedule`` block names them (the discrete DDPM table included)."""
from __future__ import annotations

from models.diffusion.discrete import DiscreteVPSchedule
from models.diffusion.schedules import NoiseSchedule, RectifiedFlowSchedule, VPCosineSchedule


def make_schedule(config: dict | str) -> NoiseSchedule:
    if isinstance(config, str):
        config = {"name": config}
    kwargs = {k: v for k, v in config.items() if k != "name"}
    if config["name"] == VPCosineSchedule.name:
        return VPCosineSchedule(**kwargs)
    if config["name"] == RectifiedFlowSchedule.name:
        return RectifiedFlowSchedule()
    if config["name"] == DiscreteVPSchedule.name:
        return DiscreteVPSchedule.from_scheduler_config(kwargs, "the schedule config")
    raise ValueError(f"unknown noise schedule {config['name']!r}; expected 'vp-cosine', 'rectified-flow' or "
                     f"{DiscreteVPSchedule.name!r}")
