"""Encode corpus clips to latents once, so that teacher training and distillation do not pay for synthesis and
encoding at every step. The cache is a directory of numbered shards (resumable) plus the clips' ground truth."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from models.training.common import progress


class LatentCache:
    def __init__(self, latents: list[torch.Tensor], params: list[dict], durations: list[float]):
        self.latents, self.params, self.durations = latents, params, durations

    def __len__(self) -> int:
        return len(self.latents)

    @classmethod
    def load(cls, directory: str | Path) -> "LatentCache":
        directory = Path(directory)
        latents, params, durations = [], [], []
        for shard in sorted(directory.glob("shard-*.pt")):
            data = torch.load(shard, map_location="cpu", weights_only=True)
            latents += [x.float() for x in data["latents"]]
            meta = json.loads(data["meta"])
            params += meta["params"]
            durations += meta["durations"]
        if not latents:
            raise FileNotFoundError(f"no latent shards in {directory}")
        return cls(latents, params, durations)


def _render_clips(split: str, seed: int, indices: list[int]) -> list[tuple[np.ndarray, dict, float]]:
    from models.data.corpus import SyntheticCorpus

    corpus = SyntheticCorpus(split, seed=seed)
    return [(clip.audio, clip.params, clip.duration) for clip in (corpus[i] for i in indices)]


@torch.no_grad()
def build_latent_cache(codec, directory: str | Path, n_clips: int, seed: int = 0, split: str = "train",
                       shard_size: int = 250, workers: int | None = None) -> Path:
    """Encode clips 0..n_clips-1 of the corpus into shards; existing shards are kept (resume). Rendering a clip
    costs more than encoding it, so ``workers`` processes render while this one encodes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    codec.eval()
    workers = workers or os.cpu_count() or 1
    n_shards = -(-n_clips // shard_size)
    bar = progress(n_clips, 0, f"encoding {split} clips")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for s in range(n_shards):
            path = directory / f"shard-{s:04d}.pt"
            lo, hi = s * shard_size, min(n_clips, (s + 1) * shard_size)
            if path.is_file():
                bar.update(hi - lo)
                continue
            chunks = [list(range(i, min(hi, i + 10))) for i in range(lo, hi, 10)]
            latents, params, durations = [], [], []
            for rendered in pool.map(_render_clips, [split] * len(chunks), [seed] * len(chunks), chunks):
                for audio, p, duration in rendered:
                    latents.append(codec.encode(torch.from_numpy(audio)[None])[0].half())
                    params.append(p)
                    durations.append(duration)
                    bar.update(1)
            meta = json.dumps({"params": params, "durations": durations, "split": split, "seed": seed})
            tmp = path.with_suffix(".tmp")
            torch.save({"latents": latents, "meta": meta}, tmp)
            tmp.rename(path)
    bar.close()
    return directory


def sample_batch(cache: LatentCache, rng: np.random.Generator, batch: int,
                 max_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int], list[float]]:
    """A padded batch of latents [B, C, T], frame mask [B, T], the chosen indices and the share of each clip
    used: a clip longer than ``max_frames`` (a model's longest window) is cut to a random window of that length
    (no random draw is made when no clip is cut)."""
    idx = [int(i) for i in rng.integers(0, len(cache), batch)]
    clips = [cache.latents[i] for i in idx]
    if max_frames is not None:
        clips = [x if x.shape[-1] <= max_frames else
                 x[:, (o := int(rng.integers(0, x.shape[-1] - max_frames + 1))): o + max_frames] for x in clips]
    frames = [x.shape[-1] for x in clips]
    share = [f / cache.latents[i].shape[-1] for f, i in zip(frames, idx)]
    length = max(frames)
    z = torch.zeros(batch, cache.latents[0].shape[0], length)
    for b, x in enumerate(clips):
        z[b, :, : frames[b]] = x
    mask = torch.arange(length)[None] < torch.tensor(frames)[:, None]
    return z, mask, idx, share
