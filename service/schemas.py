"""Request / response models: the HTTP contract."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# the response formats (service.audio.FORMATS encodes each): 16-bit PCM in WAV, FLAC or raw; Ogg Vorbis; MP3 at
# TTA_MP3_BITRATE_KBPS; Ogg Opus (at 48 kHz)
FormatName = Literal["wav", "flac", "ogg", "mp3", "opus", "pcm"]


def integral(value):
    """An integer field's JSON value: JSON has one number type, and 8.0 (or 8e0) is the integer 8, as JSON Schema's
    "integer" says; 8.5, true and "8" stay what they are, and strict validation refuses them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class GenerateRequest(BaseModel):
    # NaN and infinities (which pydantic's JSON parser reads from the NaN / Infinity literals, and a form's fields
    # from "nan" / "inf") are refused like any other invalid value
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    prompt: str = Field(..., min_length=1, max_length=500, description="what the audio should sound like")
    duration: float | None = Field(None, ge=0.5, description="seconds; at most the model's max_duration")
    steps: int | None = Field(None, ge=1, description="sampler steps; at most the model's max_steps")
    guidance: float | None = Field(None, ge=0.0, le=20.0, description="classifier-free guidance scale (1 = off)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="random when absent; returned in X-Seed")
    model: str | None = Field(None, min_length=1, description="a name from GET /models; the default model when "
                              "absent")
    format: FormatName = Field("wav", description="wav / flac (16-bit PCM), pcm (headerless 16-bit little-endian "
                               "interleaved), ogg (Vorbis), mp3 (TTA_MP3_BITRATE_KBPS), opus (Ogg Opus, always 48 kHz)")
    timeout: float | None = Field(None, gt=0, le=600, description="seconds; capped by the server's request_timeout")
    negative_prompt: str | None = Field(None, max_length=500, description="what guidance steers away from (models "
                                        "with classifier-free guidance, guidance other than 1)")
    init_audio: str | None = Field(None, description="a WAV / FLAC / Ogg / MP3 clip to start from, base64-encoded "
                                   "(in multipart/form-data: a file); any sample rate and channel count")
    init_noise_level: float | None = Field(None, gt=0.0, le=1.0, description="audio-to-audio: how far init_audio is "
                                           "noised before sampling, in (0, 1]; 1 (the default) ignores it")
    inpaint_start: float | None = Field(None, ge=0.0, description="inpainting: the span of init_audio to "
                                        "regenerate starts here (seconds); past the clip's end it outpaints")
    inpaint_end: float | None = Field(None, gt=0.0, description="inpainting: the span ends here (seconds)")

    @field_validator("steps", "seed", mode="before")
    @classmethod
    def _integral(cls, value):
        return integral(value)

    @field_validator("inpaint_end")
    @classmethod
    def _after_start(cls, end: float | None, info: ValidationInfo) -> float | None:
        start = info.data.get("inpaint_start")
        if end is not None and start is not None and end <= start:
            raise ValueError(f"must be after inpaint_start ({start} s)")
        return end

    @property
    def inpaint(self) -> tuple[float, float] | None:
        """The span to regenerate; ``ValueError`` when only one end of it is given."""
        if (self.inpaint_start is None) != (self.inpaint_end is None):
            raise ValueError("inpaint_start and inpaint_end come together")
        return None if self.inpaint_start is None else (self.inpaint_start, self.inpaint_end)


class JobRequest(GenerateRequest):
    """``POST /jobs``: the ``/generate`` body, and where to be told when it ends."""

    webhook: str | None = Field(None, max_length=2048, description="an http(s) URL called once when the job ends "
                                "(POST, the job's status as JSON); only hosts the server allows "
                                "(TTA_WEBHOOK_HOSTS)")


class JobError(BaseModel):
    status: int
    code: str
    message: str


class JobInfo(BaseModel):
    """An asynchronous job: where it stands and where its result is."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    model: str
    seed: int
    steps: int = Field(description="denoising steps the job takes")
    step: int = Field(description="denoising steps taken so far")
    stage: Literal["queued", "denoising", "decoding", "finished"]
    queue_position: int | None = Field(None, description="1 = the next job its model admits (queued jobs only)")
    duration: float = Field(description="seconds of audio asked for")
    format: str
    created_at: float = Field(description="Unix time")
    started_at: float | None = None
    finished_at: float | None = None
    timings: dict[str, float] | None = Field(None, description="seconds: queue, encode, denoise, decode (done jobs)")
    error: JobError | None = None
    result_expired: bool = False
    expires_at: float | None = Field(None, description="Unix time after which the result is gone (410)")
    webhook: dict | None = Field(None, description="delivery of the webhook: state, attempts, last HTTP status")
    links: dict[str, str]


class ModelInfo(BaseModel):
    """A model in ``model_dir``: a served one with its defaults and limits, or one that failed to load (``status``
    "failed", ``error`` says which file and why; the other fields are absent)."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    status: Literal["ready", "failed"] = "ready"
    error: str | None = None
    kind: str | None = None
    default_steps: int | None = None
    max_steps: int | None = None
    default_guidance: float | None = None
    max_duration: float | None = None
    default_duration: float | None = None
    runtime: str | None = None
    sample_rate: int | None = None
    sampler: str | None = None
    default: bool = False
    modes: list[str] = Field(default_factory=list, description="text-to-audio, and which of audio-to-audio, "
                             "inpainting, negative-prompt")


class ErrorBody(BaseModel):
    code: str = Field(description="what went wrong, for programs: invalid_input, unknown_model, queue_full, ...")
    message: str = Field(description="what went wrong, for people")
    field: str | None = Field(None, description="invalid input: the request field at fault (`body` for a body "
                              "that is not a valid JSON object or form)")


class ErrorResponse(BaseModel):
    error: ErrorBody
