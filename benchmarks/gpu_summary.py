"""One table and one plot from the GPU runs (``benchmarks/gpu_suite.sh`` -> ``latency-gpu-*.json`` and
``load-gpu-*.json`` under benchmarks/results), and a verdict on each target of the GPU fast path:

- the Stable-Audio-Open-Small-sized model, 11.9 s of stereo at 8 steps, batch 1: at most 20 ms end to end (the ARC
  paper: about 75 ms on an H100);
- the Stable-Audio-3-Small-sized model, 30 s at 8 steps, batch 1: at most 25 ms (Stable Audio 3 on TensorRT: about
  30 ms);
- a batch of 16 SAO-small-sized clips: at least 150 clips/s;
- under Poisson load (``benchmarks.load``), continuous batching's goodput at least 4x the batch-1 pipeline's (policy
  ``none``), at a p99 of at most 2x the batch-1 latency (``none``'s median at its lowest rate). Continuous batching's
  best goodput among the rates whose p99 meets that bound, over ``none``'s best goodput at any rate;
- and the quality the fast path keeps: the SAO-small-sized decoder in float16 (the ``-vae-fp16`` runtimes'), its
  worst clip's SNR against the float32 decoder at least 40 dB (``benchmarks.decoder_precision``).

Each latency target takes the best runtime's median. A run that is missing (a stage that failed or did not run) is
named as such, and its targets as not measured; a run cut off by its time limit is used for what it measured and
named with what it did not.

    python -m benchmarks.gpu_summary [--inputs latency-gpu-sao-small-sized,...] [--load load-gpu-sao-small-sized]
        [--decoder decoder-precision-gpu-sao-small-sized]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS, incomplete_note, md_table

DEFAULT_INPUTS = ("latency-gpu-sao-small-sized", "latency-gpu-sa3-small-sized-3s", "latency-gpu-sa3-small-sized-30s",
                  "latency-gpu-tta-arc", "latency-gpu-tta-bsa-25")
DEFAULT_LOAD = "load-gpu-sao-small-sized"
DEFAULT_DECODER = "decoder-precision-gpu-sao-small-sized"
DECODER_TYPE, DECODER_SNR_DB = "float16", 40.0
SAO, SA3_30S = "latency-gpu-sao-small-sized", "latency-gpu-sa3-small-sized-30s"
SAO_B1_MS, SA3_30S_B1_MS, SAO_B16_CLIPS_S, PAPER_MS = 20.0, 25.0, 150.0, 75.0
GOODPUT_RATIO, P99_RATIO = 4.0, 2.0


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
            ax.axvline(SAO_B1_MS, color="#cc3311", ls="--", label=f"target {SAO_B1_MS:g} ms (SAO-small-sized)")
            ax.axvline(PAPER_MS, color="#999933", ls=":", label=f"ARC paper, H100: {PAPER_MS:g} ms")
        else:
            ax.axvline(SAO_B16_CLIPS_S, color="#cc3311", ls="--",
                       label=f"target {SAO_B16_CLIPS_S:g} clips/s (SAO-small-sized)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def best(rows: list[list], run: str, batch: int, col: int, low: bool) -> list | None:
    """The row of ``run`` at ``batch`` with the lowest (``low``) or highest value in column ``col``."""
    hits = [r for r in rows if r[0] == run and r[3] == batch]
    return (min if low else max)(hits, key=lambda r: r[col]) if hits else None


def load_verdict(report: dict) -> dict:
    """The load target from a ``benchmarks.load`` report with policies ``continuous`` and ``none``: the batch-1
    latency (``none``'s median at its lowest rate), continuous batching's best goodput among the rates whose p99 is
    within ``P99_RATIO`` of it, ``none``'s best goodput, and their ratio (None where a side has no answer)."""
    runs = report.get("policies", {})
    alone = sorted(runs.get("none", []), key=lambda r: r["offered_rps"])
    batched = runs.get("continuous", [])
    if not alone or not batched or alone[0]["p50_s"] is None:
        return {"batch1_latency_s": None, "goodput_rps": None, "alone_goodput_rps": None, "ratio": None}
    bound = P99_RATIO * alone[0]["p50_s"]
    within = [r["goodput_rps"] for r in batched if r["p99_s"] is not None and r["p99_s"] <= bound]
    alone_best = max(r["goodput_rps"] for r in alone)
    goodput = max(within) if within else None
    ratio = goodput / alone_best if goodput is not None and alone_best > 0 else None
    return {"batch1_latency_s": alone[0]["p50_s"], "p99_bound_s": bound, "goodput_rps": goodput,
            "alone_goodput_rps": alone_best, "ratio": ratio}


def targets(rows: list[list], load: dict | None, decoder: dict | None = None) -> list[list]:
    """One row per target: what, the bound, the best measured, by which runtime, met or not (or not measured).
    ``load``: a ``benchmarks.load`` report; ``decoder``: a ``benchmarks.decoder_precision`` result."""
    def verdict(value, bound, low: bool) -> str:
        if value is None:
            return "not measured"
        return "met" if (value <= bound if low else value >= bound) else "not met"

    out = []
    for what, run, batch, col, bound, low in (
            ("SAO-small-sized, 11.9 s, 8 steps, batch 1: end to end ms", SAO, 1, 9, SAO_B1_MS, True),
            ("SA3-small-sized, 30 s, 8 steps, batch 1: end to end ms", SA3_30S, 1, 9, SA3_30S_B1_MS, True),
            ("SAO-small-sized, 11.9 s, batch 16: clips/s", SAO, 16, 10, SAO_B16_CLIPS_S, False)):
        row = best(rows, run, batch, col, low)
        value = row[col] if row else None
        out.append([what, f"{'<=' if low else '>='} {bound:g}", value, row[2] if row else "-",
                    verdict(value, bound, low)])
    lv = load_verdict(load) if load else {"ratio": None}
    what = (f"under load: continuous goodput / batch-1 goodput, p99 <= {P99_RATIO:g}x batch-1 latency"
            + (f" ({lv['p99_bound_s'] * 1e3:.0f} ms)" if lv.get("p99_bound_s") else ""))
    measured = load is not None and lv["batch1_latency_s"] is not None  # both policies have answers
    out.append([what, f">= {GOODPUT_RATIO:g}", lv["ratio"], "continuous vs none",
                verdict(lv["ratio"] or 0.0, GOODPUT_RATIO, False) if measured else "not measured"])
    snrs = [r["snr_db_min"] for r in (decoder or {}).get("rows", []) if r["variant"] == DECODER_TYPE]
    out.append([f"SAO-small-sized decoder in {DECODER_TYPE}: worst SNR against float32, dB", f">= {DECODER_SNR_DB:g}",
                min(snrs) if snrs else None, f"{DECODER_TYPE} decoder",
                verdict(min(snrs) if snrs else None, DECODER_SNR_DB, False)])
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", default=",".join(DEFAULT_INPUTS), help="latency runs (missing ones are named)")
    ap.add_argument("--load", default=DEFAULT_LOAD, help="the load run (benchmarks.load; empty: none)")
    ap.add_argument("--decoder", default=DEFAULT_DECODER, help="the decoder precision run "
                    "(benchmarks.decoder_precision; empty: none)")
    ap.add_argument("--name", default="gpu_summary")
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    out = Path(args.results_dir)
    envs, missing, incomplete = {}, [], {}

    def read(name: str) -> dict | None:
        """Run ``name``'s results (None: no name, or not found, then named as missing), its environment and
        whether it ended early noted."""
        path = out / f"{name}.json"
        if not name or not path.is_file():
            missing.extend([name] if name else [])
            return None
        data = json.loads(path.read_text())
        envs[name] = data["environment"]
        if data.get("complete") is False:
            incomplete[name] = data
        return data

    rows = [row for name in args.inputs.split(",") if (data := read(name)) for row in rows_of(name, data)]
    load, decoder = read(args.load), read(args.decoder)
    if not rows:
        raise SystemExit(f"no latency run found in {out} ({', '.join(missing)})")
    verdicts = targets(rows, load, decoder)
    headers = ["run", "model", "runtime", "batch", "steps", "seconds", "text ms", "denoiser forward ms", "decode ms",
               "end to end ms", "clips/s", "peak GPU MB", "peak RSS MB"]
    sources = "\n".join(f"- `{n}`: {e.get('gpu') or e.get('cuda')}, torch {e.get('torch')}, commit "
                        f"{e.get('git_commit')}, {e.get('date')}" for n, e in envs.items())
    md = ("# Latency on a GPU: summary\n\n"
          "Medians from the runs below (`benchmarks/gpu_suite.sh`; each run's own file has p95, the floor and "
          "the command). Random weights throughout: speed does not depend on them.\n\n## Targets\n\n"
          + md_table(["target", "bound", "best measured", "runtime", "verdict"], verdicts)
          + "\n\nEach latency target takes the best runtime's median; the load target is continuous batching's best "
          "goodput among the rates whose p99 is within the bound, over the batch-1 pipeline's best goodput "
          f"(policy `none`); the decoder target is the worst clip's SNR of the {DECODER_TYPE} decoder over the batch "
          f"sizes measured. For scale: the ARC paper reports about {PAPER_MS:g} ms on an H100 for the "
          "SAO-small-sized model.\n\n## Every run\n\n"
          + md_table(headers, rows) + f"\n\n![summary]({args.name}.png)\n\nRuns:\n{sources}\n"
          + (f"\nNot found (not run, or failed): {', '.join(f'`{m}`' for m in missing)}.\n" if missing else "")
          + "".join(f"\n`{n}`: {incomplete_note(d.get('not_run', []), d.get('cut_off'))}\n"
                    for n, d in incomplete.items()))
    (out / f"{args.name}.md").write_text(md)
    (out / f"{args.name}.json").write_text(json.dumps({"headers": headers, "rows": rows, "targets": verdicts,
                                                       "load": load_verdict(load) if load else None,
                                                       "missing": missing, "incomplete": sorted(incomplete),
                                                       "sources": envs}, indent=2) + "\n")
    plot(rows, out / f"{args.name}.png")
    print(md)
    return md


if __name__ == "__main__":
    main()
