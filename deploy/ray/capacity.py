"""The autoscaling target from a measured batch capacity.

``python -m deploy.ray.capacity benchmarks/results/latency-cpu-tta-arc.json [--runtime onnxruntime]`` reads a result
of ``benchmarks/latency.py`` (end-to-end time of a batch of b clips, b = 1, 4, 16, ...) and prints, per runtime, the
throughput at each batch and the target: the smallest measured batch whose throughput (b / end-to-end time) is
within ``--within`` (10 %) of the best measured. Below it, another concurrent request still buys throughput
nearly for free; above it a replica only trades latency for the last few per cent (on the 2-core CPU, 16 clips at
once take 3.7x as long as 4 for 8 % more clips per second), so that is where Ray should add a replica instead
(``autoscaling_config.target_ongoing_requests``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def throughputs(result: dict) -> dict[int, float]:
    """Clips per second at each measured batch of one runtime's result."""
    return {int(b): int(b) / stages["end_to_end"]["median_s"] for b, stages in result["batches"].items()
            if stages.get("end_to_end", {}).get("median_s")}


def target_ongoing_requests(result: dict, within: float = 0.10) -> int:
    clips = throughputs(result)
    best = max(clips.values())
    return min(b for b, c in clips.items() if c >= (1 - within) * best)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="a benchmarks/results/latency-*.json")
    p.add_argument("--runtime", help="only this runtime's row")
    p.add_argument("--within", type=float, default=0.10, help="share of the best throughput to stay within")
    args = p.parse_args(argv)
    data = json.loads(args.result.read_text())
    for result in data["results"]:
        if args.runtime and result["runtime"] != args.runtime:
            continue
        clips = ", ".join(f"b={b}: {c:.1f} clips/s" for b, c in sorted(throughputs(result).items()))
        print(f"{data['model']} {result['runtime']}: {clips} -> target_ongoing_requests "
              f"{target_ongoing_requests(result, args.within)}")


if __name__ == "__main__":
    main()
