"""Load benchmark: Poisson arrivals at rising rates against the service, per scheduling policy.

For each policy (continuous, request, none) a server is started (``python -m service`` with ``TTA_POLICY``), or an
already running one is used with ``--url`` (then only its own policy is measured). At each rate, requests arrive as
a Poisson process for ``--seconds``; we record every latency and status, then report throughput (successful
requests per second of wall time), p50 / p95 / p99 latency of successful requests, and goodput (requests per second
that succeeded within the latency objective ``--slo``). Results go to ``benchmarks/results/`` as JSON + Markdown
(+ a PNG plot when matplotlib is installed), with the machine, versions and command line.

    python benchmarks/load.py --model-dir models/zoo --model tta-teacher --rates 0.5,1,2,4 --seconds 60
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a dog barks twice", "rain on a tin roof", "a church bell rings", "footsteps on gravel",
           "a car passes by", "birds singing at dawn", "a door creaks open", "thunder in the distance"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def run_rate(url: str, rate: float, seconds: float, body: dict, seed: int, timeout: float) -> dict:
    rng = random.Random(seed)
    results: list[tuple[int, float]] = []

    async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100)) as client:
        async def one(i: int) -> None:
            payload = dict(body, prompt=PROMPTS[i % len(PROMPTS)], seed=i)
            t0 = time.perf_counter()
            try:
                r = await client.post("/generate", json=payload)
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            results.append((status, time.perf_counter() - t0))

        start = time.perf_counter()
        tasks, t, i = [], 0.0, 0
        while True:
            t += rng.expovariate(rate)
            if t > seconds:
                break
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
            i += 1
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {"rate": rate, "sent": len(results), "wall_s": wall, "results": results}


def summarise(raw: dict, slo: float) -> dict:
    ok = [lat for status, lat in raw["results"] if status == 200]
    statuses: dict[str, int] = {}
    for status, _ in raw["results"]:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    wall = raw["wall_s"]
    return {"offered_rps": raw["rate"], "sent": raw["sent"], "ok": len(ok), "statuses": statuses,
            "throughput_rps": len(ok) / wall if wall else 0.0,
            "goodput_rps": sum(1 for lat in ok if lat <= slo) / wall if wall else 0.0,
            "p50_s": percentile(ok, 50), "p95_s": percentile(ok, 95), "p99_s": percentile(ok, 99)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(policy: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, TTA_HOST="127.0.0.1", TTA_PORT=str(port), TTA_POLICY=policy,
               TTA_MODEL_DIR=str(args.model_dir), TTA_DEFAULT_MODEL=args.model, TTA_MODELS=args.model,
               TTA_MAX_BATCH=str(args.max_batch), TTA_QUEUE_SIZE=str(args.queue_size),
               TTA_MAX_QUEUE_DELAY_MS=str(args.max_queue_delay_ms), TTA_LOG_LEVEL="warning",
               TTA_REQUEST_TIMEOUT=str(args.timeout), PYTHONPATH=str(ROOT))
    if args.threads:
        env["TTA_THREADS"] = str(args.threads)
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for policy {policy} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"server for policy {policy} did not become ready")


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=5).stdout.strip() or None
    except Exception:
        info["git_commit"] = None
    return info


def write_report(report: dict, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    cfg, env = report["config"], report["environment"]
    lines = [f"# Load benchmark: {name}", "",
             f"Model `{cfg['model']}`, {cfg['audio_seconds']} s of audio, {cfg['steps'] or 'default'} steps, "
             f"Poisson arrivals for {cfg['seconds']} s per rate, latency objective {cfg['slo']} s, max_batch "
             f"{cfg['max_batch']}.", "",
             f"Machine: {env['platform']}, {env['cpu_count']} CPUs, GPU {env['cuda']}; torch {env['torch']}, "
             f"Python {env['python']}; {env['date']}.", "", f"Command: `{env['command']}`", "",
             "| policy | offered req/s | sent | ok | throughput req/s | goodput req/s | p50 s | p95 s | p99 s | statuses |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for policy, rows in report["policies"].items():
        for r in rows:
            lines.append(f"| {policy} | {r['offered_rps']:g} | {r['sent']} | {r['ok']} | {fmt(r['throughput_rps'])} | "
                         f"{fmt(r['goodput_rps'])} | {fmt(r['p50_s'])} | {fmt(r['p95_s'])} | {fmt(r['p99_s'])} | "
                         f"{r['statuses']} |")
    paths[1].write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, rows in report["policies"].items():
        rates = [r["offered_rps"] for r in rows]
        ax1.plot(rates, [r["goodput_rps"] for r in rows], marker="o", label=policy)
        ax2.plot(rates, [r["p95_s"] if r["p95_s"] is not None else float("nan") for r in rows], marker="o",
                 label=policy)
    ax1.set(xlabel="offered load (req/s)", ylabel=f"goodput (req/s within {cfg['slo']} s)", title="Goodput")
    ax2.set(xlabel="offered load (req/s)", ylabel="p95 latency (s)", title="p95 latency", yscale="log")
    ax2.axhline(cfg["slo"], color="grey", linestyle="--", linewidth=1)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(out / f"{name}.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="measure this running server instead of starting one per policy")
    p.add_argument("--policies", default="continuous,request,none")
    p.add_argument("--model-dir", default=str(ROOT / "models" / "zoo"))
    p.add_argument("--model", default="tta-teacher")
    p.add_argument("--rates", default="0.5,1,2,4", help="offered loads in requests per second")
    p.add_argument("--seconds", type=float, default=60.0, help="arrival window per rate")
    p.add_argument("--audio-seconds", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--slo", type=float, default=2.0, help="latency objective for goodput, seconds")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--max-queue-delay-ms", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="output file stem (default load-<model>)")
    args = p.parse_args(argv)

    rates = [float(r) for r in args.rates.split(",")]
    body = {"duration": args.audio_seconds, "model": args.model}
    if args.steps:
        body["steps"] = args.steps
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    report = {"config": {"model": args.model, "rates": rates, "seconds": args.seconds, "slo": args.slo,
                         "audio_seconds": args.audio_seconds, "steps": args.steps, "max_batch": args.max_batch,
                         "queue_size": args.queue_size, "max_queue_delay_ms": args.max_queue_delay_ms},
              "environment": environment(), "policies": {}}
    for policy in (["external"] if args.url else policies):
        proc = None
        url = args.url
        if not url:
            proc, url = start_server(policy, args)
        try:
            rows = []
            for i, rate in enumerate(rates):
                raw = asyncio.run(run_rate(url, rate, args.seconds, body, args.seed + i, args.timeout))
                rows.append(summarise(raw, args.slo))
                r = rows[-1]
                print(f"{policy:>10} {rate:6.2f} req/s: ok {r['ok']}/{r['sent']}, throughput "
                      f"{r['throughput_rps']:.2f}, goodput {r['goodput_rps']:.2f}, p50 {r['p50_s']}, p99 {r['p99_s']}",
                      flush=True)
            report["policies"][policy] = rows
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    for path in write_report(report, Path(args.out), args.name or f"load-{args.model}"):
        print("wrote", path)


if __name__ == "__main__":
    main()
