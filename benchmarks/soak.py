"""Soak: a mixed load for a long time against one server process, to see whether its memory stays bounded.

Starts ``python -m service`` with every model of ``--model-dir`` (or uses ``--url`` with ``--server-pid``) and sends
Poisson arrivals at ``--rate`` for ``--minutes``: random models among those served, durations in ``--audio-seconds``,
unique long prompts (so the prompt cache fills and must evict), a share of audio-to-audio requests (``--a2a``) with
an init clip, and the formats in turn. Every ``--window`` seconds it records the server's RSS, the latency
percentiles and the status counts of that window. Reported: idle RSS (ready, before load), the RSS after the first
5 minutes and at the end, the growth after the first 5 minutes (the target: at most 5 %), the peak (the target:
1.5 GiB on the CPU), and every window; a PNG of RSS and p99 over time.

    python -m benchmarks.soak --minutes 30 --rate 1 --name soak-cpu
"""
from __future__ import annotations

import argparse
import asyncio
import io
import random
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import child_pythonpath, md_table, write_results
from benchmarks.load import ROOT, ProcessMemory, free_port, percentile, serve, stop_server
from service.client import ApiError, AsyncClient

MIB = 1024 * 1024
WORDS = ("rain", "thunder", "a 440 Hz sine tone", "clicks at 120 BPM", "pink noise", "on the left", "fading out",
         "two hand claps", "an engine hum", "birds chirping", "moving left to right", "a rising sweep", "loud",
         "soft", "in the distance", "a kick drum hit", "ocean waves", "a phone ringing", "white noise", "hard right")


def prompt(rng: random.Random, i: int) -> str:
    """A unique prompt of 60-480 characters (every request misses the prompt cache)."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 40))]
    return f"{i}: " + ", ".join(words)[:480]


def clip(seconds: float = 2.0, rate: int = 22050) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def start(args) -> tuple[object, str]:
    import os

    port = free_port()
    env = dict(os.environ, TTA_HOST="127.0.0.1", TTA_PORT=str(port), TTA_MODEL_DIR=str(args.model_dir),
               TTA_LOG_LEVEL="warning", TTA_REQUEST_TIMEOUT=str(args.timeout), PYTHONPATH=child_pythonpath())
    if args.threads:
        env["TTA_THREADS"] = str(args.threads)
    return serve(env, port, "the server", timeout=600, poll_s=0.5)


async def soak(url: str, memory: ProcessMemory, args) -> list[dict]:
    rng = random.Random(args.seed)
    served = [m for m in httpx.get(url + "/models", timeout=30).json() if m.get("status") != "failed"]
    models = [m["name"] for m in served]
    a2a_models = [m["name"] for m in served if "audio-to-audio" in m.get("modes", [])]
    init = clip()
    lo, hi = args.audio_seconds
    windows: list[dict] = []
    current = {"results": []}
    t0 = time.perf_counter()

    async with AsyncClient(url, timeout=args.timeout) as client:
        async def one(i: int) -> None:
            body = {"duration": round(rng.uniform(lo, hi), 2), "seed": i, "format": ("wav", "flac", "ogg")[i % 3]}
            clip_bytes = None
            if a2a_models and rng.random() < args.a2a:
                body.update(model=rng.choice(a2a_models), init_noise_level=0.6)
                clip_bytes = init
            else:
                body["model"] = rng.choice(models)
            started = time.perf_counter()
            try:
                await client.generate(prompt(rng, i), init_audio=clip_bytes, **body)
                status = 200
            except ApiError as exc:
                status = exc.status
            except httpx.HTTPError:
                status = 0
            current["results"].append((status, time.perf_counter() - started))

        async def sample() -> None:
            while True:
                await asyncio.sleep(args.window)
                done, current["results"] = current["results"], []
                ok = [lat for status, lat in done if status == 200]
                counts: dict[str, int] = {}
                for status, _ in done:
                    counts[str(status)] = counts.get(str(status), 0) + 1
                rss = memory.rss()
                windows.append({"t_s": round(time.perf_counter() - t0, 1),
                                "rss_mib": None if rss is None else round(rss / MIB, 1), "answered": len(done),
                                "statuses": counts, "p50_s": percentile(ok, 50), "p99_s": percentile(ok, 99)})

        sampler = asyncio.create_task(sample())
        tasks, t, i, end = [], 0.0, 0, args.minutes * 60
        while True:
            t += rng.expovariate(args.rate)
            if t > end:
                break
            await asyncio.sleep(max(0.0, t0 + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
            i += 1
        await asyncio.gather(*tasks)
        await asyncio.sleep(args.window)
        sampler.cancel()
    return windows


def summary(windows: list[dict], idle_mib: float | None, peak_mib: float | None) -> dict:
    rss = [(w["t_s"], w["rss_mib"]) for w in windows if w["rss_mib"] is not None]
    after5 = next((m for t, m in rss if t >= 300), rss[0][1] if rss else None)
    end = rss[-1][1] if rss else None
    statuses: dict[str, int] = {}
    for w in windows:
        for k, n in w["statuses"].items():
            statuses[k] = statuses.get(k, 0) + n
    return {"rss_idle_mib": idle_mib, "rss_after_5_min_mib": after5, "rss_end_mib": end,
            "rss_peak_mib": peak_mib, "growth_after_5_min": None if not (after5 and end) else round(end / after5 - 1, 4),
            "statuses": statuses, "answered": sum(statuses.values())}


def markdown(report: dict) -> str:
    s, a = report["summary"], report["args"]
    lines = [f"# Soak: {a['minutes']} min at {a['rate']} req/s, all models, unique prompts, "
             f"{a['a2a'] * 100:.0f} % audio-to-audio", "",
             md_table(["figure", "value", "target"], [
                 ["RSS idle (ready, before load)", f"{s['rss_idle_mib']} MiB", "<= 1024 MiB"],
                 ["RSS after 5 min", f"{s['rss_after_5_min_mib']} MiB", ""],
                 ["RSS at the end", f"{s['rss_end_mib']} MiB", ""],
                 ["growth after the first 5 min", f"{(s['growth_after_5_min'] or 0) * 100:.1f} %", "<= 5 %"],
                 ["peak RSS (VmHWM)", f"{s['rss_peak_mib']} MiB", "<= 1536 MiB"],
                 ["answers by status", ", ".join(f"{k}: {n}" for k, n in sorted(s["statuses"].items())), ""]]),
             "", f"Machine: {report['environment']['machine']}; command: `{report['environment']['command']}`."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    w = report["windows"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([x["t_s"] / 60 for x in w], [x["rss_mib"] for x in w], label="RSS (MiB)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax2 = ax.twinx()
    ax2.plot([x["t_s"] / 60 for x in w], [x["p99_s"] for x in w], color="tab:red", alpha=0.6, label="p99 (s)")
    ax2.set_ylabel("p99 latency (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import environment, stop_on_sigterm

    stop_on_sigterm()  # a stopped soak still stops its server (the finally below)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "zoo"))
    ap.add_argument("--url", default=None, help="a running server (then --server-pid for its memory)")
    ap.add_argument("--server-pid", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--audio-seconds", default="1-10")
    ap.add_argument("--a2a", type=float, default=0.1, help="share of audio-to-audio requests")
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="soak-cpu")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    lo, _, hi = args.audio_seconds.partition("-")
    args.audio_seconds = (float(lo), float(hi or lo))
    proc = None
    if args.url:
        url, pid = args.url, args.server_pid
    else:
        proc, url = start(args)
        pid = proc.pid
    try:
        memory = ProcessMemory(pid) if pid else None
        idle = memory.rss() / MIB if memory and memory.rss() else None
        windows = asyncio.run(soak(url, memory, args)) if memory else []
        peak = memory.peak() / MIB if memory and memory.peak() else None
    finally:
        if proc is not None:
            stop_server(proc, "the server", wait_s=60)
    report = {"args": {k: v for k, v in vars(args).items()}, "environment": environment(),
              "summary": summary(windows, None if idle is None else round(idle, 1),
                                 None if peak is None else round(peak, 1)),
              "windows": windows}
    out = write_results(args.name, report, markdown(report), args.results_dir)
    plot(report, Path(out).with_suffix(".png"))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
