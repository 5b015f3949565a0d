"""Encode corpus clips to latents once, so that teacher training and distillation do not pay for synthesis and
encoding at every step. The cache is a directory of numbered shards (resumable) plus the clips' ground truth."""
from __future__ import annotations

import json
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


@torch.no_grad()
def build_latent_cache(codec, directory: str | Path, n_clips: int, seed: int = 0, split: str = "train",
                       shard_size: int = 250) -> Path:
    from models.data.corpus import SyntheticCorpus

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = SyntheticCorpus(split, seed=seed)
    codec.eval()
    n_shards = -(-n_clips // shard_size)
    bar = progress(n_clips, 0, f"encoding {split} clips")
    for s in range(n_shards):
        path = directory / f"shard-{s:04d}.pt"
        lo, hi = s * shard_size, min(n_clips, (s + 1) * shard_size)
        if path.is_file():
            bar.update(hi - lo)
            continue
        latents, params, durations = [], [], []
        for i in range(lo, hi):
            clip = corpus[i]
            latents.append(codec.encode(torch.from_numpy(clip.audio)[None])[0].half())
            params.append(clip.params)
            durations.append(clip.duration)
            bar.update(1)
        meta = json.dumps({"params": params, "durations": durations, "split": split, "seed": seed})
        tmp = path.with_suffix(".tmp")
        torch.save({"latents": latents, "meta": meta}, tmp)
        tmp.rename(path)
    bar.close()
    return directory


def sample_batch(cache: LatentCache, rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A padded batch of latents [B, C, T], frame mask [B, T] and the chosen indices."""
    idx = [int(i) for i in rng.integers(0, len(cache), batch)]
    frames = [cache.latents[i].shape[-1] for i in idx]
    length = max(frames)
    z = torch.zeros(batch, cache.latents[0].shape[0], length)
    for b, i in enumerate(idx):
        z[b, :, : frames[b]] = cache.latents[i]
    mask = torch.arange(length)[None] < torch.tensor(frames)[:, None]
    return z, mask, idx
