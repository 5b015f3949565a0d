"""One table and one plot from the GPU latency runs (``benchmarks/gpu_suite.sh`` -> ``latency-gpu-*.json`` under
benchmarks/results): end to end per model, runtime and batch size, beside the ARC paper's figure and the targets the
runtimes issue set for the Stable-Audio-Open-Small-sized model (11.9 s of stereo at 8 steps in at most 50 ms at
batch 1, at least 40 clips/s at batch 16; the paper: about 75 ms on an H100).

    python -m benchmarks.gpu_summary [--inputs latency-gpu-sao-small-sized,...] [--name gpu_summary]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS, md_table

DEFAULT_INPUTS = ("latency-gpu-sao-small-sized", "latency-gpu-tta-arc", "latency-gpu-tta-bsa-25")
TARGET_MS, TARGET_CLIPS_S, PAPER_MS = 50.0, 40.0, 75.0


def rows_of(name: str, data: dict) -> list[list]:
    rows = []
    for r in data["results"]:
        for b, row in r["batches"].items():
            e2e = row["end_to_end"]["median_s"]
            rows.append([name, data["model"], r["runtime"], int(b), r["steps"], r["duration_s"],
                         row["text_encoding"]["median_s"] * 1e3, row["denoiser_forward"]["median_s"] * 1e3,
                         row["decode"]["median_s"] * 1e3, e2e * 1e3, int(b) / e2e, r.get("peak_gpu_mb"),
                         r["peak_rss_mb"]])
    return rows


def plot(rows: list[list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = sorted({(r[1], r[2]) for r in rows}, key=lambda k: (k[0], k[1]))
    for ax, batch, col, title in ((axes[0], 1, 9, "end to end at batch 1 (ms)"),
                                  (axes[1], 16, 10, "clips per second at batch 16")):
        values = []
        for model, runtime in labels:
            hits = [r[col] for r in rows if (r[1], r[2], r[3]) == (model, runtime, batch)]
            values.append(sum(hits) / len(hits) if hits else 0.0)  # the mean where a variant ran twice
        names = [f"{m.replace(' (random weights)', '')}\n{rt}" for m, rt in labels]
        ax.barh(range(len(labels)), values, color="#4477aa")
        ax.set_yticks(range(len(labels)), names, fontsize=7)
        ax.set_title(title)
        if batch == 1:
            ax.axvline(TARGET_MS, color="#cc3311", ls="--", label=f"target {TARGET_MS:g} ms (SAO-small-sized)")
            ax.axvline(PAPER_MS, color="#999933", ls=":", label=f"ARC paper, H100: {PAPER_MS:g} ms")
        else:
            ax.axvline(TARGET_CLIPS_S, color="#cc3311", ls="--", label=f"target {TARGET_CLIPS_S:g} clips/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", default=",".join(DEFAULT_INPUTS))
    ap.add_argument("--name", default="gpu_summary")
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    out = Path(args.results_dir)
    rows, envs = [], {}
    for name in args.inputs.split(","):
        data = json.loads((out / f"{name}.json").read_text())
        rows += rows_of(name, data)
        envs[name] = data["environment"]
    headers = ["run", "model", "runtime", "batch", "steps", "seconds", "text ms", "denoiser forward ms", "decode ms",
               "end to end ms", "clips/s", "peak GPU MB", "peak RSS MB"]
    sources = "\n".join(f"- `{n}`: {e.get('gpu')}, torch {e.get('torch')}, commit {e.get('git_commit')}, "
                        f"{e.get('date')}" for n, e in envs.items())
    md = ("# Latency on a GPU: summary\n\n"
          "Medians from the runs below (`benchmarks/gpu_suite.sh`; each run's own file has p95, the floor and "
          "the command). Random weights throughout: speed does not depend on them. Targets for the "
          f"SAO-small-sized model: at most {TARGET_MS:g} ms end to end at batch 1, at least {TARGET_CLIPS_S:g} "
          f"clips/s at batch 16 (the ARC paper: about {PAPER_MS:g} ms on an H100).\n\n"
          + md_table(headers, rows) + f"\n\n![summary]({args.name}.png)\n\nRuns:\n{sources}\n")
    (out / f"{args.name}.md").write_text(md)
    (out / f"{args.name}.json").write_text(json.dumps({"headers": headers, "rows": rows, "sources": envs},
                                                      indent=2) + "\n")
    plot(rows, out / f"{args.name}.png")
    print(md)
    return md


if __name__ == "__main__":
    main()
