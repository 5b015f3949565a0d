"""Burst load through Ray Serve with 1, 2, ... replicas against the single process, on this machine (loopback only).

    python -m deploy.ray.bench --model-dir models/zoo --model tta-arc --replicas 1,2 --concurrency 20 --rounds 3

Each configuration gets the machine's cores split evenly (``--cores``; torch threads = cores / replicas, or
``--threads`` each; on a shared machine 1 thread per process avoids stragglers in torch's intra-op barrier), a warm-up
round, then ``--rounds`` rounds of ``--concurrency`` requests sent at once; it reports requests per second (all
requests over the rounds' wall time), p50 / p99 latency and how the requests spread over replicas. ``direct`` is
``python -m service`` on all the cores, so ``direct`` against 1 replica is the cost of Ray's proxy and router.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def burst(url: str, body: dict, concurrency: int, rounds: int) -> dict:
    def one(i: int) -> tuple[float, int, str]:
        t0 = time.perf_counter()
        r = client.post("/generate", json={**body, "seed": i})
        return time.perf_counter() - t0, r.status_code, r.headers.get("x-replica", "-")

    with httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client, \
            ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up
        results, t0 = [], time.perf_counter()
        for r in range(rounds):
            results += pool.map(one, range(r * concurrency, (r + 1) * concurrency))
        wall = time.perf_counter() - t0
    latency = np.array([x[0] for x in results])
    return {"requests": len(results), "ok": sum(x[1] == 200 for x in results), "wall_s": round(wall, 2),
            "req_per_s": round(len(results) / wall, 2), "p50_s": round(float(np.percentile(latency, 50)), 3),
            "p99_s": round(float(np.percentile(latency, 99)), 3),
            "per_replica": dict(Counter(x[2] for x in results))}


def settings(args, threads: int) -> dict:
    return {"model_dir": str(args.model_dir), "default_model": args.model, "models": args.model,
            "threads": threads, "runtime": args.runtime, "queue_size": 64, "log_level": "warning"}


def run_direct(args, body: dict) -> dict:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TTA_HOST": "127.0.0.1", "TTA_PORT": str(port),
           **{f"TTA_{k.upper()}": str(v) for k, v in settings(args, args.threads or args.cores).items()}}
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        return burst(f"http://127.0.0.1:{port}", body, args.concurrency, args.rounds)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def run_ray(args, body: dict, replicas_list: list[int]) -> dict:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray: node address 127.0.0.1
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = "deploy.ray.proxy:middlewares"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    from deploy.ray.app import build

    out = {}
    port = free_port()
    ray.init(num_cpus=args.cores, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="error",
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for n in replicas_list:
            threads = args.threads or max(1, args.cores // n)
            serve.run(build({"settings": settings(args, threads), "min_replicas": n, "max_replicas": n,
                             "num_cpus": args.cores / n}), name="tta", route_prefix="/")
            out[f"ray x{n}"] = burst(f"http://127.0.0.1:{port}", body, args.concurrency, args.rounds)
            serve.delete("tta")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "zoo")
    p.add_argument("--model", default="tta-arc")
    p.add_argument("--runtime", default="auto")
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    p.add_argument("--threads", type=int, help="torch threads per process (default: cores / replicas)")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--steps", type=int)
    p.add_argument("--no-direct", action="store_true")
    args = p.parse_args(argv)
    body = {"prompt": "rain and an engine hum", "model": args.model, "duration": args.duration}
    if args.steps:
        body["steps"] = args.steps
    results = {} if args.no_direct else {"direct": run_direct(args, body)}
    results.update(run_ray(args, body, [int(n) for n in args.replicas.split(",")]))
    print(json.dumps({"command": " ".join(sys.argv), "cores": args.cores, "body": body, "results": results},
                     indent=1))
    print(f"| setup | requests | req/s | p50 s | p99 s | per replica |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ok']}/{r['requests']} | {r['req_per_s']} | {r['p50_s']} | {r['p99_s']} | "
              f"{', '.join(str(v) for v in r['per_replica'].values())} |")


if __name__ == "__main__":
    main()
