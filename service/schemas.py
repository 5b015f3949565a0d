"""Request / response models: the HTTP contract."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: str = Field(..., min_length=1, max_length=500, description="what the audio should sound like")
    duration: float | None = Field(None, ge=0.5, description="seconds; at most the model's max_duration")
    steps: int | None = Field(None, ge=1, description="sampler steps; at most the model's max_steps")
    guidance: float | None = Field(None, ge=0.0, le=20.0, description="classifier-free guidance scale (1 = off)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="random when absent; returned in X-Seed")
    model: str | None = Field(None, description="a name from GET /models; the default model when absent")
    format: Literal["wav", "flac", "ogg"] = "wav"
    timeout: float | None = Field(None, gt=0, le=600, description="seconds; capped by the server's request_timeout")


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    kind: str
    default_steps: int
    max_steps: int
    default_guidance: float
    max_duration: float
    default_duration: float
    runtime: str
    sample_rate: int
    sampler: str
    default: bool


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
