"""Prometheus metrics in base units, in a registry the app owns (so several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    """Every ``tta_*`` family. Request-level series are recorded by the HTTP layer; batch and stage series at the
    engine boundary (the engine calls these, the runner never does)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("tta_requests", "Generation requests by HTTP status", ["model", "status"], registry=r)
        self.request_duration = Histogram("tta_request_duration_seconds", "Arrival to response, successful requests",
                                          ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("tta_queue_wait_seconds", "Arrival to admission into the denoise set",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("tta_stage_duration_seconds", "One batched call of a stage",
                                        ["model", "stage"], buckets=STAGE_BUCKETS, registry=r)
        self.batch_size = Histogram("tta_batch_size", "Samples per denoiser forward", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inflight = Gauge("tta_inflight_requests", "Samples in the denoise set", ["model"], registry=r)
        self.queue_depth = Gauge("tta_queue_depth", "Requests waiting for admission", ["model"], registry=r)
        self.audio_seconds = Counter("tta_generated_audio_seconds", "Seconds of audio returned", ["model"], registry=r)
        self.rtf = Histogram("tta_real_time_factor", "Compute seconds (encode+denoise+decode) per audio second",
                             ["model"], buckets=RTF_BUCKETS, registry=r)
        self.model_loaded = Gauge("tta_model_loaded", "1 when the model is loaded", ["model", "runtime"], registry=r)
        self.ready = Gauge("tta_ready", "1 when every model is loaded and warmed up", registry=r)
        self.denoise_steps = Counter("tta_denoise_steps", "Sample-steps executed by the denoiser", ["model"],
                                     registry=r)
        self.forward_cost = Gauge("tta_forward_cost_seconds", "Fitted cost of one denoiser forward (what the "
                                  "adaptive policy decides with): term=overhead (per forward) or per_frame (per "
                                  "batch x padded frame)",
                                  ["model", "term"], registry=r)
        self.jobs = Gauge("tta_jobs", "Asynchronous jobs (POST /jobs) held, by state", ["state"], registry=r)
        self.job_result_bytes = Gauge("tta_job_result_bytes", "Bytes of finished jobs' audio held", registry=r)
        self.failed_batches = Counter("tta_failed_batches", "Batches whose stage raised", ["model", "stage"],
                                      registry=r)
        self.graph_captures = Counter("tta_cuda_graph_captures", "CUDA graphs captured, by kind: forward "
                                      "(TTA_CUDA_GRAPHS), tick (TTA_TICK_GRAPHS), whole (TTA_WHOLE_GENERATION); each "
                                      "costs a few forwards, so a count that keeps rising means batch shapes that do "
                                      "not recur", ["model", "kind"], registry=r)
        self.whole_generations = Counter("tta_whole_generations", "Admitted sets run from start to PCM in one call "
                                         "(TTA_WHOLE_GENERATION; one CUDA graph on a GPU)", ["model"], registry=r)
