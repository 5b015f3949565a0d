"""Training plumbing shared by every trainer: the step loop (progress bar, logs, checkpoints), resumable run state,
per-step random streams, EMA, learning-rate schedule, optimizer step with clipping."""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


class EMA:
    """Exponential moving average of a module's parameters (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm start: early averages follow the model
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def lr_at(step: int, total: int, base: float, warmup: int = 0, schedule: str = "cosine", final: float = 0.0) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return base + (final - base) * progress
    if schedule == "constant":
        return base
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * progress))


class RunState:
    """A resumable training run in ``run_dir``: ``state.pt`` (model, EMA, optimizer, step, RNG) written atomically
    every ``every`` steps and at the end, plus ``log.jsonl`` with one line per logged step."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "state.pt"
        self.log_path = self.dir / "log.jsonl"
        self.started = time.time()

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, step: int, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
             extra: dict | None = None) -> None:
        state = {
            "step": step,
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": json.dumps(np.random.get_state()[1].tolist()),
            "extra": json.dumps(extra or {}),
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> tuple[int, dict]:
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"]), json.loads(state["extra"])

    def log(self, record: dict) -> None:
        record = {"time_s": round(time.time() - self.started, 1), **record}
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def progress(total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=5.0)


def step_rngs(seed: int, stream: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Fresh numpy and torch generators for one training step: what a step draws depends only on (seed, stream,
    step), so a resumed run repeats exactly what the uninterrupted run would have done."""
    rng = np.random.default_rng([seed, stream, step])
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    return rng, gen


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group to ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   clip: float | None = 1.0) -> float:
    """Backward, gradient-norm clipping, update; returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
    optimizer.step()
    return float(gnorm)


def train_loop(run: RunState, desc: str, start: int, total: int, step_fn, checkpoint, log_every: int,
               checkpoint_every: int, stop_at: int | None = None, postfix: tuple[str, ...] = ("loss",)) -> int:
    """The loop every trainer shares: ``step_fn(step) -> metrics`` runs one step (``step`` = steps done before it),
    then the progress bar moves, ``run.log`` gets the metrics every ``log_every`` steps and ``checkpoint(step)``
    runs every ``checkpoint_every`` steps and at the end. ``stop_at`` ends this invocation early (after a
    checkpoint), for time-boxed jobs that resume later. Returns the steps done."""
    end = total if stop_at is None else min(total, stop_at)
    bar = progress(total, start, desc)
    step = start
    try:
        while step < end:
            metrics = step_fn(step)
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == total:
                bar.set_postfix({k: round(float(metrics[k]), 4) for k in postfix if k in metrics})
                run.log({"step": step, **{k: _round(v) for k, v in metrics.items()}})
            if step % checkpoint_every == 0 or step == end:
                checkpoint(step)
    finally:
        bar.close()
    return step


def _round(value):
    if isinstance(value, (float, int, torch.Tensor, np.floating)):
        value = float(value)
        return round(value, 6) if abs(value) >= 1e-3 else float(f"{value:.4g}")
    return value
