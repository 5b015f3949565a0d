"""Eager against compiled PyTorch (``TTA_TORCH_COMPILE``) for the denoiser forward, interleaved in ONE process.

On a small shared CPU the speed drifts by tens of percent over minutes, more than the effect measured here, so the
two runtimes are timed alternately on the same inputs (eager, compiled, eager, ...) and compared run by run as well
as by medians. Only the denoiser is compiled (the service's option): text encoding and decoding are the same code in
both. The compile time is what ``prepare`` (the service's warm-up) takes.

    PYTHONPATH=. python benchmarks/torch_compile.py --model models/zoo/tta-arc --batches 1,4,16
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def inputs(rt, batch: int, duration: float):
    import torch

    frames = rt.latent_frames(duration)
    g = torch.Generator().manual_seed(batch)
    cond = rt.encode_text([f"a {200 + i} Hz tone, then rain" for i in range(batch)], [duration] * batch)
    return (torch.randn(batch, rt.latent_dim, frames, generator=g), torch.rand(batch, generator=g), cond,
            torch.full((batch,), float(rt.config.default_guidance)), torch.ones(batch, frames, dtype=torch.bool))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "zoo" / "tta-arc"))
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=20, help="interleaved pairs per batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)

    import torch

    from benchmarks.common import environment, md_table, peak_rss_mb, write_results
    from models.export.parity import max_rel_error
    from service.runtimes import load_runtime

    torch.set_num_threads(args.threads)
    eager = load_runtime(Path(args.model), "torch")
    compiled = load_runtime(Path(args.model), "torch", compile=True)
    t0 = time.perf_counter()
    compiled.prepare()
    compile_s = time.perf_counter() - t0
    rows, results = [], {}
    with torch.inference_mode():
        for b in (int(x) for x in args.batches.split(",")):
            x = inputs(eager, b, args.duration)
            want, got = eager.predict_x0(*x), compiled.predict_x0(*x)  # also a warm-up of each
            e, c = [], []
            for _ in range(args.repeats):
                for fn, out in ((eager.predict_x0, e), (compiled.predict_x0, c)):
                    t = time.perf_counter()
                    fn(*x)
                    out.append(time.perf_counter() - t)
            me, mc = statistics.median(e), statistics.median(c)
            wins = sum(a > b for a, b in zip(e, c))
            results[str(b)] = {"eager_s": e, "compiled_s": c, "eager_median_s": me, "compiled_median_s": mc,
                               "speedup": me / mc, "compiled_faster_runs": wins,
                               "max_rel_error": max_rel_error(got, want)}
            rows.append([b, f"{1e3 * me:.1f}", f"{1e3 * mc:.1f}", f"{me / mc:.2f}x", f"{wins}/{len(e)}",
                         f"{results[str(b)]['max_rel_error']:.1e}"])
            print(rows[-1], flush=True)
    name = args.name or f"torch-compile-{Path(args.model).name}"
    md = "\n".join([
        f"# Eager against compiled PyTorch: `{Path(args.model).name}` denoiser forward (CPU)", "",
        (f"{args.duration:g} s of audio per sample, {args.threads} threads; the two runtimes timed alternately in one "
         f"process on the same inputs, {args.repeats} pairs per batch size. Compiling (`prepare`: batch 1 and 2) "
         f"took {compile_s:.1f} s; peak RSS of the process (both runtimes loaded) {peak_rss_mb():.0f} MB."), "",
        md_table(["batch", "eager median ms", "compiled median ms", "speed-up", "compiled faster in",
                  "max rel. difference"], rows)])
    data = {"model": Path(args.model).name, "compile_s": compile_s, "peak_rss_mb": peak_rss_mb(), "results": results,
            "environment": environment()}
    write_results(name, data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()
