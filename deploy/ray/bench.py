"""Load through Ray Serve with 1, 2, ... replicas against the single process, on this machine (loopback only).

    python -m deploy.ray.bench --model-dir models/zoo --model tta-arc --replicas 1,2 --concurrency 20 --rounds 3
    python -m deploy.ray.bench --model tta-arc --replicas 1,2 --rates 2,4,6,8 --seconds 30 --name ray-tta-arc

Bursts (the default): 
Each configuration gets the machine's cores split evenly (``--cores``; torch threads = cores / replicas, or
``--threads`` each; on a shared machine 1 thread per process avoids stragglers in torch's intra-op barrier), a warm-up
round, then ``--rounds`` rounds of ``--concurrency`` requests sent at once; it reports requests per second (all
requests over the rounds' wall time), p50 / p99 latency and how the requests spread over replicas. ``direct`` is
``python -m service`` on all the cores, so ``direct`` against 1 replica is the cost of Ray's proxy and router.

Poisson arrivals (``--rates``): for each setup, after the warm-up round, each rate for ``--seconds`` (the same
arrival times for every setup: ``--seed``), through the project's client (``service.client.AsyncClient``);
throughput of 200s, p50 / p99, statuses and the spread over replicas per rate, written with the machine and the
command to ``benchmarks/results/<--name>.{json,md}``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from benchmarks.load import free_port

ROOT = Path(__file__).resolve().parents[2]


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
        if rounds == 0:
            return {}
        results, t0 = [], time.perf_counter()
        for r in range(rounds):
            results += pool.map(one, range(r * concurrency, (r + 1) * concurrency))
        wall = time.perf_counter() - t0
    latency = np.array([x[0] for x in results])
    return {"requests": len(results), "ok": sum(x[1] == 200 for x in results), "wall_s": round(wall, 2),
            "req_per_s": round(len(results) / wall, 2), "p50_s": round(float(np.percentile(latency, 50)), 3),
            "p99_s": round(float(np.percentile(latency, 99)), 3),
            "per_replica": dict(Counter(x[2] for x in results))}


def poisson(url: str, body: dict, rate: float, seconds: float, seed: int) -> dict:
    """Poisson arrivals at ``rate`` for ``seconds``; every request's latency, status and replica."""
    from benchmarks.load import arrival_times, percentile
    from service.client import ApiError, AsyncClient

    fields = {k: v for k, v in body.items() if k != "prompt"}

    async def run() -> tuple[list[tuple[float, int, str]], float]:
        results = []
        async with AsyncClient(url, timeout=300, limits=httpx.Limits(max_connections=1000)) as client:
            async def one(i: int) -> None:
                t0 = time.perf_counter()
                try:
                    clip = await client.generate(body["prompt"], **fields, seed=i)
                    status, replica = 200, clip.headers.get("x-replica", "-")
                except ApiError as exc:
                    status, replica = exc.status, "-"
                except httpx.HTTPError:
                    status, replica = 0, "-"
                results.append((time.perf_counter() - t0, status, replica))

            start, tasks = time.perf_counter(), []
            for i, t in enumerate(arrival_times(rate, seconds, seed)):
                await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
            return results, time.perf_counter() - start

    results, wall = asyncio.run(run())
    ok = [lat for lat, status, _ in results if status == 200]
    return {"rate": rate, "sent": len(results), "ok": len(ok), "wall_s": round(wall, 2),
            "throughput_rps": round(len(ok) / wall, 3), "p50_s": percentile(ok, 50), "p99_s": percentile(ok, 99),
            "statuses": dict(Counter(str(status) for _, status, _ in results)),
            "per_replica": dict(Counter(replica for _, status, replica in results if status == 200))}


def measure(url: str, body: dict, args) -> dict:
    """A burst run, or (``--rates``) one Poisson run per rate after a warm-up burst."""
    if not args.rates:
        return burst(url, body, args.concurrency, args.rounds)
    burst(url, body, args.concurrency, 0)  # the warm-up round alone
    return {f"{rate:g}": poisson(url, body, rate, args.seconds, args.seed)
            for rate in (float(r) for r in args.rates.split(","))}


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
        return measure(f"http://127.0.0.1:{port}", body, args)
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
            out[f"ray x{n}"] = measure(f"http://127.0.0.1:{port}", body, args)
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
    p.add_argument("--rates", default="", help="Poisson arrival rates (requests/s), e.g. 2,4,6; empty: bursts")
    p.add_argument("--seconds", type=float, default=30.0, help="--rates: seconds of arrivals per rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="--rates: the result's name under benchmarks/results")
    args = p.parse_args(argv)
    body = {"prompt": "rain and an engine hum", "model": args.model, "duration": args.duration}
    if args.steps:
        body["steps"] = args.steps
    results = {} if args.no_direct else {"direct": run_direct(args, body)}
    results.update(run_ray(args, body, [int(n) for n in args.replicas.split(",")]))
    data = {"command": "python -m deploy.ray.bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "cores": args.cores, "body": body, "results": results}
    if not args.rates:
        print(json.dumps(data, indent=1))
        print("| setup | requests | req/s | p50 s | p99 s | per replica |\n|---|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['ok']}/{r['requests']} | {r['req_per_s']} | {r['p50_s']} | {r['p99_s']} | "
                  f"{', '.join(str(v) for v in r['per_replica'].values())} |")
        return
    from benchmarks.common import environment, md_table, write_results

    data["environment"] = environment()
    rows = [[setup, rate, r["sent"], r["throughput_rps"], r["p50_s"], r["p99_s"],
             ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items())),
             " / ".join(str(v) for v in r["per_replica"].values())]
            for setup, per_rate in results.items() for rate, r in per_rate.items()]
    md = (f"# Ray Serve replicas against one process: `{args.model}`, Poisson arrivals\n\n"
          f"{args.duration:g} s clips, {args.seconds:g} s of arrivals per rate (the same arrival times for every "
          f"setup), {args.cores} cores shared by the setup's processes, torch threads per process "
          f"{args.threads or 'cores / replicas'}; `direct` = `python -m service`. Throughput counts 200s over the "
          "run's wall time; latencies are of the 200s.\n\n"
          + md_table(["setup", "offered req/s", "sent", "throughput req/s", "p50 s", "p99 s", "statuses",
                      "200s per replica"], rows)
          + f"\n\nCommand: `{data['command']}`")
    write_results(args.name or f"ray-{args.model}", data, md)
    print(md)


if __name__ == "__main__":
    main()
