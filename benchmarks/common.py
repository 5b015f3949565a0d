"""Shared plumbing for benchmark scripts: environment record, result files, timing helpers."""
from __future__ import annotations

import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child_pythonpath() -> str:
    """PYTHONPATH for a process this one starts (a server under test): the repository first, then whatever this
    process was given (a remote machine's own packages, e.g. the wheels benchmarks/gpu_suite.sh installs)."""
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


def git_commit() -> str | None:
    """The commit being measured: GIT_COMMIT where set (a copy of the tree whose .git is missing or stale, as on a
    remote GPU machine), else git's short HEAD; None when neither answers."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = {}
    if torch.cuda.is_available():
        gpu = {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    return {
        "machine": f"{cpu}, {os.cpu_count()} cores",
        **gpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return time_summary(times)


def time_summary(times: list[float]) -> dict:
    """Median, p95 and minimum of wall times, with the times themselves (so that runs can be pooled)."""
    times = sorted(times)
    return {"median_s": statistics.median(times), "p95_s": times[min(len(times) - 1, int(0.95 * len(times)))],
            "min_s": times[0], "repeats": len(times), "times_s": times}


def write_results(name: str, data: dict, markdown: str, results_dir: str | Path | None = None) -> Path:
    """``<name>.json`` and ``<name>.md`` (with the environment as a footer) under ``results_dir`` (default
    benchmarks/results)."""
    out = Path(results_dir) if results_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / f"{name}.json", json.dumps(data, indent=2, default=float) + "\n")
    env = data.get("environment", {})
    footer = "\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in env.items()) + "\n"
    write_atomically(out / f"{name}.md", markdown.rstrip() + "\n" + footer)
    return out / f"{name}.json"


def write_atomically(path: Path, text: str) -> None:
    """``path`` holds its old text or the new, never a part: a benchmark may be stopped while it writes, and results
    are rewritten as measurements finish (a reader, or a run cut off, sees whole files)."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    part.replace(path)


def stop_on_sigterm() -> None:
    """Turn SIGTERM (what ``timeout`` sends a benchmark at its limit) into ``SystemExit(143)``, so that ``finally`` and
    ``except`` blocks run: servers stop, and what was measured so far is written."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def incomplete_note(not_run: list[str], cut_off: str | None = None) -> str:
    """A results file's line for a run that ended early (its time limit, a stop): what never ran, and what was running
    (its rows end at its last finished measurement). Empty for a complete run."""
    if not not_run and cut_off is None:
        return ""
    parts = []
    if cut_off is not None:
        parts.append(f"`{cut_off}` was cut off (its rows end at its last finished measurement)")
    if not_run:
        parts.append(f"never ran: {', '.join(f'`{n}`' for n in not_run)}")
    return f"**Incomplete.** The run ended early; {'; '.join(parts)}."


def mean_ci(values, level: float = 0.95) -> dict:
    """Mean of repeated measurements with its two-sided confidence interval from the t-distribution:
    mean +- t_{(1 + level) / 2, n - 1} * s / sqrt(n) (s the sample standard deviation). Missing values (None, NaN)
    are left out; ``ci`` is the half-width, None with fewer than two values."""
    import math

    from scipy import stats

    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "ci": None, "n": 0, "std": None}
    mean = sum(vals) / n
    if n < 2:
        return {"mean": mean, "ci": None, "n": 1, "std": None}
    std = statistics.stdev(vals)
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "ci": half, "n": n, "std": std}


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
