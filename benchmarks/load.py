"""Load benchmark: Poisson arrivals at rising rates against the service, per scheduling policy.

For each policy (``--policies``: continuous, adaptive, request, none) a server is started (``python -m service``
with ``TTA_POLICY``), or an already running one is used with ``--url`` (then only its own policy is measured). At
each rate, requests arrive as a Poisson process for ``--seconds``; we record every latency and status, then report
throughput (successful requests per second of wall time), p50 / p95 / p99 latency of successful requests, and
goodput (requests per second that succeeded within the latency objective ``--slo``). With ``--repeats N`` every
policy's server stays up and each rate runs N times per policy, the policies taking turns on the same arrivals
(medians reported, each run kept, and paired wins against the first policy). Beside every rate we record the
server process's resident memory: its peak (the kernel's high-water mark VmHWM, reset before each rate through
/proc/<pid>/clear_refs so the peak belongs to that rate), mean and a time series sampled every ``--rss-interval``
seconds, plus its RSS once ready and its peak while loading. The target on this machine: under 1.5 GiB with the
embedded models on the CPU.
With ``--url`` the server's memory is measured only when ``--server-pid`` names its process on this machine.
Results go to ``benchmarks/results/`` as JSON + Markdown (+ a PNG plot when matplotlib is installed), with the
machine, versions and command line.

    python benchmarks/load.py --model-dir models/zoo --model tta-teacher --rates 0.5,1,2,4 --seconds 60
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Self

import httpx

from benchmarks.common import child_pythonpath, git_commit, incomplete_note, stop_on_sigterm, write_atomically
from service.client import ApiError, AsyncClient

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a dog barks twice", "rain on a tin roof", "a church bell rings", "footsteps on gravel",
           "a car passes by", "birds singing at dawn", "a door creaks open", "thunder in the distance"]


MIB = 1024 * 1024


class ProcessMemory:
    """Resident memory of one process (Linux /proc, else psutil when installed; RSS of the process itself, which is
    the whole service: uvicorn, the engine and every runtime live in one process)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.proc_status = Path(f"/proc/{pid}/status")
        self._psutil = None
        if not self.proc_status.exists():  # not Linux: psutil when it is installed, else memory is not measured
            try:
                import psutil
            except ImportError:
                return
            try:
                self._psutil = psutil.Process(pid)
            except psutil.Error:
                self._psutil = None

    @property
    def available(self) -> bool:
        return self.proc_status.exists() or self._psutil is not None

    def _status(self) -> dict[str, int]:
        out = {}
        for line in self.proc_status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def rss(self) -> int | None:
        """Current resident set size in bytes."""
        try:
            if self.proc_status.exists():
                return self._status().get("VmRSS")
            if self._psutil is not None:
                return self._psutil.memory_info().rss
        except (OSError, ValueError):
            return None
        return None

    def peak(self) -> int | None:
        """The kernel's high-water mark of the RSS since start or since the last ``reset_peak`` (Linux only)."""
        try:
            return self._status().get("VmHWM") if self.proc_status.exists() else None
        except (OSError, ValueError):
            return None

    def reset_peak(self) -> bool:
        """Start a new high-water mark (``echo 5 > /proc/<pid>/clear_refs``, Linux >= 4.0, same user)."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False


class RssMonitor:
    """Samples a process's RSS every ``interval`` seconds in a background thread while a rate runs; the peak comes
    from the kernel's high-water mark when it can be reset per rate (it catches spikes between samples), else from
    the samples."""

    def __init__(self, memory: ProcessMemory, interval: float = 0.5):
        self.memory, self.interval = memory, interval
        self.series: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm_reset = False

    def __enter__(self) -> Self:
        self._hwm_reset = self.memory.reset_peak()
        self._t0 = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        rss = self.memory.rss()
        if rss is not None:
            self.series.append((round(time.perf_counter() - self._t0, 3), round(rss / MIB, 1)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def summary(self) -> dict:
        values = [mib for _, mib in self.series]
        if not values:
            return {"rss_peak_mib": None, "rss_peak_source": None, "rss_mean_mib": None, "rss_series_mib": []}
        hwm = self.memory.peak() if self._hwm_reset else None
        peak, source = (hwm / MIB, "VmHWM") if hwm is not None else (max(values), "sampled")
        return {"rss_peak_mib": round(max(peak, max(values)), 1), "rss_peak_source": source,
                "rss_mean_mib": round(sum(values) / len(values), 1), "rss_start_mib": values[0],
                "rss_end_mib": values[-1], "rss_series_mib": self.series}


def server_memory(memory: ProcessMemory | None) -> dict:
    """Once ready, before any load: the RSS now and the peak so far (loading, export, warm-up)."""
    if memory is None or not memory.available:
        return {"rss_ready_mib": None, "rss_loading_peak_mib": None}
    rss, peak = memory.rss(), memory.peak()
    return {"rss_ready_mib": None if rss is None else round(rss / MIB, 1),
            "rss_loading_peak_mib": None if peak is None else round(peak / MIB, 1)}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def parse_seconds(text: str) -> tuple[float, float]:
    """``"5"`` -> (5, 5); ``"1-10"`` -> (1, 10): each request's duration uniform in that range."""
    lo, _, hi = str(text).partition("-")
    lo, hi = float(lo), float(hi or lo)
    if not 0 < lo <= hi:
        raise ValueError(f"audio seconds {text!r}: expected a positive number or a range lo-hi")
    return lo, hi


def request_duration(seconds: tuple[float, float], seed: int, i: int) -> float:
    """Request ``i``'s duration: the same for every policy and rate with the same seed (a mixed workload replays
    identically)."""
    lo, hi = seconds
    return lo if lo == hi else round(random.Random(f"{seed}/{i}").uniform(lo, hi), 2)


def arrival_times(rate: float, seconds: float, seed: int) -> list[float]:
    """A Poisson process's arrival times in [0, seconds] (the same for every policy with the same seed)."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > seconds:
            return times
        times.append(t)


async def run_rate(url: str, rate: float, seconds: float, body: dict, seed: int, timeout: float,
                   audio_seconds: tuple[float, float] = (5.0, 5.0)) -> dict:
    results: list[tuple[int, float]] = []

    async with AsyncClient(url, timeout=timeout,
                           limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100)) as client:
        async def one(i: int) -> None:
            payload = {k: v for k, v in body.items() if k != "prompt"}
            payload.update(seed=i, duration=request_duration(audio_seconds, seed, i))
            t0 = time.perf_counter()
            try:
                await client.generate(PROMPTS[i % len(PROMPTS)], **payload)
                status = 200
            except ApiError as exc:
                status = exc.status
            except httpx.HTTPError:
                status = 0
            results.append((status, time.perf_counter() - t0))

        start = time.perf_counter()
        tasks = []
        for i, t in enumerate(arrival_times(rate, seconds, seed)):
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {"rate": rate, "sent": len(results), "wall_s": wall, "results": results}


def summarise(raw: dict, slo: float, memory: dict | None = None) -> dict:
    ok = [lat for status, lat in raw["results"] if status == 200]
    statuses: dict[str, int] = {}
    for status, _ in raw["results"]:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    wall = raw["wall_s"]
    return {"offered_rps": raw["rate"], "sent": raw["sent"], "ok": len(ok), "statuses": statuses,
            "throughput_rps": len(ok) / wall if wall else 0.0,
            "goodput_rps": sum(1 for lat in ok if lat <= slo) / wall if wall else 0.0,
            "p50_s": percentile(ok, 50), "p95_s": percentile(ok, 95), "p99_s": percentile(ok, 99),
            **(memory or {"rss_peak_mib": None, "rss_mean_mib": None})}


POOLED = ("throughput_rps", "goodput_rps", "p50_s", "p95_s", "p99_s")


def pool(rows: list[dict]) -> dict:
    """One (policy, rate) over its repeats: the median of each latency and rate figure, the highest memory, request
    counts summed, and every run's own figures under ``runs`` (a single run is returned as it is)."""
    if len(rows) == 1:
        return rows[0]
    out = dict(rows[0], sent=sum(r["sent"] for r in rows), ok=sum(r["ok"] for r in rows), statuses={})
    for r in rows:
        for status, n in r["statuses"].items():
            out["statuses"][status] = out["statuses"].get(status, 0) + n
    for key in POOLED:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = percentile(values, 50)
    peaks = [r.get("rss_peak_mib") for r in rows if r.get("rss_peak_mib") is not None]
    out["rss_peak_mib"] = max(peaks) if peaks else None
    out.pop("rss_series_mib", None)
    captures: dict[str, int] = {}
    for r in rows:
        for kind, n in r.get("graph_captures", {}).items():
            captures[kind] = captures.get(kind, 0) + n
    out["graph_captures"] = captures
    out["runs"] = [{k: r[k] for k in ("sent", "ok", *POOLED, "rss_peak_mib") if k in r} for r in rows]
    return out


def graph_captures(url: str) -> dict[str, float] | None:
    """The server's CUDA graph captures so far, by kind, summed over models (``tta_cuda_graph_captures_total``);
    None when /metrics cannot be read."""
    try:
        return captures_in(httpx.get(f"{url}/metrics", timeout=10).raise_for_status().text)
    except httpx.HTTPError:
        return None


def captures_in(exposition: str) -> dict[str, float]:
    """``tta_cuda_graph_captures_total`` by kind, summed over models, from Prometheus' text format."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == "tta_cuda_graph_captures_total":
                out[s.labels["kind"]] = out.get(s.labels["kind"], 0) + s.value
    return out


def run_one_rate(url: str, memory: ProcessMemory | None, rate: float, args, body: dict, seed: int,
                 audio_seconds: tuple[float, float]) -> dict:
    """One rate against one server, with its memory sampled when it can be read, and the CUDA graphs the server
    captured meanwhile (``graph_captures``: by kind; empty without graphs)."""
    before = graph_captures(url)
    if memory is None:
        raw = asyncio.run(run_rate(url, rate, args.seconds, body, seed, args.timeout, audio_seconds))
        row = summarise(raw, args.slo)
    else:
        with RssMonitor(memory, args.rss_interval) as monitor:
            raw = asyncio.run(run_rate(url, rate, args.seconds, body, seed, args.timeout, audio_seconds))
        row = summarise(raw, args.slo, monitor.summary())
    captured = captured_between(before, graph_captures(url))
    if captured is not None:
        row["graph_captures"] = captured
    return row


def captured_between(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, int] | None:
    """The graphs captured between two readings of ``graph_captures``, by kind; None when either is unknown."""
    if before is None or after is None:
        return None
    return {k: int(n - before.get(k, 0)) for k, n in after.items() if n > before.get(k, 0)}


def captures_text(captures: dict[str, int]) -> str:
    """Graph captures by kind as a table cell: ``tick 3, whole 1``."""
    return ", ".join(f"{kind} {n}" for kind, n in sorted(captures.items()))


def preflight(url: str, body: dict, audio_seconds: tuple[float, float], timeout: float) -> None:
    """One request of the longest duration the run will ask for, before any load: a server that refuses the
    benchmark's requests (an unknown model, a duration over the model's maximum, a bad setting) stops the run here
    with its own words, instead of answering every measured request with the same error."""
    from service.client import Client

    payload = {k: v for k, v in body.items() if k != "prompt"} | {"seed": 0, "duration": audio_seconds[1]}
    with Client(url, timeout=timeout) as client:
        try:
            client.generate(PROMPTS[0], **payload)
        except ApiError as exc:
            if 400 <= exc.status < 500 and exc.status != 429:
                raise SystemExit(f"the server at {url} refuses the benchmark's requests: {exc}") from None
            raise


def warm_up(url: str, rate: float, args, body: dict, audio_seconds: tuple[float, float]) -> dict:
    """Arrivals at ``rate`` for ``args.warmup_seconds``, unmeasured, with their own seed: the batch shapes a server
    meets under load (and so the CUDA graphs it captures, the kernels it compiles) come before the measured runs.
    Returns what was sent and answered, and the graphs captured meanwhile."""
    before = graph_captures(url)
    raw = asyncio.run(run_rate(url, rate, args.warmup_seconds, body, args.seed - 1, args.timeout, audio_seconds))
    answered = summarise(raw, args.slo)
    out = {"seconds": args.warmup_seconds, "rate": rate, "sent": answered["sent"], "ok": answered["ok"]}
    captured = captured_between(before, graph_captures(url))
    if captured is not None:
        out["graph_captures"] = captured
    return out


PROGRESS = re.compile(r"\d+%\|")  # a progress bar's line (tqdm: " 40%|####      | 4/10")


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
               TTA_REQUEST_TIMEOUT=str(args.timeout), PYTHONPATH=child_pythonpath())
    if args.threads:
        env["TTA_THREADS"] = str(args.threads)
    if args.runtime:
        env["TTA_RUNTIME"] = args.runtime
    return serve(env, port, f"server for policy {policy}", timeout=300, poll_s=0.25)


def serve(env: dict, port: int, what: str, timeout: float, poll_s: float) -> tuple[subprocess.Popen, str]:
    """``python -m service`` with ``env`` on ``port``, once ``/health/ready`` answers 200 (else RuntimeError naming
    ``what``, with the end of the server's log: a refused setting, a model that failed to load). The server's output
    goes to a log file, ``proc.log_path`` (``server_log_tail`` reads it)."""
    log = tempfile.NamedTemporaryFile(prefix="tta-server-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    proc.log_path = Path(log.name)
    url = f"http://127.0.0.1:{port}"
    problem = "was stopped"  # until wait_ready answers: a stop meanwhile (a time limit's SIGTERM) leaves no server
    try:
        problem = wait_ready(proc, url, timeout, poll_s)
    finally:
        if problem is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            said = server_log_tail(proc)
            proc.log_path.unlink(missing_ok=True)
    if problem is not None:
        raise RuntimeError(f"{what} {problem}; its log ends:\n{said}")
    return proc, url


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, poll_s: float) -> str | None:
    """None once ``url``'s /health/ready answers 200, else what went wrong: the process exited, its models failed
    to load (the server stays up, not ready, saying why), or ``timeout`` seconds passed."""
    from service.app import LOADING

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            answer = httpx.get(url + "/health/ready", timeout=2)
            if answer.status_code == 200:
                return None
            why = answer.json().get("error", {}).get("message")
            if answer.status_code == 503 and why and why != LOADING:
                return f"could not load its models ({why})"
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        time.sleep(poll_s)
    return f"did not become ready within {timeout:g} s"


def stop_server(proc: subprocess.Popen, what: str, wait_s: float = 15.0) -> None:
    """Stop a server ``serve`` started (SIGTERM, then SIGKILL after ``wait_s``), print the end of its log if it wrote
    anything (at the benchmarks' log level: warnings, such as a failed capture or a slow path) and remove the log."""
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    said = server_log_tail(proc)
    if said.strip():
        print(f"{what}, the end of its log:\n{said}", flush=True)
    proc.log_path.unlink(missing_ok=True)


def server_log_tail(proc: subprocess.Popen, lines: int = 30) -> str:
    """The last ``lines`` lines a server started by ``serve`` wrote (warnings and errors, at the benchmarks' log
    level), without blank lines and progress bars."""
    try:
        text = proc.log_path.read_text(errors="replace")
    except (AttributeError, OSError):
        return ""
    said = [line for line in text.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS.search(line)]
    return "\n".join(said[-lines:])


def served_runtime(url: str, model: str) -> str | None:
    """The runtime the server reports for ``model`` in GET /models (torch, onnxruntime, ...)."""
    try:
        for info in httpx.get(url + "/models", timeout=10).json():
            if info.get("name") == model:
                return info.get("runtime")
    except (httpx.HTTPError, ValueError, AttributeError, TypeError):
        return None
    return None


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit()}
    return info


def write_report(report: dict, out: Path, name: str, plot: bool = True) -> list[Path]:
    """``<name>.json``, ``<name>.md`` and (``plot``) ``<name>.png`` under ``out``; a report whose run ended early
    (``not_run`` / ``cut_off``) says so in the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    write_atomically(paths[0], json.dumps(report, indent=2) + "\n")
    cfg, env = report["config"], report["environment"]
    target = cfg.get("rss_target_mib")
    lines = [f"# Load benchmark: {name}", "",
             (f"Model `{cfg['model']}`, {cfg['audio_seconds']} s of audio, {cfg['steps'] or 'default'} steps, "
              f"Poisson arrivals for {cfg['seconds']} s per rate, latency objective {cfg['slo']} s, max_batch "
              f"{cfg['max_batch']}."), "",
             (f"Machine: {env['platform']}, {env['cpu_count']} CPUs, GPU {env['cuda']}; torch {env['torch']}, "
              f"Python {env['python']}; {env['date']}."), "", f"Command: `{env['command']}`", "",
             (f"Server memory: resident set of the server process; peak RSS per rate is the kernel's high-water "
              f"mark reset at the start of that rate (or the maximum of samples every {cfg.get('rss_interval_s')} s "
              f"where it cannot be reset); target under {target} MiB."), "",
             ("| policy | offered req/s | sent | ok | throughput req/s | goodput req/s | p50 s | p95 s | p99 s | "
              "peak RSS MiB | mean RSS MiB | statuses |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    for policy, rows in report["policies"].items():
        for r in rows:
            peak = r.get("rss_peak_mib")
            flag = " (over target)" if peak is not None and target and peak > target else ""
            lines.append(f"| {policy} | {r['offered_rps']:g} | {r['sent']} | {r['ok']} | {fmt(r['throughput_rps'])} | "
                         f"{fmt(r['goodput_rps'])} | {fmt(r['p50_s'])} | {fmt(r['p95_s'])} | {fmt(r['p99_s'])} | "
                         f"{fmt(peak, 0)}{flag} | {fmt(r.get('rss_mean_mib'), 0)} | {r['statuses']} |")
    captured = [(policy, r) for policy, rows in report["policies"].items() for r in rows if r.get("graph_captures")]
    if captured:
        lines += ["", "CUDA graphs the server captured during each rate (a capture costs a few forwards):", "",
                  "| policy | offered req/s | captures by kind |", "|---|---|---|"]
        lines += [f"| {policy} | {r['offered_rps']:g} | {captures_text(r['graph_captures'])} |"
                  for policy, r in captured]
    warmed = [(policy, server["warmup"]) for policy, server in report.get("servers", {}).items() if "warmup" in server]
    if warmed:
        lines += ["", "Before the measured runs each server had an unmeasured warm-up:", "",
                  "| policy | seconds | offered req/s | sent | ok | CUDA graphs captured |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {policy} | {w['seconds']:g} | {w['rate']:g} | {w['sent']} | {w['ok']} | "
                  f"{captures_text(w.get('graph_captures', {})) or '-'} |" for policy, w in warmed]
    repeats = cfg.get("repeats", 1)
    if repeats > 1:
        lines += ["", (f"Each figure above is the median of {repeats} runs (sent / ok: summed). Within a run every "
                       "policy gets the same arrivals, one policy after the other at each rate (the order rotates), "
                       "so drift of the shared machine falls on all of them; each run's own figures:"), "",
                  "| policy | offered req/s | goodput per run | p99 s per run |", "|---|---|---|---|"]
        for policy, rows in report["policies"].items():
            for r in rows:
                runs = r.get("runs", [r])
                lines.append(f"| {policy} | {r['offered_rps']:g} | {', '.join(fmt(x['goodput_rps'], 2) for x in runs)} "
                             f"| {', '.join(fmt(x['p99_s'], 2) for x in runs)} |")
        names = list(report["policies"])
        ref = names[0]
        lines += ["", (f"Paired with `{ref}` (same arrivals): in how many runs each policy had the higher goodput "
                       "and the lower p99."), "", "| policy | offered req/s | higher goodput | lower p99 |",
                  "|---|---|---|---|"]
        for policy in names[1:]:
            for mine, theirs in zip(report["policies"][policy], report["policies"][ref]):
                pairs = list(zip(mine.get("runs", [mine]), theirs.get("runs", [theirs])))
                good = sum(a["goodput_rps"] > b["goodput_rps"] for a, b in pairs)
                low = sum(a["p99_s"] is not None and (b["p99_s"] is None or a["p99_s"] < b["p99_s"]) for a, b in pairs)
                lines.append(f"| {policy} | {mine['offered_rps']:g} | {good}/{len(pairs)} | {low}/{len(pairs)} |")
    servers = report.get("servers", {})
    if servers:
        lines += ["", "| policy | runtime | RSS once ready MiB | peak RSS while loading MiB |", "|---|---|---|---|"]
        for policy, info in servers.items():
            lines.append(f"| {policy} | {info.get('runtime') or '-'} | {fmt(info.get('rss_ready_mib'), 0)} | "
                         f"{fmt(info.get('rss_loading_peak_mib'), 0)} |")
    note = incomplete_note(report.get("not_run", []), report.get("cut_off"))
    lines += ["", note] if note else []
    write_atomically(paths[1], "\n".join(lines) + "\n")
    if not plot:
        return paths
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    nan = float("nan")
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    for policy, rows in report["policies"].items():
        rates = [r["offered_rps"] for r in rows]
        ax1.plot(rates, [r["goodput_rps"] for r in rows], marker="o", label=policy)
        ax2.plot(rates, [r["p95_s"] if r["p95_s"] is not None else nan for r in rows], marker="o", label=policy)
        ax3.plot(rates, [r.get("rss_peak_mib") or nan for r in rows], marker="o", label=policy)
    ax1.set(xlabel="offered load (req/s)", ylabel=f"goodput (req/s within {cfg['slo']} s)", title="Goodput")
    ax2.set(xlabel="offered load (req/s)", ylabel="p95 latency (s)", title="p95 latency", yscale="log")
    ax2.axhline(cfg["slo"], color="grey", linestyle="--", linewidth=1)
    ax3.set(xlabel="offered load (req/s)", ylabel="peak RSS (MiB)", title="Server peak RSS")
    if target:
        ax3.axhline(target, color="grey", linestyle="--", linewidth=1)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(out / f"{name}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="measure this running server instead of starting one per policy")
    p.add_argument("--policies", default="continuous,adaptive,request,none")
    p.add_argument("--model-dir", default=str(ROOT / "models" / "zoo"))
    p.add_argument("--model", default="tta-arc")
    p.add_argument("--rates", default="0.5,1,2,4", help="offered loads in requests per second")
    p.add_argument("--seconds", type=float, default=60.0, help="arrival window per rate")
    p.add_argument("--audio-seconds", default="5", help="seconds of audio per request, or a range lo-hi (each "
                   "request uniform in it, the same requests for every policy)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--slo", type=float, default=2.0, help="latency objective for goodput, seconds")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--max-queue-delay-ms", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runtime", default=None, help="TTA_RUNTIME for the servers started here (default: the server's)")
    p.add_argument("--server-pid", type=int, default=None, help="with --url: the server process id, for its RSS")
    p.add_argument("--rss-interval", type=float, default=0.5, help="seconds between RSS samples")
    p.add_argument("--rss-target-mib", type=float, default=1536.0, help="memory target marked in the report")
    p.add_argument("--warmup-seconds", type=float, default=0.0, help="before any measured load, send each server "
                   "arrivals at the highest rate for this long, unmeasured (what it captures or caches meanwhile is "
                   "recorded under servers)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="run every rate this many times per policy, alternating "
                   "policies (medians reported, each run kept)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="output file stem (default load-<model>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # a terminated benchmark (its time limit) still stops the servers it started (the finally below), instead of
    # orphaning them, and writes the rates it measured
    stop_on_sigterm()

    rates = [float(r) for r in args.rates.split(",")]
    audio_seconds = parse_seconds(args.audio_seconds)
    body = {"model": args.model}
    if args.steps:
        body["steps"] = args.steps
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    report = {"config": {"model": args.model, "rates": rates, "seconds": args.seconds, "slo": args.slo,
                         "audio_seconds": args.audio_seconds, "steps": args.steps, "max_batch": args.max_batch,
                         "queue_size": args.queue_size, "max_queue_delay_ms": args.max_queue_delay_ms,
                         "runtime": args.runtime, "rss_interval_s": args.rss_interval,
                         "rss_target_mib": args.rss_target_mib, "repeats": args.repeats},
              "environment": environment(), "policies": {}, "servers": {}}
    names = ["external"] if args.url else policies
    servers: dict[str, tuple[subprocess.Popen | None, str, ProcessMemory | None]] = {}
    runs: dict[str, list[list[dict]]] = {name: [[] for _ in rates] for name in names}
    # the same arrivals for every policy within a repeat, new ones for each repeat; the policies' order rotates at
    # each rate so that none always runs first (or right after the heaviest)
    schedule = [(rep, i, rate, name) for rep in range(args.repeats) for i, rate in enumerate(rates)
                for name in names[(rep + i) % len(names):] + names[:(rep + i) % len(names)]]
    stem = args.name or f"load-{args.model}"

    def publish(pending: list[tuple], cut_off: tuple | None = None, plot: bool = False) -> list[Path]:
        def called(run: tuple) -> str:
            rep, _, rate, name = run
            return f"{name} at {rate:g} req/s" + (f" (run {rep + 1})" if args.repeats > 1 else "")

        report["policies"] = {name: [pool(rows) for rows in per_rate if rows]
                              for name, per_rate in runs.items() if per_rate[0]}
        report["complete"] = not pending and cut_off is None
        report["not_run"], report["cut_off"] = [called(r) for r in pending], cut_off and called(cut_off)
        return write_report(report, Path(args.out), stem, plot=plot)

    running = None  # the index in the schedule of the run under way
    try:
        for name in names:  # every policy's server up before any load, so that repeats can alternate between them
            proc, url, pid = None, args.url, args.server_pid
            if not url:
                proc, url = start_server(name, args)
                pid = proc.pid
            memory = ProcessMemory(pid) if pid else None
            if memory is not None and not memory.available:
                print(f"cannot read the memory of process {pid}; RSS is not recorded", file=sys.stderr)
                memory = None
            servers[name] = (proc, url, memory)
            report["servers"][name] = {"runtime": served_runtime(url, args.model), **server_memory(memory)}
            preflight(url, body, audio_seconds, args.timeout)
            if args.warmup_seconds > 0:
                report["servers"][name]["warmup"] = warm_up(url, max(rates), args, body, audio_seconds)
                print(f"{name:>10} warm-up: {report['servers'][name]['warmup']}", flush=True)
        for running, (rep, i, rate, name) in enumerate(schedule):
            _, url, memory = servers[name]
            row = run_one_rate(url, memory, rate, args, body, args.seed + i + 1000 * rep, audio_seconds)
            runs[name][i].append(row)
            print(f"{name:>10} {rate:6.2f} req/s (run {rep + 1}/{args.repeats}): ok {row['ok']}/{row['sent']}, "
                  f"throughput {row['throughput_rps']:.2f}, goodput {row['goodput_rps']:.2f}, p50 "
                  f"{row['p50_s']}, p99 {row['p99_s']}, peak RSS {row['rss_peak_mib']} MiB", flush=True)
            publish(schedule[running + 1:])  # what is measured so far, in case the run ends before the rest
        running = None
    except BaseException:  # stopped (SIGTERM at a time limit, ^C) or failed: write what was measured, then stop
        if running is not None and any(rows for per_rate in runs.values() for rows in per_rate):
            publish(schedule[running + 1:], cut_off=schedule[running], plot=True)
        raise
    finally:
        for name, (proc, _, _) in servers.items():
            if proc is not None:
                stop_server(proc, f"server for policy {name}")
    for path in publish([], plot=True):
        print("wrote", path)


if __name__ == "__main__":
    main()
