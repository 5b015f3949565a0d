"""Runtimes against each other in ONE process, timed alternately on the same inputs.

On a small shared CPU the speed drifts by tens of percent over minutes, as much as the differences measured here, so
runs in separate processes (``benchmarks/latency.py --rounds``) need many rounds to agree. Here every runtime named
by ``--runtimes`` (``torch``, ``onnxruntime``, and the torch variants of ``benchmarks/latency.py``: ``torch-compile``,
``torch-bf16``, ...) is loaded side by side, and each stage is timed runtime after runtime within every repetition:
the denoiser forward (one ``predict_x0``), the decode, and end to end (text encoding, every step and the decode of a
batch through the engine's ``ModelRunner``). Medians, the speed-up against the first runtime, and in how many
repetitions each runtime beat it. Load time includes ``prepare`` (torch.compile compiles there).

    PYTHONPATH=. python benchmarks/interleaved.py --model models/zoo/tta-arc --runtimes torch,torch-compile,onnxruntime
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("denoiser_forward", "decode", "end_to_end")


def fixed_prompts(n: int) -> list[str]:
    """The same prompts for every runtime and call (the prompt cache serves all but the first encoding)."""
    return [f"a {200 + i} Hz tone, then rain on a tin roof" for i in range(n)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "zoo" / "tta-arc"))
    ap.add_argument("--runtimes", default="torch,torch-compile,onnxruntime", help="the first is the reference")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=12, help="repetitions of the denoiser and decode stages")
    ap.add_argument("--e2e-repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)

    import torch

    from benchmarks.common import environment, md_table, peak_rss_mb, write_results
    from benchmarks.latency import VARIANTS, stage_calls, uncached_encoder
    from models.export.parity import max_rel_error
    from service.runner import ModelRunner
    from service.runtimes import load_runtime

    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.runtimes.split(",") if n.strip()]
    runtimes, load_s = {}, {}
    for name in names:
        runtime, options = VARIANTS.get(name, (name, {}))
        t0 = time.perf_counter()
        rt = load_runtime(Path(args.model), runtime, **options)
        rt.prepare()
        load_s[name] = time.perf_counter() - t0
        if rt.name != runtime:
            raise SystemExit(f"runtime {runtime} did not load (got {rt.name})")
        runtimes[name] = rt
    ref = names[0]
    results: dict = {name: {} for name in names}
    rows = []
    with torch.inference_mode():
        for b in (int(x) for x in args.batches.split(",")):
            calls = {name: stage_calls(rt, ModelRunner(rt), uncached_encoder(rt), b, args.duration,
                                       rt.config.default_steps, fixed_prompts) for name, rt in runtimes.items()}
            outputs = {name: c["denoiser_forward"]() for name, c in calls.items()}  # and a warm-up of each
            for stage in STAGES:
                times = {name: [] for name in names}
                for _ in range(args.e2e_repeats if stage == "end_to_end" else args.repeats):
                    for name in names:
                        t = time.perf_counter()
                        calls[name][stage]()
                        times[name].append(time.perf_counter() - t)
                base = statistics.median(times[ref])
                for name in names:
                    med = statistics.median(times[name])
                    wins = sum(a < r for a, r in zip(times[name], times[ref]))
                    results[name].setdefault(str(b), {})[stage] = {"times_s": times[name], "median_s": med,
                                                                   "speedup": base / med, "faster_runs": wins}
                    rows.append([name, b, stage.replace("_", " "), f"{1e3 * med:.1f}",
                                 "-" if name == ref else f"{base / med:.2f}x",
                                 "-" if name == ref else f"{wins}/{len(times[name])}"])
                    print(rows[-1], flush=True)
            for name in names:
                results[name][str(b)]["denoiser_max_rel_error"] = max_rel_error(outputs[name], outputs[ref])
    rows.sort(key=lambda r: (names.index(r[0]), r[1]))
    label = Path(args.model).name
    md = "\n".join([
        f"# Runtimes interleaved in one process: `{label}` (CPU)", "",
        (f"{args.duration:g} s of audio per sample, {args.threads} threads, the model's default steps "
         f"({runtimes[ref].config.default_steps}) and guidance end to end. Each stage timed runtime after runtime "
         f"within every repetition ({args.repeats} repetitions, end to end {args.e2e_repeats}); speed-up = "
         f"`{ref}` median / this runtime's median; 'faster in' = repetitions where this runtime beat `{ref}`. "
         f"Peak RSS of the process with all of them loaded: {peak_rss_mb():.0f} MB."), "",
        md_table(["runtime", "batch", "stage", "median ms", f"speed-up vs {ref}", "faster in"], rows), "",
        md_table(["runtime", "load + prepare s", f"denoiser max rel. difference vs {ref} (batch 1)"],
                 [[n, f"{load_s[n]:.1f}", f"{results[n][args.batches.split(',')[0]]['denoiser_max_rel_error']:.1e}"]
                  for n in names])])
    data = {"model": label, "runtimes": names, "load_s": load_s, "peak_rss_mb": peak_rss_mb(), "results": results,
            "environment": environment()}
    write_results(args.name or f"interleaved-{label}", data, md, args.out)
    print(md)
    return data


if __name__ == "__main__":
    main()
