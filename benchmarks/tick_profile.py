"""Per-tick overhead of the serving engine: one request through the engine versus the same request run alone.

With one request in flight, step-level continuous batching should cost what ``Pipeline.generate_latents`` (the
sampling loop outside the engine) costs for that request: anything more is scheduling overhead paid on every tick. This script
builds a bundle of the shipped teacher's size with random weights (DiT width 192 / depth 6 / heads 4, the zoo
codec's architecture, the embedded MiniLM text encoder), so it measures the serving path whatever state the shipped
weights are in. For one request of ``--steps`` steps and ``--duration`` seconds it reports:

- whole requests, interleaved: ``generate_latents`` + ``decode`` (alone), the engine's tick function driven in this
  thread (inline), and ``Engine.generate_sync`` through the worker thread (threaded); CPU time of this thread is
  what the code costs on a shared machine (with one torch thread), wall time what a client sees;
- paired ticks (``--paired N``): an engine tick and one ``Pipeline.step`` outside the engine alternate N
  times, and the median of their CPU-time differences is the engine's overhead per tick, robust to background load;
- ``--batch-curve 1,2,4``: tick cost with k requests in flight; the 2-to-1 ratio says what sharing the forward costs
  each request (above 1.5, two overlapping requests finish later on average shared than one after the other);
- ``--overlap S``: two requests S seconds apart under the continuous and the request-level policy;
- ``--profile cprofile|torch``: a profile of ``--profile-ticks`` ticks driven in this thread.

    OMP_NUM_THREADS=1 python -m benchmarks.tick_profile --steps 25 --duration 5 --paired 150 --profile cprofile
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import environment, md_table, peak_rss_mb, write_results
from models.pipeline import DenoiseBatch

ROOT = Path(__file__).resolve().parents[1]
CODEC_DIR = ROOT / "models" / "zoo" / "tta-codec"
PROMPT = "rain on a tin roof"


def codec_config() -> dict:
    """The zoo codec's architecture (random weights), restricted to the fields the current codec class takes."""
    from dataclasses import fields

    from models.codec import HarmonicAutoencoderConfig

    known = {f.name for f in fields(HarmonicAutoencoderConfig)}
    try:
        stored = json.loads((CODEC_DIR / "config.json").read_text())["codec"]
    except (OSError, KeyError, ValueError):
        stored = {}
    return {k: v for k, v in stored.items() if k in known}


def build_bundle(seed: int = 0):
    """A teacher-sized bundle with random weights; zero-initialised layers get small random values so that the
    output depends on every input, as a trained model's does."""
    from models.bundle import ModelBundle
    from models.config import BundleConfig
    from models.codec import HarmonicAutoencoder
    from models.dit import DiT, DiTConfig
    from models.layers import fill_zero_parameters
    from service.runtimes.torch_runtime import shared_text_encoder

    torch.manual_seed(seed)
    dit = DiT(DiTConfig(width=192, depth=6, heads=4, text_dim=384, pooled_dim=384))
    fill_zero_parameters(dit, 0.02)
    codec = HarmonicAutoencoder.from_config(codec_config())
    cfg = BundleConfig(name="profile-teacher", default_steps=25, max_steps=500, default_duration=5.0,
                       max_duration=10.0)
    return ModelBundle(cfg, dit, codec, shared_text_encoder({"name": "minilm"}, "cpu"))


def make_engine(runtime, policy: str = "continuous"):
    from service.engine import Engine
    from service.metrics import Metrics

    return Engine({runtime.model_name: runtime}, Metrics(), policy=policy, max_batch=16, queue_size=64)


def make_job(runtime, steps: int, duration: float, guidance: float, seed: int, on_done=None):
    from service.jobs import GenerationJob

    return GenerationJob(id=f"profile-{seed}", model=runtime.model_name, prompt=PROMPT, duration=duration,
                         steps=steps, guidance=guidance, seed=seed, deadline=time.monotonic() + 3600,
                         on_done=on_done or (lambda result, error: None))


def drive_ticks(engine, runtime, steps: int, duration: float, guidance: float, ticks: int, seed: int = 0,
                clocks: list | None = None) -> int:
    """Run ``ticks`` engine ticks in the calling thread (the worker loop's own tick function, no worker thread), one
    request at a time, so that a profiler attached to this thread sees every tick; ``clocks`` collects a ``Clock``
    per tick. Returns the ticks run."""
    sched = engine.schedulers[runtime.model_name]
    done = 0
    while done < ticks:
        engine.submit(make_job(runtime, steps, duration, guidance, seed + done), force=True)
        while sched.has_work():
            before = engine.ticks
            with Clock() as clock:
                engine._tick(runtime.model_name, sched)
            if clocks is not None:
                clocks.append(clock)
            done += engine.ticks - before
    return done


class Clock:
    """Wall and this thread's CPU time: on a shared machine the CPU time of a single-threaded run is what the code
    costs, the wall time is what a client sees."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.thread_time() - self.cpu


def measure(runtime, args) -> dict:
    """Interleaved repeats of three paths for the same request, so that background load hits them alike:
    alone = ``generate_latents`` then ``decode``; inline = the engine's tick function in this thread (its CPU time
    compares with alone's when torch runs one thread); threaded = ``Engine.generate_sync`` through the worker.
    A middle tick (neither the first, which admits, nor the last, which decodes) is pure denoise step."""
    s, d, g = args.steps, args.duration, args.guidance
    inline_engine = make_engine(runtime, args.policy)
    pipeline = inline_engine.runners[runtime.model_name].pipeline
    threaded_engine = make_engine(runtime, args.policy)
    threaded_engine.start()
    rows: dict[str, list[dict]] = {"alone": [], "engine_inline": [], "engine_threaded": []}
    keys = ("id", "model", "prompt", "duration", "steps", "guidance", "seed")
    try:
        for r in range(args.repeats + 1):
            with Clock() as den:
                lat = pipeline.generate_latents([PROMPT], [d], [r], steps=s, guidance=g)
            with Clock() as dec:
                pipeline.decode(lat, [d])
            alone = {"step_wall": den.wall / s, "step_cpu": den.cpu / s, "denoise_wall": den.wall,
                     "denoise_cpu": den.cpu, "decode_wall": dec.wall, "decode_cpu": dec.cpu,
                     "total_wall": den.wall + dec.wall, "total_cpu": den.cpu + dec.cpu}
            clocks: list[Clock] = []
            drive_ticks(inline_engine, runtime, s, d, g, s, seed=r, clocks=clocks)
            middle = clocks[1:-1] or clocks
            inline = {"step_wall": statistics.median(c.wall for c in middle),
                      "step_cpu": statistics.median(c.cpu for c in middle),
                      "denoise_wall": sum(c.wall for c in middle) * s / len(middle),
                      "denoise_cpu": sum(c.cpu for c in middle) * s / len(middle),
                      "total_wall": sum(c.wall for c in clocks), "total_cpu": sum(c.cpu for c in clocks)}
            job = make_job(runtime, s, d, g, r)
            with Clock() as thr:
                result = threaded_engine.generate_sync({k: getattr(job, k) for k in keys})
            t = result.timings
            threaded = {"step_wall": t["denoise"] / s, "denoise_wall": t["denoise"], "decode_wall": t["decode"],
                        "queue_encode_wall": t["queue"] + t["encode"], "total_wall": thr.wall}
            if r:  # the first round warms up
                for name, row in zip(rows, (alone, inline, threaded)):
                    rows[name].append(row)
    finally:
        threaded_engine.stop()
    return {name: {k: {"min": min(x[k] for x in rs), "median": statistics.median(x[k] for x in rs)} for k in rs[0]}
            for name, rs in rows.items()}


def paired_overhead(runtime, args, n: int) -> dict:
    """Engine ticks and plain pipeline steps (``Pipeline.step`` outside the engine) for the same request, alternating one for one, so
    background load hits both alike: the median of the paired CPU-time differences is the engine's overhead per
    tick. Only pure denoise ticks count (not the first, which admits and encodes, nor the last, which decodes)."""
    s, d, g = args.steps, args.duration, args.guidance
    engine = make_engine(runtime, args.policy)
    pipeline = engine.runners[runtime.model_name].pipeline
    sched = engine.schedulers[runtime.model_name]
    seeds = iter(range(10**9))
    state: dict = {}

    def engine_tick() -> float | None:
        if not sched.has_work():
            engine.submit(make_job(runtime, s, d, g, next(seeds)), force=True)
        pure = bool(sched.running) and all(0 < x.job.steps_done < s - 1 for x in sched.running) and not sched.waiting
        with Clock() as clock:
            engine._tick(runtime.model_name, sched)
        return clock.cpu if pure else None

    def alone_step() -> float:  # one pipeline step of one sample, outside the engine
        if state.get("trajectory") is None or state["trajectory"].finished:
            state["trajectory"] = pipeline.start(pipeline.requests([PROMPT], [d], [next(seeds)], s, g))[0]
            state["batch"] = DenoiseBatch([state["trajectory"]])
        with Clock() as clock:
            pipeline.step(state["batch"])
        return clock.cpu

    for _ in range(3):
        engine_tick()
        alone_step()
    pairs = []
    while len(pairs) < n:
        tick, step = engine_tick(), alone_step()
        if tick is not None:
            pairs.append((tick, step))
    diffs = [a - b for a, b in pairs]
    return {"ticks": n, "engine_tick_cpu_s": statistics.median(a for a, _ in pairs),
            "alone_step_cpu_s": statistics.median(b for _, b in pairs), "overhead_cpu_s": statistics.median(diffs)}


def batch_curve(runtime, args, sizes: list[int]) -> list[dict]:
    """Tick cost with k requests in flight (all admitted together, same steps and duration, other seeds and
    prompts): the ratio of the k = 2 tick to the k = 1 tick is what sharing the forward costs each request. When it
    is above 1.5, two overlapping requests finish later on average under step-level sharing than one after the
    other; below 2, the later one still finishes sooner than it would after waiting."""
    prompts = [PROMPT, "a dog barks twice", "a church bell rings", "footsteps on gravel", "a car passes by",
               "birds singing at dawn", "a door creaks open", "thunder in the distance"]
    out = []
    for k in sizes:
        engine = make_engine(runtime, args.policy)
        sched = engine.schedulers[runtime.model_name]
        rounds = []
        for r in range(args.repeats + 1):
            for i in range(k):
                job = make_job(runtime, args.steps, args.duration, args.guidance, 1000 * r + i)
                job.prompt = prompts[i % len(prompts)]
                engine.submit(job, force=True)
            clocks = []
            while sched.has_work():
                with Clock() as clock:
                    engine._tick(runtime.model_name, sched)
                clocks.append(clock)
            if r:
                rounds.extend(clocks[1:-1])
        tick_cpu = statistics.median(c.cpu for c in rounds)
        tick_wall = statistics.median(c.wall for c in rounds)
        out.append({"requests": k, "tick_cpu_s": tick_cpu, "tick_wall_s": tick_wall,
                    "per_request_cpu_s": tick_cpu / k})
    base = out[0]["tick_cpu_s"] if out and out[0]["requests"] == 1 else None
    for row in out:
        row["ratio_to_one"] = row["tick_cpu_s"] / base if base else None
    return out


def overlap(runtime, args, offset: float) -> dict:
    """Two requests through worker-thread engines, the second submitted ``offset`` seconds after the first, under
    step-level sharing (continuous) and one-after-the-other (request-level, no queue delay): each request's latency
    from submission to result. Policies alternate per repeat so background load hits both alike."""
    from service.engine import Engine
    from service.metrics import Metrics

    engines = {policy: Engine({runtime.model_name: runtime}, Metrics(), policy=policy, max_batch=16, queue_size=64,
                              max_queue_delay_ms=0.0) for policy in ("continuous", "request")}
    for engine in engines.values():
        engine.start()
    lat: dict[str, list[tuple[float, float]]] = {policy: [] for policy in engines}
    try:
        for r in range(args.repeats + 1):
            for policy, engine in engines.items():
                done = {name: threading.Event() for name in "AB"}
                ends: dict[str, float] = {}
                starts: dict[str, float] = {}

                def submit(name: str, seed: int, engine=engine, done=done, ends=ends, starts=starts) -> None:
                    def on_done(result, error, name=name):
                        ends[name] = time.perf_counter()
                        done[name].set()

                    starts[name] = time.perf_counter()
                    engine.submit(make_job(runtime, args.steps, args.duration, args.guidance, seed, on_done))

                submit("A", 2 * r)
                time.sleep(offset)
                submit("B", 2 * r + 1)
                for event in done.values():
                    event.wait()
                if r:
                    lat[policy].append((ends["A"] - starts["A"], ends["B"] - starts["B"]))
    finally:
        for engine in engines.values():
            engine.stop()
    out = {}
    for policy, rows in lat.items():
        a, b = [x for x, _ in rows], [y for _, y in rows]
        out[policy] = {"first_s": statistics.median(a), "second_s": statistics.median(b),
                       "mean_s": statistics.median((x + y) / 2 for x, y in rows),
                       "max_s": statistics.median(max(x, y) for x, y in rows)}
    return out


def profile_cprofile(runtime, args) -> str:
    engine = make_engine(runtime, args.policy)
    drive_ticks(engine, runtime, args.steps, args.duration, args.guidance, 3)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    drive_ticks(engine, runtime, args.steps, args.duration, args.guidance, args.profile_ticks)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumtime").print_stats(r"service/|bundle\.py|dit\.py:\d+\(forward\)")
    return buf.getvalue()


def profile_torch(runtime, args) -> str:
    from torch.profiler import ProfilerActivity, profile

    engine = make_engine(runtime, args.policy)
    drive_ticks(engine, runtime, args.steps, args.duration, args.guidance, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        drive_ticks(engine, runtime, args.steps, args.duration, args.guidance, args.profile_ticks)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--policy", default="continuous")
    ap.add_argument("--profile", choices=["none", "cprofile", "torch"], default="none")
    ap.add_argument("--profile-ticks", type=int, default=50)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--paired", type=int, default=0, help="also pair this many engine ticks with loop iterations")
    ap.add_argument("--batch-curve", default="", help="also time ticks with k requests in flight, e.g. 1,2,4,8")
    ap.add_argument("--overlap", type=float, default=None,
                    help="also time two requests submitted this many seconds apart, continuous vs request-level")
    ap.add_argument("--name", default=None, help="also write benchmarks/results/<name>.json and .md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from service.runtimes.torch_runtime import TorchRuntime

    runtime = TorchRuntime(build_bundle())
    res = measure(runtime, args)
    a, i, t = res["alone"], res["engine_inline"], res["engine_threaded"]
    overhead_cpu = i["step_cpu"]["median"] - a["step_cpu"]["median"]
    overhead_wall = t["denoise_wall"]["median"] / args.steps - a["step_wall"]["median"]
    summary = {"steps": args.steps, "duration_s": args.duration, "guidance": args.guidance, "policy": args.policy,
               "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "results": res,
               "overhead_per_tick_cpu_s": overhead_cpu, "overhead_per_tick_wall_s": overhead_wall,
               "peak_rss_mb": peak_rss_mb(), "environment": environment()}

    def ms(x: dict, k: str, which: str = "median") -> float | None:
        return None if k not in x else x[k][which] * 1e3

    rows = [[name, ms(x, "step_cpu"), ms(x, "step_wall"), ms(x, "step_wall", "min"), ms(x, "denoise_wall"),
             ms(x, "total_cpu"), ms(x, "total_wall"), ms(x, "total_wall", "min")]
            for name, x in (("alone: generate_latents + decode", a), ("engine, tick function in this thread", i),
                            ("engine, worker thread (generate_sync)", t))]
    table = md_table(["path", "step CPU ms", "step wall ms", "step wall min", "denoise wall ms", "total CPU ms",
                      "total wall ms", "total wall min"], rows)
    text = (f"One request, {args.steps} steps, {args.duration:g} s of audio, guidance {args.guidance:g}, policy "
            f"{args.policy}, {torch.get_num_threads()} torch thread(s); medians (and minima) of {args.repeats} "
            f"interleaved runs after one warm-up.\n\n{table}\n\nEngine overhead per tick: "
            f"{overhead_cpu * 1e3:+.2f} ms CPU (tick function vs generate_latents per step), "
            f"{overhead_wall * 1e3:+.2f} ms wall (worker thread vs alone).\n")
    if args.paired:
        pair = paired_overhead(runtime, args, args.paired)
        summary["paired"] = pair
        text += (f"\nPaired ticks ({pair['ticks']}, engine tick and generate_latents loop iteration alternating): "
                 f"engine {pair['engine_tick_cpu_s'] * 1e3:.2f} ms CPU, alone {pair['alone_step_cpu_s'] * 1e3:.2f} "
                 f"ms CPU, median paired difference {pair['overhead_cpu_s'] * 1e3:+.3f} ms per tick.\n")
    if args.batch_curve:
        curve = batch_curve(runtime, args, [int(k) for k in args.batch_curve.split(",")])
        summary["batch_curve"] = curve
        text += ("\nTick cost with k requests in flight (middle ticks, medians):\n\n"
                 + md_table(["requests", "tick CPU ms", "tick wall ms", "CPU ms per request", "tick / 1-request tick"],
                            [[c["requests"], c["tick_cpu_s"] * 1e3, c["tick_wall_s"] * 1e3,
                              c["per_request_cpu_s"] * 1e3, c["ratio_to_one"]] for c in curve]) + "\n")
    if args.overlap is not None:
        pair = overlap(runtime, args, args.overlap)
        summary["overlap"] = {"offset_s": args.overlap, **pair}
        text += (f"\nTwo requests, the second {args.overlap:g} s after the first (medians of {args.repeats}):\n\n"
                 + md_table(["policy", "first s", "second s", "mean s", "max s"],
                            [[policy, x["first_s"], x["second_s"], x["mean_s"], x["max_s"]]
                             for policy, x in pair.items()]) + "\n")
    print(text, flush=True)
    if args.profile == "cprofile":
        print(profile_cprofile(runtime, args))
    elif args.profile == "torch":
        print(profile_torch(runtime, args))
    if args.name:
        write_results(args.name, summary, f"# Engine tick overhead\n\n{text}")
    return summary


if __name__ == "__main__":
    main()
