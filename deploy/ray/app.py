"""The service as a Ray Serve application: each replica is one process hosting one engine, the service's own app
(``service.app.create_app``), so routes, errors, headers, formats and metric names are those of
``python -m service``; Ray only adds the routing between replicas.

- **Routing**: Ray Serve's default request router (power of two choices over the replicas' ongoing-request counts,
  i.e. queue-length aware). ``max_ongoing_requests`` is the replica's own admission bound, ``TTA_MAX_BATCH`` (the
  denoise set) + ``TTA_QUEUE_SIZE`` (its waiting queue): Ray never hands a replica more than it would admit, and
  beyond that requests wait in Ray's router, bounded by ``max_queued_requests``; past it the client gets 429 with
  ``Retry-After``, the answer of a full single process.
- **Autoscaling** on ongoing requests per replica between ``min_replicas`` and ``max_replicas``; the target is the
  engine's measured batch capacity (``deploy.ray.capacity``; the serve config's comments show the derivation).
- **Readiness**: the replica's start-up (Ray routes to it only after) waits until the service's ``/health/ready``
  answers 200, i.e. every model is loaded and warmed up. **Liveness**: Ray's periodic health check calls the
  service's ``/health/live`` (503 when the engine's worker died or stalled); a failing replica is replaced.
- **Drain**: a replica being removed gets no new requests; Ray waits up to ``graceful_shutdown_timeout_s`` =
  ``TTA_DRAIN_TIMEOUT`` for the ones it holds, then the service's own shutdown answers whatever is left with a JSON
  503. A replica that dies fails only the requests it held (``deploy.ray.proxy`` turns Ray's empty answer into a
  JSON 503 with ``Retry-After``) and the deployment starts a new one.
- **Metrics**: every replica serves its registry on a port of its node and announces it in Ray's key-value store;
  ``GET /metrics/targets`` on any replica lists the live ones in Prometheus' ``http_sd`` format with a ``replica``
  label (``deploy/prometheus/prometheus-ray.yml``). ``GET /metrics`` through Ray's proxy answers for one replica
  only.

Serve config: ``deploy/ray/serve.yaml`` (``make serve-ray``); the builder is ``deploy.ray.app:build``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import httpx
import ray
from prometheus_client import start_http_server
from ray import serve
from ray.experimental import internal_kv

from service.app import create_app
from service.settings import Settings

log = logging.getLogger("tta.ray")

TARGETS_PATH = "/metrics/targets"
KV_NAMESPACE = "tta-metrics"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 3 * HEARTBEAT_S


def replica_name(ctx) -> str:
    """``app#deployment#tag``: Ray's own name of the replica (its logs and actor names carry the same parts)."""
    return f"{ctx.app_name}#{ctx.deployment}#{ctx.replica_tag}"


# ---------------------------------------------------------------------------------------------------- metrics
class MetricsEndpoint:
    """This replica's registry (the service's ``/metrics``) on its own port of the node, announced under
    ``KV_NAMESPACE`` in Ray's key-value store with a heartbeat, so that a replica that died drops out of
    ``live_targets`` within ``STALE_AFTER_S`` even though it could not remove itself."""

    def __init__(self, name: str, registry, port: int = 0):
        self.name, self.registry, self.port = name, registry, port
        self.key = f"replica/{name}"
        self._stop = threading.Event()
        self._server = None

    def start(self) -> None:
        host = node_address()
        self._server, _ = start_http_server(self.port, addr=host, registry=self.registry)
        app, deployment, _ = self.name.split("#", 2)
        self.entry = {"targets": [f"{host}:{self._server.server_port}"],
                      "labels": {"replica": self.name, "application": app, "deployment": deployment}}
        self._announce()
        threading.Thread(target=self._heartbeat, name="tta-metrics-heartbeat", daemon=True).start()
        log.info("metrics endpoint", extra={"target": self.entry["targets"][0]})

    def _announce(self) -> None:
        internal_kv._internal_kv_put(self.key, json.dumps({**self.entry, "seen": time.time()}),
                                     namespace=KV_NAMESPACE)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._announce()
            except Exception:  # noqa: BLE001 - the GCS may be briefly away; the next beat retries
                log.warning("metrics heartbeat failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        try:
            internal_kv._internal_kv_del(self.key, namespace=KV_NAMESPACE)
        except Exception:  # noqa: BLE001 - the entry then expires by itself
            log.warning("could not withdraw the metrics endpoint", exc_info=True)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def node_address() -> str:
    """The address Ray knows this replica's node by (``ray start --node-ip-address``; on KubeRay the pod's IP)."""
    node_id = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


def live_targets(now: float | None = None) -> list[dict]:
    """Every replica's metrics endpoint that beat within ``STALE_AFTER_S``, as Prometheus ``http_sd`` groups."""
    now = time.time() if now is None else now
    groups = []
    for key in sorted(internal_kv._internal_kv_list("replica/", namespace=KV_NAMESPACE)):
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if not raw:
            continue
        entry = json.loads(raw)
        if now - entry.pop("seen", 0) <= STALE_AFTER_S:
            groups.append(entry)
    return groups


# ---------------------------------------------------------------------------------------------------- the replica
class ReadyWhenWarm:
    """ASGI wrapper of the service's app that holds the lifespan's start-up until ``ready()`` returns, so that
    Ray's replica start (after which it routes to the replica) ends when the models are loaded and warm."""

    def __init__(self, app, ready):
        self.app, self.ready = app, ready

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_when_ready(message):
            if message["type"] == "lifespan.startup.complete":
                try:
                    await self.ready()
                except Exception as exc:  # noqa: BLE001 - reported to Ray as a failed start
                    message = {"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"}
            await send(message)

        await self.app(scope, receive, send_when_ready)


@serve.deployment(name="TTA", ray_actor_options={"num_cpus": 1})
@serve.ingress()
class TTAReplica:
    """One replica: the service's app under the name Ray gave the replica (``X-Replica`` on every response,
    ``replica`` on every log line)."""

    def __init__(self, settings: dict[str, Any] | None = None, metrics_port: int = 0):
        self.name = replica_name(serve.get_replica_context())
        self.settings = Settings(**{**(settings or {}), "replica_name": self.name})
        self.metrics_port = metrics_port
        self.service = None
        self.metrics: MetricsEndpoint | None = None

    def __serve_build_asgi_app__(self):
        service = create_app(self.settings)

        async def metrics_targets():
            return await asyncio.to_thread(live_targets)

        service.add_api_route(TARGETS_PATH, metrics_targets, methods=["GET"], include_in_schema=False,
                              tags=["ops"])
        self.service = service
        # the service's own health routes, called in process (no socket): Ray's start-up and health checks
        self.probe = httpx.AsyncClient(transport=httpx.ASGITransport(app=service), base_url="http://replica")
        return ReadyWhenWarm(service, self._until_ready)

    async def _until_ready(self) -> None:
        state = self.service.state.tta
        while (await self.probe.get("/health/ready")).status_code != 200:
            if state.load_error:
                raise RuntimeError(state.load_error)
            await asyncio.sleep(0.1)
        self.metrics = MetricsEndpoint(self.name, state.metrics.registry, self.metrics_port)
        self.metrics.start()

    async def check_health(self) -> None:
        """Ray calls this every ``health_check_period_s``; raising marks the replica unhealthy and Ray replaces
        it."""
        r = await self.probe.get("/health/live")
        if r.status_code != 200:
            raise RuntimeError(f"/health/live answered {r.status_code}: {r.text[:200]}")

    async def __del__(self):
        # Ray runs this after its drain (no request left, or graceful_shutdown_timeout_s passed) and after the
        # app's lifespan shutdown (the engine stopped; what it still held was answered with a JSON 503).
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)


# ---------------------------------------------------------------------------------------------------- building
def deployment_options(settings: Settings, *, min_replicas: int = 1, max_replicas: int = 2,
                       initial_replicas: int | None = None, target_ongoing_requests: float | None = None,
                       max_queued_requests: int = 64, num_cpus: float = 1, num_gpus: float = 0,
                       autoscaling: dict | None = None) -> dict:
    """Ray Serve options that follow from the engine's settings; a serve config's ``deployments`` entry overrides
    any of them. ``target_ongoing_requests`` defaults to the denoise set's size (``TTA_MAX_BATCH``), the most a
    replica runs at once; give the measured batch capacity instead (``deploy.ray.capacity``). ``autoscaling``: more
    ``autoscaling_config`` fields (delays, windows)."""
    return dict(
        max_ongoing_requests=settings.max_batch + settings.queue_size,
        max_queued_requests=max_queued_requests,
        backpressure_config={"status_code": 429, "retry_after_s": 1},
        graceful_shutdown_timeout_s=settings.drain_timeout,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=5,
        health_check_timeout_s=10,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        autoscaling_config={
            "min_replicas": min_replicas, "max_replicas": max_replicas,
            "initial_replicas": initial_replicas if initial_replicas is not None else max_replicas,
            "target_ongoing_requests": target_ongoing_requests or settings.max_batch,
            **(autoscaling or {}),
        },
    )


def build(args: dict[str, Any] | None = None):
    """Application builder (``import_path: deploy.ray.app:build``). ``args``: ``settings`` (service settings over
    the ``TTA_*`` environment), ``metrics_port`` (0: any free port), and the keywords of ``deployment_options``."""
    args = dict(args or {})
    overrides = dict(args.pop("settings", None) or {})
    metrics_port = int(args.pop("metrics_port", 0))
    options = deployment_options(Settings(**overrides), **args)
    return TTAReplica.options(**options).bind(overrides, metrics_port)
