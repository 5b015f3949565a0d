"""Latency per runtime, on the CPU or a CUDA GPU (``--device``): text encoding, one denoiser forward, decoding and end
to end, through the same runtime interface the service uses.

For each runtime (``torch`` = eager PyTorch, ``onnxruntime``) and batch size: median and p95 of
- text encoding of B distinct prompts (uncached: the prompt cache is bypassed),
- one denoiser call (``predict_x0``: with the model's default guidance, samples get their unconditional row in the
  same forward, so a guided batch of B runs 2B rows),
- decoding B clips of ``--duration`` seconds,
- end to end: B requests of ``--duration`` s at the model's default steps through the engine's ``ModelRunner``
  (encode, one denoise step per tick for all B, decode; with a ``-whole`` runtime, e.g. ``torch-bf16-whole``, the
  runner's whole-generation call: every step, the decode and the PCM in one CUDA graph; with a ``-ticks`` runtime,
  each tick's forward and sampler step as one CUDA graph), with fresh prompts each repetition;
plus the real-time factor (compute seconds per second of audio; below 1 is faster than real time), the peak RSS and,
on a GPU, the peak GPU memory (allocated by torch). GPU timings wait for the device to finish (a synchronise).
Each runtime runs in its own process, so the peak RSS is its own and no runtime warms another's caches. A shared
machine's speed drifts by tens of percent over minutes, so ``--rounds N`` alternates the runtimes' processes N times
(torch, onnxruntime, torch, ...) and pools each stage's timings over the rounds: both runtimes see the same drift.

    python -m benchmarks.latency [--model models/zoo/tta-teacher] [--batches 1,4] [--threads 2]
    python -m benchmarks.latency --smoke        # a quick check with tiny repetition counts and 2 steps
    python -m benchmarks.latency --device cuda --runtimes torch,torch-bf16,torch-bf16-cudagraphs --batches 1,4,16

``--random-weights`` benchmarks the model's architecture with random weights, its text encoder's too (speed does not
depend on the weights; the text encoder's tokenizer and config are all it reads of the installed one).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import stop_on_sigterm, write_atomically

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("torch", "onnxruntime")
# variants of the torch runtime that --runtimes may also name: the runtime and its options
VARIANTS = {"torch-compile": ("torch", {"compile": True}), "torch-bf16": ("torch", {"precision": "bfloat16"}),
            "torch-compile-bf16": ("torch", {"compile": True, "precision": "bfloat16"}),
            "torch-cudagraphs": ("torch", {"cuda_graphs": True}),
            "torch-bf16-cudagraphs": ("torch", {"precision": "bfloat16", "cuda_graphs": True}),
            # the decoder's weights in 16 bits as well (float16: Stable Audio's model_half; benchmarks.decoder_precision
            # measures what each costs in signal-to-noise ratio)
            "torch-bf16-vae-fp16": ("torch", {"precision": "bfloat16", "decode_precision": "float16"}),
            "torch-bf16-vae-bf16": ("torch", {"precision": "bfloat16", "decode_precision": "bfloat16"}),
            "torch-bf16-cudagraphs-vae-fp16": ("torch", {"precision": "bfloat16", "cuda_graphs": True,
                                                         "decode_precision": "float16"}),
            # each block of the denoiser compiled (regional torch.compile), alone or inside the CUDA graphs
            "torch-blocks": ("torch", {"compile_blocks": True}),
            "torch-bf16-cudagraphs-blocks": ("torch", {"precision": "bfloat16", "cuda_graphs": True,
                                                       "compile_blocks": True}),
            "torch-bf16-cudagraphs-blocks-vae-fp16": ("torch", {"precision": "bfloat16", "cuda_graphs": True,
                                                                "compile_blocks": True, "decode_precision": "float16"})}
# any torch variant + "-whole": end to end through whole-generation graphs (models.generation_graph: every step, the
# decode and the PCM copy in one CUDA graph per shape; the text encoder before it), e.g. torch-bf16-cudagraphs-whole;
# + "-ticks": end to end step by step, each tick's forward and sampler step one CUDA graph (models.tick_graph)
WHOLE, TICKS = "-whole", "-ticks"
RUNNER_SUFFIXES = {WHOLE: "whole_generation", TICKS: "tick_graphs"}


def runner_options(name: str) -> tuple[str, dict]:
    """A runtime name without its runner suffix, and the ``ModelRunner`` options that suffix asks for."""
    for suffix, option in RUNNER_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], {option: True}
    return name, {}
STAGES = ("text_encoding", "denoiser_forward", "decode", "end_to_end")


def _peak_rss_mb() -> float:
    """This process's peak RSS. ``ru_maxrss`` survives exec, so a worker started by a big parent would report the
    parent's peak; VmHWM belongs to the process image and starts afresh."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    from benchmarks.common import peak_rss_mb

    return peak_rss_mb()


def uncached_encoder(rt):
    """The encoder behind the runtime's prompt cache (``encode_unpadded``), so that every call does the work."""
    cached = rt.bundle.text_encoder if hasattr(rt, "bundle") else rt.text_encoder
    return cached.encoder


def stage_calls(rt, runner, encoder, b: int, duration: float, steps: int, prompts) -> dict:
    """Zero-argument callables for each stage (``STAGES``) at batch size ``b``: text encoding (``encoder``, the
    uncached one), one denoiser forward, one decode, and end to end (text, every step and the decode through the
    engine's ``ModelRunner``). ``prompts(n)``: n prompts for one call."""
    import torch

    from service.jobs import GenerationJob

    guidance = rt.config.default_guidance
    frames = rt.latent_frames(duration)
    g = torch.Generator().manual_seed(b)
    z = torch.randn(b, rt.latent_dim, frames, generator=g)
    t = torch.full((b,), 0.5)
    pipeline = runner.pipeline
    cond = pipeline.conditioning(prompts(b), [duration] * b)
    gvec = torch.full((b,), float(guidance))
    mask = torch.ones(b, frames, dtype=torch.bool)
    latents = [z[i] for i in range(b)]

    def end_to_end():
        jobs = [GenerationJob(id=f"bench-{i}", model=rt.model_name, prompt=p, duration=duration, steps=steps,
                              guidance=guidance, seed=i, deadline=float("inf"), on_done=lambda r, e: None)
                for i, p in enumerate(prompts(b))]
        if runner.whole is not None:
            return runner.generate_whole(jobs)
        samples = runner.encode(jobs, time.monotonic())
        while not all(s.finished for s in samples):
            runner.denoise_step(samples)
        runner.decode(samples)

    calls = {"text_encoding": lambda: encoder.encode_unpadded(prompts(b)),
             "denoiser_forward": lambda: pipeline.predict_x0(z, t, cond, gvec, mask),
             "decode": lambda: pipeline.decode(latents, [duration] * b), "end_to_end": end_to_end}
    return {stage: synchronised(fn) for stage, fn in calls.items()}


def synchronised(fn):
    """``fn`` followed by waiting for the GPU, when there is one (a call returns before its kernels finish)."""
    import torch

    if not torch.cuda.is_available():
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def e2e_warmups(runner) -> int:
    """Untimed end-to-end runs first: one, or as many as it takes the runner's graphs to capture the shape (whole
    generations and tick graphs capture a shape when it recurs), so that no timed run pays for a capture."""
    graphs = [g for g in (runner.whole, runner.ticks) if g is not None]
    return max([1] + [g.capture_after for g in graphs])


def measure_batch(rt, runner, encoder, b: int, args, steps: int, prompts) -> dict:
    """Every stage at batch size ``b``."""
    from benchmarks.common import timed

    calls = stage_calls(rt, runner, encoder, b, args.duration, steps, prompts)
    row = {stage: timed(calls[stage], args.repeats) for stage in ("text_encoding", "denoiser_forward", "decode")}
    row["end_to_end"] = timed(calls["end_to_end"], args.e2e_repeats, warmup=e2e_warmups(runner))
    row["rtf"] = row["end_to_end"]["median_s"] / (b * args.duration)
    if args.worker == args.floor_runtime:  # the work itself, for the floor (the other runtimes run the same maths)
        row["flops"] = {stage: count_flops(calls[stage]) for stage in ("text_encoding", "denoiser_forward", "decode")}
        row["flops"]["end_to_end"] = (row["flops"]["text_encoding"] + steps * row["flops"]["denoiser_forward"]
                                      + row["flops"]["decode"])
    return row


def count_flops(fn) -> int:
    """Matrix-product and convolution FLOPs of one call (torch's FlopCounterMode; elementwise work and FFTs are not
    counted, so the floor below is a lower bound)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_matmul_flops(threads: int, device: str = "cpu", repeats: int = 10) -> float:
    """This machine's matrix-product throughput (FLOP/s), the practical peak the floor is computed against: the best
    of ``repeats`` n x n products, float32 with ``threads`` threads on the CPU (n = 2048), bfloat16 on a GPU
    (n = 8192; the type the GPU serves in)."""
    import torch

    torch.set_num_threads(threads)
    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    mm = synchronised(lambda: torch.mm(a, b))
    best = float("inf")
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        mm()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_copy_bytes_per_s(device: str = "cpu", repeats: int = 10) -> float:
    """This machine's memory bandwidth (bytes read + written per second), the practical peak the weights floor is
    computed against: the best of ``repeats`` copies of 256 MiB (64 MiB on the CPU)."""
    import torch

    n = (256 if device != "cpu" else 64) * 2**20 // 4
    a, b = torch.empty(n, device=device), torch.randn(n, device=device)
    copy = synchronised(lambda: a.copy_(b))
    best = float("inf")
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - t0)
    return 2 * 4 * n / best


def weight_params(rt) -> dict[str, int]:
    """Parameters each stage's network reads once per call: the text encoder's transformer, the denoiser, the
    codec's decoder (the whole codec where it has no separate one)."""
    bundle = rt.bundle
    encoder = getattr(bundle.text_encoder, "encoder", bundle.text_encoder)
    networks = {"text_encoding": getattr(encoder, "model", None), "denoiser_forward": bundle.denoiser,
                "decode": getattr(bundle.codec, "decoder", bundle.codec)}
    return {stage: sum(p.numel() for p in net.parameters()) if net is not None else 0
            for stage, net in networks.items()}


def worker(args, save=None) -> dict:
    """One runtime in this process: load (exporting first if needed), then time every stage. ``save(out)`` gets the
    result so far after each batch size (``complete`` false until the last), so a run cut off keeps those."""
    import torch

    from service.runner import ModelRunner
    from service.runtimes import load_runtime

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base, runner_flags = runner_options(args.worker)
    runtime, options = VARIANTS.get(base, (base, {}))
    rt = load_runtime(Path(args.model), runtime, device=args.device, **options)
    rt.prepare()  # what the service does before it is ready (torch.compile compiles here)
    load_s = time.perf_counter() - t0
    if rt.name != runtime:
        raise SystemExit(f"runtime {runtime} did not load (got {rt.name}); see the log above")
    steps = args.steps or rt.config.default_steps
    counter = iter(range(10**9))

    def prompts(n):
        return [f"a {200 + next(counter)} Hz tone, then rain on a tin roof" for _ in range(n)]

    out = {"runtime": args.worker, "load_s": load_s, "steps": steps, "guidance": rt.config.default_guidance,
           "duration_s": args.duration, "latent_frames": rt.latent_frames(args.duration), "batches": {},
           "complete": False}
    if args.device == "cuda":
        out["gpu_name"] = torch.cuda.get_device_name(0)
    runner, encoder = ModelRunner(rt, **runner_flags), uncached_encoder(rt)
    for b in args.batches:
        out["batches"][str(b)] = measure_batch(rt, runner, encoder, b, args, steps, prompts)
        out["peak_rss_mb"] = _peak_rss_mb()
        if args.device == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if save is not None:
            save(out)
    out["complete"] = True
    if args.worker == args.floor_runtime:
        out["peak_matmul_flops"] = peak_matmul_flops(args.threads, args.device)
        out["peak_copy_bytes_per_s"] = peak_copy_bytes_per_s(args.device)
        out["weight_params"] = weight_params(rt)
    return out


def pool_rounds(runs: list[dict]) -> dict:
    """One runtime's worker results from several rounds -> one result: each stage's timings pooled, the real-time
    factor from the pooled end-to-end median, the peak RSS the highest, the load time the median."""
    from benchmarks.common import time_summary

    peaks = ("peak_matmul_flops", "peak_copy_bytes_per_s")
    out = {k: v for k, v in runs[0].items()
           if k not in ("batches", "peak_rss_mb", "peak_gpu_mb", "load_s", "complete") + peaks}
    for peak in peaks:
        if peak in runs[0]:
            out[peak] = max(r[peak] for r in runs)
    out["rounds"] = len(runs)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    if "peak_gpu_mb" in runs[0]:
        out["peak_gpu_mb"] = max(r["peak_gpu_mb"] for r in runs)
    out["load_s"] = sorted(r["load_s"] for r in runs)[len(runs) // 2]
    out["complete"] = all(r.get("complete", True) for r in runs)
    out["batches"] = {}
    for b in dict.fromkeys(b for r in runs for b in r["batches"]):  # a round cut off may lack the last batch sizes
        measured = [r["batches"][b] for r in runs if b in r["batches"]]
        row = measured[0]
        pooled = {stage: time_summary([t for m in measured for t in m[stage]["times_s"]]) for stage in STAGES}
        pooled["rtf"] = pooled["end_to_end"]["median_s"] / (int(b) * out["duration_s"])
        if "flops" in row:
            pooled["flops"] = row["flops"]
        out["batches"][b] = pooled
    return out


def markdown(results: list[dict], args, model_label: str, export_s: float | None) -> str:
    from benchmarks.common import md_table

    rows = []
    by = {(r["runtime"], b): row for r in results for b, row in r["batches"].items()}
    for r in results:
        for b, row in r["batches"].items():
            base = by.get(("torch", b))
            for stage in STAGES:
                speedup = (base[stage]["median_s"] / row[stage]["median_s"]) if base and r["runtime"] != "torch" \
                    else None
                rows.append([r["runtime"], int(b), stage.replace("_", " "), row[stage]["median_s"] * 1000,
                             row[stage]["p95_s"] * 1000, row[stage]["repeats"], speedup])
    gpu = "peak_gpu_mb" in results[0]
    r0 = results[0]
    summary = [[r["runtime"], int(b), row["rtf"], int(b) / row["end_to_end"]["median_s"], r["peak_rss_mb"]]
               + ([r["peak_gpu_mb"]] if gpu else []) + [r["load_s"]]
               for r in results for b, row in r["batches"].items()]
    where = f"GPU: {args.gpu_name}" if gpu else "CPU"
    return (f"# Latency per runtime ({where}): `{model_label}`\n\n"
            f"{r0['duration_s']:g} s of stereo per sample ({r0['latent_frames']} latent frames), "
            f"{r0['steps']} steps at guidance {r0['guidance']:g} end to end; {args.threads} CPU threads; "
            f"{args.rounds} round(s) per runtime, alternated, timings pooled. "
            "Denoiser forward = one `predict_x0` (guided samples add their unconditional row to the same batch). "
            "Text encoding bypasses the prompt cache. Speed-up = eager torch (float32) median / this runtime's "
            "median.\n\n"
            + md_table(["runtime", "batch", "stage", "median ms", "p95 ms", "runs", "speed-up vs torch"], rows)
            + "\n\n" + md_table(["runtime", "batch", "real-time factor (end to end)", "clips/s (end to end)",
                                 "peak RSS MB"] + (["peak GPU MB"] if gpu else []) + ["load s"], summary)
            + floor_section(results)
            + ("" if export_s is None else f"\n\nONNX export and its parity checks (once per model; not in load s): "
                                           f"{export_s:.1f} s."))


def floor_section(results: list[dict]) -> str:
    """Compute floor per stage, beside the best runtime's median (the gap is what software could still win): the
    larger of the counted FLOPs at this machine's measured matmul peak and the weights read once per network call
    at its measured copy bandwidth (2 bytes a weight on a GPU, which serves in 16 bits; 4 on the CPU). Elementwise
    work, FFTs and activations' traffic are in neither count."""
    from benchmarks.common import md_table

    counted = next((r for r in results if "peak_matmul_flops" in r), None)  # the --floor-runtime's run
    if counted is None:
        return ""
    peak, gpu = counted["peak_matmul_flops"], "peak_gpu_mb" in counted
    bandwidth, params = counted.get("peak_copy_bytes_per_s"), counted.get("weight_params")
    weight_bytes = 2 if gpu else 4
    rows = []
    for b, row in counted["batches"].items():
        for stage, flops in row.get("flops", {}).items():
            best = min(r["batches"][b][stage]["median_s"] for r in results if b in r["batches"])
            compute = flops / peak
            weights = None
            if bandwidth and params:
                counts = params if stage != "end_to_end" else {"end_to_end": params["text_encoding"] + params[
                    "decode"] + counted["steps"] * params["denoiser_forward"]}
                weights = counts[stage] * weight_bytes
            memory = weights / bandwidth if weights else 0.0
            floor = max(compute, memory)
            rows.append([int(b), stage.replace("_", " "), flops / 1e9, None if weights is None else weights / 2**20,
                         floor * 1000, "compute" if compute >= memory else "weights", best * 1000,
                         best / floor if floor else None])
    what = (f"bfloat16 matmul peak, {peak / 1e12:.0f} TFLOP/s (best 8192 x 8192 product)"
            if gpu else f"float32 matmul peak, {peak / 1e9:.0f} GFLOP/s (best 2048 x 2048 product, same threads)")
    if bandwidth:
        what += f", and its copy bandwidth, {bandwidth / 1e9:.0f} GB/s (best copy of {256 if gpu else 64} MiB)"
    return (f"\n\n**Floor.** The larger of two lower bounds per stage at this machine's measured {what}: the "
            f"matrix-product and convolution FLOPs (torch's FlopCounterMode, counted on the `{counted['runtime']}` "
            f"run), and the weights each network reads once per call ({weight_bytes} bytes each); end to end = "
            "text + steps x denoiser + decode. Elementwise work, "
            "FFTs and activations' memory traffic are in neither, so the floor is a lower bound.\n\n"
            + md_table(["batch", "stage", "GFLOP", "weights MiB", "floor ms", "bound by", "best measured ms",
                        "measured / floor"], rows))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: an unknown runtime name ends the run here, before any model loads."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "zoo" / "tta-teacher"))
    ap.add_argument("--runtimes", default=",".join(RUNTIMES),
                    help=f"comma-separated: {', '.join(RUNTIMES + tuple(VARIANTS))}")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=None, help="end-to-end steps (default: the model's)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--e2e-repeats", type=int, default=3)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--floor-runtime", default=None, help="the runtime whose run also counts the FLOPs and "
                    "measures the machine's peaks, for the floor (default torch; an eager one: graph replays are "
                    "not counted)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the runtimes' processes this many times and "
                                                           "pool the timings (a shared machine drifts)")
    ap.add_argument("--smoke", action="store_true", help="2 repeats, 1 end-to-end run of 2 steps; not for results")
    ap.add_argument("--name", default=None)
    ap.add_argument("--results-dir", default=None, help="where the JSON and Markdown go (default benchmarks/results)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = [name for name in args.runtimes.split(",") if runner_options(name)[0] not in {*RUNTIMES, *VARIANTS}]
    if unknown:
        ap.error(f"unknown runtime {', '.join(unknown)}; known: {', '.join(RUNTIMES + tuple(VARIANTS))}, each "
                 f"with {' or '.join(RUNNER_SUFFIXES)} appended or not")
    args.floor_runtime = args.floor_runtime or "torch"
    if runner_options(args.floor_runtime)[0] not in {*RUNTIMES, *VARIANTS}:
        ap.error(f"unknown --floor-runtime {args.floor_runtime}")
    if not args.worker and args.floor_runtime not in args.runtimes.split(","):
        print(f"--floor-runtime {args.floor_runtime} is not among --runtimes: no floor is measured", file=sys.stderr)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.smoke:
        args.repeats, args.e2e_repeats, args.steps, args.rounds = 2, 1, args.steps or 2, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        def save(out: dict) -> None:
            write_atomically(Path(args.worker_out), json.dumps(out))

        save(worker(args, save))
        return {}

    stop_on_sigterm()  # at a time limit, the runtimes measured so far are written (below) rather than lost
    model = Path(args.model)
    label = model.name + (" (random weights)" if args.random_weights else "")
    name = args.name or (f"latency-{args.device}-smoke" if args.smoke else f"latency-{args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_weights:
            from models.random_weights import random_model_copy

            model = random_model_copy(model, Path(tmp))
        export_s = None
        if "onnxruntime" in args.runtimes.split(","):  # export here, so the worker's RSS and load time are serving's
            from models.export import ensure_onnx_export

            t0 = time.perf_counter()
            ensure_onnx_export(model)
            export_s = time.perf_counter() - t0
        rounds: dict[str, list[dict]] = {runtime: [] for runtime in args.runtimes.split(",")}
        order = [(r, runtime) for r in range(args.rounds) for runtime in rounds]
        failed: list[str] = []
        for i, (r, runtime) in enumerate(order):
            out = Path(tmp) / f"{runtime}-{r}.json"
            cmd = [sys.executable, "-m", "benchmarks.latency", "--worker", runtime, "--worker-out", str(out),
                   "--model", str(model), "--batches", ",".join(map(str, args.batches)), "--threads",
                   str(args.threads), "--duration", str(args.duration), "--repeats", str(args.repeats),
                   "--e2e-repeats", str(args.e2e_repeats), "--device", args.device,
                   "--floor-runtime", args.floor_runtime]
            cmd += ["--steps", str(args.steps)] if args.steps else []
            try:
                code = subprocess.run(cmd, cwd=ROOT).returncode
            except BaseException:  # stopped (SIGTERM at a time limit, ^C): keep every finished batch, then stop
                kept, _ = worker_result(out, None)
                rounds[runtime] += [kept] if kept else []
                publish(name, args, rounds, failed, order[i + 1:], label, export_s, cut_off=(r, runtime))
                raise
            # one runtime's failure (its log is above) leaves the others' results, and its own finished batches
            kept, failure = worker_result(out, code)
            rounds[runtime] += [kept] if kept else []
            if failure:
                print(f"runtime {runtime} failed: {failure}", file=sys.stderr)
                failed.append(f"{runtime} ({failure})")
            if i + 1 < len(order):  # what is measured so far, in case the run ends before the rest
                publish(name, args, rounds, failed, order[i + 1:], label, export_s)
    data = publish(name, args, rounds, failed, [], label, export_s)
    if data is None:
        raise SystemExit("every runtime failed")
    print(data.pop("markdown"))
    return data


def worker_result(out: Path, code: int | None) -> tuple[dict | None, str | None]:
    """What a worker left in ``out`` after exiting with ``code`` (None: stopped before it exited): its result, whole
    or up to its last finished batch size (None if it finished none), and what went wrong (None if it exited 0)."""
    kept = json.loads(out.read_text()) if out.is_file() else None  # written whole or not at all (write_atomically)
    if kept is not None and not kept["batches"]:
        kept = None
    if code == 0:
        return kept, None
    how = "stopped" if code is None else f"exit {code}"
    return kept, how + (f"; its batches {', '.join(kept['batches'])} were measured and are kept" if kept else "")


def publish(name: str, args, rounds: dict[str, list[dict]], failed: list[str], pending: list[tuple[int, str]],
            label: str, export_s: float | None, cut_off: tuple[int, str] | None = None) -> dict | None:
    """Write the results of the runs so far (each runtime's rounds pooled); ``pending`` (round, runtime) pairs have
    not run, ``cut_off`` was running when the run stopped. Nothing is written while no runtime has a result."""
    from benchmarks.common import environment, incomplete_note, write_results

    results = [pool_rounds(runs) for runs in rounds.values() if runs]
    if not results:
        return None

    def called(r: int, runtime: str) -> str:
        return runtime if args.rounds == 1 else f"{runtime} (round {r + 1})"

    not_run = [called(*p) for p in pending]
    cut = None if cut_off is None else called(*cut_off)
    args.gpu_name = next((r["gpu_name"] for r in results if "gpu_name" in r), None)
    md = markdown(results, args, label, export_s)
    if failed:
        md += f"\n\nFailed (see the run's log): {', '.join(failed)}."
    note = incomplete_note(not_run, cut)
    md += f"\n\n{note}" if note else ""
    data = {"model": label, "smoke": args.smoke, "onnx_export_s": export_s, "results": results,
            "failed": failed, "complete": not note, "not_run": not_run, "cut_off": cut,
            "environment": environment()}
    write_results(name, data, md, args.results_dir)
    return data | {"markdown": md}


if __name__ == "__main__":
    main()
