"""Service settings: environment variables prefixed ``TTA_`` or a ``.env`` file (pydantic-settings)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# the batching policies (``service.scheduler.POLICIES`` implements each; the CLI offers these)
PolicyName = Literal["continuous", "adaptive", "request", "none"]
Precision = Literal["float32", "bfloat16", "float16"]

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
# MP3's constant bitrates at 32 / 44.1 / 48 kHz (MPEG-1 Layer III); LAME would round any other value to one of these
MP3_BITRATES_KBPS = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
DEFAULT_MP3_BITRATE_KBPS = 192


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TTA_", env_file=".env", extra="ignore",
                                      protected_namespaces=())

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    model_dir: Path = ZOO
    default_model: str = "tta-bsa-25"
    models: str = Field("", description="comma-separated model names to load; empty = every model in model_dir")
    device: Literal["cpu", "cuda"] = "cpu"
    runtime: Literal["auto", "torch", "onnxruntime", "tensorrt"] = Field(
        "auto", description="auto = onnxruntime on the CPU when it is installed, else torch; on cuda, tensorrt when "
        "it is installed and current engines exist (tta export --format tensorrt), else torch")
    torch_compile: bool = Field(False, description="torch runtime: torch.compile the denoiser (dynamic shapes; the "
                                "warm-up pays for the first compilation)")
    compile_blocks: bool = Field(False, description="torch runtime: torch.compile each block of the denoiser's "
                                 "repeated stack (one compilation serves every block; combines with cuda_graphs; "
                                 "excludes torch_compile)")
    cuda_graphs: bool = Field(False, description="torch runtime on cuda: replay the denoiser from CUDA graphs "
                              "captured per bucketed batch shape (excludes torch_compile)")
    whole_generation: bool = Field(False, description="admitted requests that run alone and share steps and length "
                                   "run from start to 16-bit PCM in one call: one CUDA graph per shape on cuda (every "
                                   "step, the decode, the copy to the host), the same program eagerly elsewhere")
    tick_graphs: bool = Field(False, description="torch runtime on cuda: each continuous-batching tick (the denoiser "
                              "forward and the sampler step) replays one CUDA graph per batch shape, captured once "
                              "a second batch of that shape steps")
    precision: Precision = Field(
        "float32", description="torch runtime: autocast the denoiser's matrix products to this type (bfloat16 / "
        "float16 on GPUs; the sampler and decoder stay float32); tensorrt runtime: the denoiser engines' precision "
        "(float32: the existing engines', else float16)")
    decode_precision: Precision = Field(
        "float32", description="torch runtime: the Oobleck decoder's convolution weights in this type (float16 on "
        "GPUs: 61 dB SNR against float32 on random weights, bfloat16 43 dB), snakes computed in float32 and fused")
    max_batch: int = Field(16, ge=1, le=256, description="samples per denoiser forward")
    max_padding: float = Field(0.25, ge=0, description="a tick splits its samples into forwards of similar length "
                               "whose padded frames stay within this share of the real ones (large: one forward)")
    queue_size: int = Field(64, ge=0, description="requests waiting for admission before 429")
    request_timeout: float = Field(60.0, gt=0, description="seconds from arrival to answer, else 504")
    drain_timeout: float = Field(20.0, ge=0, description="after SIGTERM: new work gets 503 at once, work in flight "
                                 "may finish for this long, then what is left gets 503 (under Kubernetes' 30 s and "
                                 "above Docker's 10 s grace you may want to lower it)")
    engine_stall_seconds: float = Field(300.0, gt=0, description="/health/live answers 503 when the engine's worker "
                                        "has died or not come round its loop for this long")
    api_keys: str = Field("", description="comma-separated; empty = authentication off")
    protect_ops: bool = Field(False, description="with API keys: /metrics, /docs and /openapi.json need a key too "
                              "(Prometheus then sends it as a bearer token)")
    cors_origins: str = Field("", description="comma-separated origins whose browser pages may call the API ('*' for "
                              "any); empty = no CORS headers")
    policy: PolicyName = "continuous"
    max_queue_delay_ms: float = Field(20.0, ge=0, description="request-level policy: wait this long to fill a batch")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    log_level: str = "info"
    replica_name: str = Field("", description="this process's name among replicas (Ray Serve, Kubernetes): sent as "
                              "X-Replica on every response and put on the log lines; empty = none")
    header_timeout: float = Field(10.0, gt=0, description="seconds a connection has to send a complete request head "
                                  "(after opening, or after its previous response), else it is closed")
    body_timeout: float = Field(30.0, gt=0, description="longest silence while a request body arrives, else 408")
    keep_alive_timeout: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(128, ge=1, description="connections and requests served at once; beyond, new "
                                 "requests get 503 (uvicorn's limit_concurrency)")
    max_body_bytes: int = Field(16 * 1024, ge=256, description="largest request body without an audio clip")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest request body that carries an "
                                  "init_audio clip (JSON with base64, or a multipart form)")
    job_timeout: float = Field(3600.0, gt=0, description="POST /jobs: seconds from submission by which a job must "
                               "finish, else it fails with 504 (a job's own timeout may be shorter)")
    job_ttl: float = Field(600.0, gt=0, description="seconds a finished job's result is kept, then 410; the job's "
                           "status stays as long again")
    job_result_bytes: int = Field(64 * 1024 * 1024, ge=0, description="bytes of finished jobs' audio kept at once; "
                                  "beyond, the oldest results expire first")
    max_jobs: int = Field(1024, ge=1, description="jobs whose status is kept (finished ones are forgotten oldest "
                          "first; unfinished ones are bounded by queue_size)")
    webhook_hosts: str = Field("", description="comma-separated hosts (host or host:port; '*.example.com' for a "
                               "domain's subdomains) that job webhooks may call; empty = webhooks refused")
    webhook_secret: str = Field("", description="HMAC-SHA256 key of the X-TTA-Signature header on webhook calls; "
                                "empty = unsigned")
    mp3_bitrate_kbps: int = Field(DEFAULT_MP3_BITRATE_KBPS, description="format mp3: constant bitrate in kbit/s, one "
                                  "of " + ", ".join(map(str, MP3_BITRATES_KBPS)))
    malloc_tuning: bool = Field(True, description="on glibc: a fixed mmap threshold, a trim threshold and two malloc "
                                "arenas, so that freed tensors go back to the system (service/malloc.py); variables "
                                "MALLOC_*_ or GLIBC_TUNABLES set by the operator win")
    warmup: bool = True
    # Test/debug only: a runtime wrapper that raises or sleeps for prompts carrying [[fail]] / [[slow=MS]] markers.
    debug_faults: bool = False

    @field_validator("mp3_bitrate_kbps")
    @classmethod
    def _mp3_bitrate(cls, kbps: int) -> int:
        if kbps not in MP3_BITRATES_KBPS:
            raise ValueError(f"{kbps} is not an MP3 bitrate; one of {', '.join(map(str, MP3_BITRATES_KBPS))}")
        return kbps

    @model_validator(mode="after")
    def _one_way_to_compile(self) -> Settings:
        if self.torch_compile and self.compile_blocks:
            raise ValueError("torch_compile (TTA_TORCH_COMPILE) and compile_blocks (TTA_COMPILE_BLOCKS) both compile "
                             "the denoiser: choose one")
        return self

    @model_validator(mode="after")
    def _tick_graphs_need_cuda(self) -> Settings:
        if self.tick_graphs and self.device != "cuda":
            raise ValueError("tick_graphs (TTA_TICK_GRAPHS) needs device cuda (TTA_DEVICE=cuda)")
        return self

    @model_validator(mode="after")
    def _half_types_need_a_cpu_that_has_them(self) -> Settings:
        """On the CPU a 16-bit type the processor lacks is emulated, tens of times slower than float32
        (``service.runtimes.torch_runtime.cpu_runs_natively``): refused here, where the operator sees it, instead
        of serving every request that slowly. ONNX Runtime ignores both settings."""
        if self.device != "cpu" or self.runtime == "onnxruntime":
            return self
        asked = [(field, value) for field, value in (("precision", self.precision),
                                                     ("decode_precision", self.decode_precision)) if value != "float32"]
        if not asked:
            return self
        from service.runtimes.torch_runtime import cpu_runs_natively

        lacking = [(field, value) for field, value in asked if not cpu_runs_natively(value)]
        if lacking:
            named = " and ".join(f"{field} (TTA_{field.upper()}) {value}" for field, value in lacking)
            types = " or ".join(sorted({value for _, value in lacking}))
            raise ValueError(f"{named}: this CPU has no native {types} arithmetic, so torch would emulate it, tens "
                             "of times slower than float32; use float32 on this CPU, or device cuda")
        return self

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def webhook_host_list(self) -> list[str]:
        return [h.strip().lower() for h in self.webhook_hosts.split(",") if h.strip()]

    @property
    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]
