"""PyTorch operations per denoiser forward: what a GPU launches as kernels, counted on any machine.

At batch 1 a GPU forward of these DiTs is bound by how many kernels it launches, not by their arithmetic: even
replayed from a CUDA graph, each kernel costs a few microseconds. This counts the operations one eager
``predict_x0`` dispatches (torch's dispatcher, below autograd), by name, and splits them into those that write new
memory (each a kernel on a GPU) and views, which only describe existing memory (none). Matrix products, attention,
norms, elementwise arithmetic and concatenations are kernels; fusing the elementwise ones into their neighbours
(``TTA_COMPILE_BLOCKS``) is what cuts the count. Casts to the type a tensor already has are views here too.

    python -m benchmarks.op_count --model /tmp/sao-small-sized --duration 11.888     # tta sized sao-small
    python -m benchmarks.op_count --model models/zoo/tta-arc
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]


class OpCounter(TorchDispatchMode):
    """Counts every operation dispatched inside it, by name: ``kernels`` (an output in memory no input owns) and
    ``views`` (every output shares an input's memory)."""

    def __init__(self):
        super().__init__()
        self.kernels, self.views = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        owned = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        view = bool(made) and all(t.untyped_storage().data_ptr() in owned for t in made)
        (self.views if view else self.kernels)[str(func.overloadpacket).removeprefix("aten.")] += 1
        return out


def count_forward(model: Path, batch: int, duration: float) -> dict:
    """The operations of one ``predict_x0`` of ``batch`` rows of ``duration`` seconds (after one uncounted call, so
    that per-request results are kept as in serving), at the model's default guidance."""
    from service.runner import ModelRunner
    from service.runtimes import load_runtime

    rt = load_runtime(model, "torch")
    pipeline = ModelRunner(rt).pipeline
    duration = min(duration, rt.config.max_duration)
    frames = rt.latent_frames(duration)
    z = torch.randn(batch, rt.latent_dim, frames, generator=torch.Generator().manual_seed(0))
    t, guidance = torch.full((batch,), 0.5), torch.full((batch,), float(rt.config.default_guidance))
    cond = pipeline.conditioning(["rain on a tin roof"] * batch, [duration] * batch)
    mask = torch.ones(batch, frames, dtype=torch.bool)
    with torch.inference_mode():
        pipeline.predict_x0(z, t, cond, guidance, mask)
        with OpCounter() as counter:
            pipeline.predict_x0(z, t, cond, guidance, mask)
    return {"model": model.name, "batch": batch, "duration_s": duration, "latent_frames": frames,
            "guidance": rt.config.default_guidance, "kernels": sum(counter.kernels.values()),
            "views": sum(counter.views.values()), "kernels_by_op": dict(counter.kernels.most_common()),
            "views_by_op": dict(counter.views.most_common())}


def markdown(data: dict) -> str:
    from benchmarks.common import md_table

    rows = [[op, n] for op, n in data["kernels_by_op"].items()]
    return (f"# Operations per denoiser forward: `{data['model']}`\n\n"
            f"One eager `predict_x0`, batch {data['batch']}, {data['duration_s']:g} s ({data['latent_frames']} latent "
            f"frames), guidance {data['guidance']:g}: **{data['kernels']} kernels** (operations writing new memory: "
            f"each a kernel launch on a GPU) and {data['views']} views (no kernel).\n\n"
            + md_table(["operation", "kernels"], rows))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "zoo" / "tta-arc"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds (at most the model's maximum)")
    ap.add_argument("--name", default=None, help="results name (default op-count-<model>)")
    ap.add_argument("--results-dir", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    from benchmarks.common import environment, write_results

    args = parse_args(argv)
    data = count_forward(Path(args.model), args.batch, args.duration) | {"environment": environment()}
    md = markdown(data)
    write_results(args.name or f"op-count-{Path(args.model).name}", data, md, args.results_dir)
    print(md)
    return data


if __name__ == "__main__":
    main()
