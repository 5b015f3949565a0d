"""Scheduling policies in simulated time: the service's own policy classes under a measured cost model.

The load benchmark (`benchmarks/load.py`) measures the real server, but on a shared 2-core machine the same policy's
p99 on the same arrivals varies 2-3x between runs, as much as the policies differ. This replays the same Poisson
arrivals through the real ``ModelScheduler`` and policy objects of ``service.scheduler`` with a clock that advances
by what each stage costs on the device, exactly as the engine's tick runs them: admitted jobs are text-encoded
together, every running sample takes one step per tick in forwards of similar length (``length_groups``), samples
that took their last step are decoded one clip per codec call before the next tick, and a job that finds the
queue full is refused (429). Hundreds of repeats then separate what a policy does from the machine's drift.

Costs (``DeviceCost``): a forward over b samples padded to L latent frames takes overhead + per_frame * b * L; text
encoding overhead + per_prompt * n; decoding per_audio_second * duration per clip. The ``cpu`` preset is this
machine under ONNX Runtime, from `benchmarks/results/latency-cpu-tta-arc.md` (10 s clips, 216 frames: forward
23.5 ms at batch 1 and 72.7 ms at batch 4 -> 7.1 ms + 76 us per sample-frame; decode 66.6 ms per 10 s; prompt
encoding 6.6 ms alone, 19.8 ms for 4). What the model leaves out: HTTP and WAV encoding, the thread hand-offs, and
the machine's drift itself, so its latencies are lower than the server's; it compares policies, it does not
predict the server's figures.

    python -m benchmarks.policy_sim --rates 2,4,6,8 --audio-seconds 5 --repeats 200 --name policy-sim-5s
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import asdict, dataclass

import numpy as np

from benchmarks.common import environment, md_table, write_results
from benchmarks.load import arrival_times, parse_seconds, percentile, request_duration
from service.costmodel import ForwardCost
from service.engine import Engine
from service.jobs import GenerationJob, Sample
from service.scheduler import ModelScheduler, length_groups, make_policy

SAMPLE_RATE = 44100
SAMPLES_PER_LATENT = 2048  # the embedded codec: 21.5 latent frames per second


@dataclass
class DeviceCost:
    forward_overhead_s: float
    forward_per_frame_s: float  # per sample x padded latent frame
    encode_overhead_s: float
    encode_per_prompt_s: float
    decode_per_audio_s: float  # seconds of decoding per second of audio (one clip per codec call)

    def forward(self, batch: int, frames: int) -> float:
        return self.forward_overhead_s + self.forward_per_frame_s * batch * frames

    def encode(self, prompts: int) -> float:
        return self.encode_overhead_s + self.encode_per_prompt_s * prompts


PRESETS = {"cpu": DeviceCost(0.0071, 7.6e-5, 0.0022, 0.0044, 0.00666)}


def frames_of(duration: float) -> int:
    return math.ceil(duration * SAMPLE_RATE / SAMPLES_PER_LATENT)


def simulate(policy_name: str, cost: DeviceCost, arrivals: list[tuple[float, float]], steps: int, max_batch: int = 16,
             max_queue_delay_ms: float = 20.0, max_padding: float = 0.25, queue_size: int = 64) -> dict:
    """Run ``arrivals`` [(time, audio seconds)] through the policy; latencies of the served jobs and the refused
    count. The adaptive policy's cost model is calibrated as the engine does it, then learns from every forward."""
    learnt = ForwardCost()
    longest = max((d for _, d in arrivals), default=1.0)
    for batch, share in Engine.CALIBRATION:
        f = frames_of(max(0.5, share * longest))
        learnt.observe(batch * f, cost.forward(batch, f))
    policy = make_policy(policy_name, max_batch, max_queue_delay_ms, frames_of, max_padding, learnt)
    sched = ModelScheduler("sim", policy)
    now, i, refused, latencies = 0.0, 0, 0, []
    while i < len(arrivals) or sched.has_work():
        while i < len(arrivals) and arrivals[i][0] <= now:
            t, duration = arrivals[i]
            if sched.depth() >= queue_size:
                refused += 1
            else:
                sched.enqueue(GenerationJob(id=str(i), model="sim", prompt="", duration=duration, steps=steps,
                                            guidance=1.0, seed=i, deadline=math.inf,
                                            on_done=lambda result, error: None, arrival=t))
            i += 1
        admitted = sched.schedule(now).admitted
        if admitted:
            now += cost.encode(len(admitted))
            sched.start([Sample(job=j, frames=frames_of(j.duration), admitted=now) for j in admitted])
        if sched.running:
            frames = [s.frames for s in sched.running]
            for group in length_groups(frames, max_padding):
                longest_f = max(frames[k] for k in group)
                seconds = cost.forward(len(group), longest_f)
                learnt.observe(len(group) * longest_f, seconds)
                now += seconds
            for s in sched.running:
                s.job.steps_done += 1
            for s in sched.finish():
                now += cost.decode_per_audio_s * s.job.duration
                latencies.append(now - s.job.arrival)
        elif not admitted:
            wake = [arrivals[i][0]] if i < len(arrivals) else []
            if (w := sched.wakeup(now)) is not None:
                wake.append(w)
            if not wake:
                break
            now = max(now, min(wake)) + 1e-9  # past a wake-up time, as a real clock would be
    return {"latencies": latencies, "refused": refused, "end_s": now}


def run(policies: list[str], rates: list[float], cost: DeviceCost, seconds: float, repeats: int,
        audio_seconds: tuple[float, float], steps: int, slo: float, **policy_kw) -> list[dict]:
    rows = []
    for rate in rates:
        per_policy: dict[str, list[dict]] = {p: [] for p in policies}
        for r in range(repeats):
            seed = 1000 * r + int(rate * 10)
            arrivals = [(t, request_duration(audio_seconds, seed, k))
                        for k, t in enumerate(arrival_times(rate, seconds, seed))]
            for p in policies:
                out = simulate(p, cost, arrivals, steps, **policy_kw)
                lat = out["latencies"]
                wall = max(seconds, out["end_s"])
                per_policy[p].append({"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                                      "goodput": sum(x <= slo for x in lat) / wall, "refused": out["refused"]})
        first = policies[0]
        for p in policies:
            runs = per_policy[p]
            p99 = np.array([x["p99"] for x in runs if x["p99"] is not None])
            lo, hi = np.percentile(p99, [2.5, 97.5]) if len(p99) else (None, None)
            row = {"policy": p, "rate": rate, "runs": len(runs),
                   "p50_s": float(np.median([x["p50"] for x in runs if x["p50"] is not None])),
                   "p99_s": float(np.median(p99)), "p99_run_range_95": [float(lo), float(hi)],
                   "goodput_rps": float(np.median([x["goodput"] for x in runs])),
                   "refused": int(sum(x["refused"] for x in runs))}
            if p != first:  # paired on the same arrivals: how often this policy's p99 is lower than the first's
                pairs = [(a["p99"], b["p99"]) for a, b in zip(per_policy[first], runs)
                         if a["p99"] is not None and b["p99"] is not None]
                row[f"p99_lower_than_{first}"] = sum(b < a for a, b in pairs) / len(pairs) if pairs else None
                row[f"p99_ratio_to_{first}"] = float(np.median([b / a for a, b in pairs])) if pairs else None
            rows.append(row)
    return rows


def markdown(rows: list[dict], args, cost: DeviceCost, command: str) -> str:
    first = args.policies.split(",")[0]
    lines = [f"# Scheduling policies in simulated time: {args.name}", "",
             (f"{args.audio_seconds} s clips, {args.steps} steps, Poisson arrivals for {args.seconds} s per run, "
             f"{args.repeats} runs per rate (every policy on the same arrivals), latency objective {args.slo} s, "
             f"max_batch {args.max_batch}, queue {args.queue_size}, request-level delay {args.max_queue_delay_ms} ms, "
             f"max_padding {args.max_padding}. The service's own policy classes (`service.scheduler`) under the "
             f"cost model below, in simulated time (`benchmarks/policy_sim.py` says what it leaves out)."), "",
             "Cost model: " + ", ".join(f"{k} {v:.3g}" for k, v in asdict(cost).items()), "",
             f"Command: `{command}`", ""]
    headers = ["policy", "req/s", "p50 s", "p99 s (median run)", "p99 of 95 % of runs", "goodput req/s", "refused",
               f"p99 below {first}'s (share of runs)", f"p99 / {first}'s (median)"]
    table = []
    for r in rows:
        lo, hi = r["p99_run_range_95"]
        table.append([r["policy"], r["rate"], round(r["p50_s"], 3), round(r["p99_s"], 3), f"{lo:.3f}-{hi:.3f}",
                      round(r["goodput_rps"], 3), r["refused"],
                      "" if r["policy"] == first else round(r[f"p99_lower_than_{first}"], 2),
                      "" if r["policy"] == first else round(r[f"p99_ratio_to_{first}"], 3)])
    return "\n".join(lines) + md_table(headers, table)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="continuous,request,adaptive,none")
    ap.add_argument("--rates", default="2,4,6,8")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--audio-seconds", default="5", help='"5", or "1-10" for uniform durations')
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--slo", type=float, default=1.0)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--queue-size", type=int, default=64)
    ap.add_argument("--max-queue-delay-ms", type=float, default=20.0)
    ap.add_argument("--max-padding", type=float, default=0.25)
    ap.add_argument("--device", default="cpu", choices=sorted(PRESETS))
    for field in DeviceCost.__dataclass_fields__:
        ap.add_argument("--" + field.replace("_", "-"), type=float, default=None, help="override the preset")
    ap.add_argument("--name", default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    cost = DeviceCost(**{k: (getattr(args, k) if getattr(args, k) is not None else v)
                         for k, v in asdict(PRESETS[args.device]).items()})
    args.name = args.name or f"policy-sim-{args.audio_seconds}s"
    rows = run(args.policies.split(","), [float(r) for r in args.rates.split(",")], cost, args.seconds,
               args.repeats, parse_seconds(args.audio_seconds), args.steps, args.slo, max_batch=args.max_batch,
               max_queue_delay_ms=args.max_queue_delay_ms, max_padding=args.max_padding, queue_size=args.queue_size)
    command = "python -m benchmarks.policy_sim " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    md = markdown(rows, args, cost, command)
    print(md)
    if not args.no_write:
        write_results(args.name, {"config": {**vars(args), "cost": asdict(cost)}, "rows": rows,
                                  "environment": environment(), "command": command}, md)
    return rows


if __name__ == "__main__":
    main()
