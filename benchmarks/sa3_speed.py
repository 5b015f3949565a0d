"""Stable Audio 3 end to end on the CPU: this project's runtimes against diffusers' ``StableAudio3Pipeline`` on the same
checkpoint directory (``tta sized sa3-small``: Small's architecture with random weights, which diffusers loads too),
the same threads, steps and duration, side by side in one run.

For each runner (``diffusers``, ``torch``, ``onnxruntime``) and duration, in a process of its own (so the peak RSS
is that runner's at that duration, and no runner warms another's caches):
- end to end: one prompt to a waveform, fresh prompts each time (the project's prompt cache never hits). diffusers:
  ``pipe(prompt, duration=..., num_inference_steps=..., guidance_scale=1)``; ours: the engine's ``ModelRunner``
  (encode, one pipeline step per tick, decode), as the service runs a request;
- the profile, stage by stage: text encoding (uncached), the request's part of the denoiser (ours: the
  conditioning's cross-attention keys and values and the global embedding, once per request; diffusers recomputes
  them inside every step), one denoiser step, decoding;
- the peak RSS (VmHWM) and the load average when the timed part started and ended.

A shared machine drifts, so ``--rounds N`` alternates the runners' processes N times (diffusers, torch, onnxruntime,
diffusers, ...) and pools each runner's timings; the speed-up is diffusers' pooled median over the runner's.

    python -m benchmarks.sa3_speed --model runs/sa3-small-sized --durations 10,30 --steps 8 --threads 2 --rounds 2
    python -m benchmarks.sa3_speed --model runs/sa3-small-sized --smoke    # 1 s, 2 steps, one run: not for results
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ("diffusers", "torch", "onnxruntime")
STAGES = ("text_encoding", "request_part", "denoiser_step", "decode")
PROMPT = "warm arpeggios on house beats, rain on a tin roof, take {}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------------- the runners
def diffusers_calls(model: Path, duration: float, steps: int):
    """(end-to-end call(i), stage calls) for diffusers' pipeline."""
    import torch
    from diffusers import StableAudio3Pipeline

    pipe = StableAudio3Pipeline.from_pretrained(model, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def end_to_end(i: int, n_steps: int = steps):
        return pipe(PROMPT.format(i), duration=duration, num_inference_steps=n_steps, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(i), output_type="pt").audios

    embeds, mask = pipe.encode_prompt(PROMPT.format(-1), "cpu", 1)
    glob = pipe.encode_duration(duration, "cpu", 1, 1)
    context, context_mask = pipe.prepare_cross_attention(embeds, mask, glob)
    frames = -(-round(duration * pipe.vae.config.sampling_rate) // pipe.vae.downsampling_ratio)
    z = torch.randn(1, pipe.vae.config.latent_dim, frames, generator=torch.Generator().manual_seed(0))
    counter = iter(range(10**9))
    stages = {"text_encoding": lambda: pipe.encode_prompt(PROMPT.format(next(counter)), "cpu", 1),
              "request_part": None,  # inside every step
              "denoiser_step": lambda: pipe.transformer(z, torch.tensor([0.5]), encoder_hidden_states=context,
                                                        global_hidden_states=glob,
                                                        encoder_attention_mask=context_mask, return_dict=False),
              "decode": lambda: pipe.vae.decode(z).sample}
    return end_to_end, stages


def project_calls(model: Path, runtime: str, duration: float, steps: int):
    """(end-to-end call(i), stage calls) for one of this project's runtimes, through the engine's runner."""
    import torch

    from service.jobs import GenerationJob
    from service.runner import ModelRunner
    from service.runtimes import load_runtime

    rt = load_runtime(model, runtime)
    if rt.name != runtime:
        raise SystemExit(f"runtime {runtime} did not load (got {rt.name})")
    rt.prepare()
    runner = ModelRunner(rt)

    def end_to_end(i: int, n_steps: int = steps):
        job = GenerationJob(id=f"bench-{i}", model=rt.model_name, prompt=PROMPT.format(i), duration=duration,
                            steps=n_steps, guidance=1.0, seed=i, deadline=float("inf"), on_done=lambda r, e: None)
        samples = runner.encode([job], time.monotonic())
        while not all(s.finished for s in samples):
            runner.denoise_step(samples)
        out = runner.decode(samples)
        runner.release()
        return out

    pipeline = runner.pipeline
    encoder = rt.bundle.text_encoder.encoder if hasattr(rt, "bundle") else rt.text_encoder.encoder
    frames = rt.latent_frames(duration)
    z = torch.randn(1, rt.latent_dim, frames, generator=torch.Generator().manual_seed(0))
    cond = pipeline.conditioning([PROMPT.format(-1)], [duration])
    guidance, mask = torch.ones(1), torch.ones(1, frames, dtype=torch.bool)
    text = cond.text
    if hasattr(rt, "bundle"):
        denoiser = rt.bundle.denoiser

        def request_part():
            with torch.inference_mode():
                denoiser.request_state(text.tokens, text.mask, cond.seconds)
    else:
        def request_part():
            rt.request_split.context(text.tokens, text.mask, cond.seconds)

    counter = iter(range(10**9))
    stages = {"text_encoding": lambda: encoder.encode_unpadded([PROMPT.format(next(counter))]),
              "request_part": request_part,
              # the same conditioning tensors at every call: the request's part is kept, as in a request's steps
              "denoiser_step": lambda: pipeline.predict_x0(z, torch.full((1,), 0.5), cond, guidance, mask),
              "decode": lambda: pipeline.decode([z[0]], [duration])}
    return end_to_end, stages


def peak_rss_mb() -> float:
    from benchmarks.latency import _peak_rss_mb

    return _peak_rss_mb()


def worker(args) -> dict:
    import torch

    from benchmarks.common import timed

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.worker == "diffusers":
        end_to_end, stages = diffusers_calls(Path(args.model), args.duration, args.steps)
    else:
        end_to_end, stages = project_calls(Path(args.model), args.worker, args.duration, args.steps)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        end_to_end(10**6, 1)  # warm-up at this duration: every stage once, one step
        load_before = load_average()
        runs = iter(range(args.seed, 10**9))
        e2e = timed(lambda: end_to_end(next(runs)), args.repeats, warmup=0)
        profile = {name: None if fn is None else timed(fn, args.stage_repeats, warmup=0)
                   for name, fn in stages.items()}
        load_after = load_average()
    return {"runner": args.worker, "duration_s": args.duration, "steps": args.steps, "load_s": load_s,
            "end_to_end": e2e, "stages": profile, "peak_rss_mb": peak_rss_mb(),
            "load_average": {"start": load_before, "end": load_after}}


# ------------------------------------------------------------------------------------------------- the report
def pool(runs: list[dict]) -> dict:
    from benchmarks.common import time_summary

    out = {k: runs[0][k] for k in ("runner", "duration_s", "steps")}
    out["rounds"] = len(runs)
    out["end_to_end"] = time_summary([t for r in runs for t in r["end_to_end"]["times_s"]])
    out["stages"] = {s: None if runs[0]["stages"][s] is None else
                     time_summary([t for r in runs for t in r["stages"][s]["times_s"]]) for s in STAGES}
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["load_s"] = sorted(r["load_s"] for r in runs)[len(runs) // 2]
    out["load_average"] = [r["load_average"] for r in runs]
    return out


def markdown(results: list[dict], args, label: str, export_s: float | None) -> str:
    from benchmarks.common import md_table

    base = {r["duration_s"]: r["end_to_end"] for r in results if r["runner"] == "diffusers"}
    rows, profile = [], []
    for r in results:
        d, e2e = r["duration_s"], r["end_to_end"]
        ratio = {k: f"{base[d][k] / e2e[k]:.2f}x" if d in base else None for k in ("median_s", "min_s")}
        loads = "; ".join(f'{x["start"]} -> {x["end"]}' for x in r["load_average"])
        rows.append([r["runner"], f"{d:g}", e2e["median_s"], e2e["min_s"], e2e["repeats"], ratio["median_s"],
                     ratio["min_s"], round(r["peak_rss_mb"]), loads])
        st = r["stages"]
        med = {s: None if st[s] is None else st[s]["median_s"] for s in STAGES}
        steps_total = r["steps"] * med["denoiser_step"]
        parts = [med["text_encoding"], med["request_part"] or 0.0, steps_total, med["decode"]]
        profile.append([r["runner"], f"{d:g}", med["text_encoding"], med["request_part"], med["denoiser_step"],
                        steps_total, med["decode"], sum(parts), e2e["median_s"]])
    r0 = results[0]
    return (f"# Stable Audio 3 end to end on the CPU: `{label}`\n\n"
            f"One prompt, batch 1, {r0['steps']} steps (ping-pong), guidance 1, {args.threads} threads for every "
            f"runner; {args.rounds} round(s), the runners' processes alternated, timings pooled; each (runner, "
            "duration) in its own process, its peak RSS beside it. diffusers = `StableAudio3Pipeline` "
            "(float32, eager) on the same directory; torch / onnxruntime = this project's runtimes through the "
            "engine's runner. Speed-up = diffusers' median / the runner's, and the same of the fastest runs (on a shared "
            "machine whose load moves, the fastest run is the one least slowed by others).\n\n"
            + md_table(["runner", "duration s", "end to end median s", "min s", "runs", "speed-up vs diffusers",
                        "speed-up, fastest runs", "peak RSS MB", "load average (1, 5, 15 min) start -> end"], rows)
            + "\n\n**Where the time goes** (medians, seconds; request part = the conditioning's cross-attention keys "
              "and values and global embedding, once per request in this project's runtimes, inside every step in "
              "diffusers'; one step = one denoiser forward with the request's part kept):\n\n"
            + md_table(["runner", "duration s", "text encoding", "request part", "one step", "steps x step",
                        "decode", "sum", "end to end"], profile)
            + ("" if export_s is None else
               f"\n\nONNX export and its parity checks (once per model, not in load s): {export_s:.0f} s."))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "runs" / "sa3-small-sized"))
    ap.add_argument("--runners", default=",".join(RUNNERS))
    ap.add_argument("--durations", default="10,30")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="end-to-end runs per process")
    ap.add_argument("--stage-repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="1 s, 2 steps, one run of each: not for results")
    ap.add_argument("--name", default=None)
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--duration", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.durations, args.steps, args.repeats, args.stage_repeats, args.rounds = "1", 2, 1, 1, 1
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return {}

    from benchmarks.common import environment, write_results

    model = Path(args.model)
    runners = args.runners.split(",")
    durations = [float(d) for d in args.durations.split(",")]
    export_s = None
    if "onnxruntime" in runners:  # exported here, so that the worker's load time and RSS are serving's
        from models.export import ensure_onnx_export

        export_s = float(ensure_onnx_export(model).manifest["export_seconds"])  # when it was made
    runs: dict[tuple[str, float], list[dict]] = {(n, d): [] for d in durations for n in runners}
    failed = []
    start_load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for (name, d) in runs:
                out = Path(tmp) / f"{name}-{d}-{r}.json"
                cmd = [sys.executable, "-m", "benchmarks.sa3_speed", "--worker", name, "--worker-out", str(out),
                       "--model", str(model), "--duration", str(d), "--steps", str(args.steps), "--threads",
                       str(args.threads), "--repeats", str(args.repeats), "--stage-repeats", str(args.stage_repeats),
                       "--seed", str(args.seed + 100 * r)]
                print(f"round {r + 1}/{args.rounds}: {name}, {d:g} s (load average {load_average()})", flush=True)
                if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                    print(f"{name} at {d:g} s failed; its rows are left out", file=sys.stderr)
                    failed.append(f"{name} {d:g} s")
                    continue
                runs[(name, d)].append(json.loads(out.read_text()))
    results = [pool(v) for v in runs.values() if v]
    if not results:
        raise SystemExit("every runner failed")
    label = model.name
    md = markdown(results, args, label, export_s)
    if failed:
        md += f"\n\nFailed (left out): {', '.join(failed)}."
    env = environment()
    env["load_average"] = f"{start_load} at the start, {load_average()} at the end"
    try:
        import diffusers
        import onnxruntime
        import transformers

        env["versions"] = (f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
                           f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    data = {"model": label, "smoke": args.smoke, "onnx_export_s": export_s, "results": results, "failed": failed,
            "environment": env}
    name = args.name or ("sa3-speed-smoke" if args.smoke else f"sa3-speed-{label}")
    write_results(name, data, md, args.results_dir)
    print(md)
    return data


if __name__ == "__main__":
    main()
