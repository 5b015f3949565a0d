"""Warm starts across a change of the latent layout: weights that read or write latent channels are matched by the
codec's channel names (``HarmonicAutoencoderConfig.channel_names``); a channel the old model did not have starts at
zero, so the warm-started model computes exactly what the old one did until training teaches it the new channel."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

# parameters that index latent channels, with the dimension that does
CODEC_CHANNEL_PARAMS = {"dec_in.weight": 1}
DIT_CHANNEL_PARAMS = {"proj_in.weight": 1, "proj_out.weight": 0, "proj_out.bias": 0}
# the DiT's first layers on the text encoder's token states and pooled embedding: channels a newer encoder appends
# (number channels) start with zero weights
DIT_TEXT_INPUTS = ("context_proj.0.weight", "pooled_proj.0.weight")
# modules a newer DiT may add that start from their own (zero) initialisation when the old model had none
DIT_ADDED_MODULES = ("rhythm.", "values.")


def remap_channels(old: Tensor, dim: int, old_names: list[str], new_names: list[str], fill: float = 0.0) -> Tensor:
    """``old`` indexed by ``old_names`` along ``dim`` -> indexed by ``new_names`` (new channels filled)."""
    shape = list(old.shape)
    shape[dim] = len(new_names)
    out = torch.full(shape, fill, dtype=old.dtype)
    for i, name in enumerate(new_names):
        if name in old_names:
            out.select(dim, i).copy_(old.select(dim, old_names.index(name)))
    return out


def load_remapped(model: nn.Module, state: dict[str, Tensor], channel_params: dict[str, int],
                  old_names: list[str], new_names: list[str], widened: tuple[str, ...] = (),
                  added: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` into ``model`` with the channel-indexed parameters remapped, the ``widened`` input weights
    given zero columns for inputs appended after the old ones and the parameters of ``added`` modules (prefixes)
    the old model lacks kept as initialised; returns the new channels."""
    state = dict(state)
    for key, dim in channel_params.items():
        if key in state:
            state[key] = remap_channels(state[key], dim, old_names, new_names)
    current = model.state_dict()
    for key in current:
        if key not in state and key.startswith(added):
            state[key] = current[key]
    for key in widened:
        old, want = state.get(key), current.get(key)
        if old is not None and want is not None and old.shape[1] < want.shape[1] and old.shape[0] == want.shape[0]:
            state[key] = torch.cat([old, old.new_zeros(old.shape[0], want.shape[1] - old.shape[1])], 1)
    model.load_state_dict(state)
    return [n for n in new_names if n not in old_names]


def codec_channel_names(codec_dir: str | Path) -> list[str]:
    """Channel names of a saved codec, whatever version of the config it was written with."""
    from models.codec.harmonic import HarmonicAutoencoderConfig

    raw = json.loads((Path(codec_dir) / "config.json").read_text())
    return HarmonicAutoencoderConfig.from_dict(raw.get("codec", raw)).channel_names()


def warm_start_codec(model, codec_dir: str | Path) -> list[str]:
    """Initialise a HarmonicAutoencoder from a saved one (an older latent layout is fine); the latent normalisation
    of the channels both share is kept. Returns the names of the new channels."""
    old_names = codec_channel_names(codec_dir)
    new_names = model.config.channel_names()
    raw = json.loads((Path(codec_dir) / "config.json").read_text())
    raw = raw.get("codec", raw)
    state = load_file(str(Path(codec_dir) / "codec.safetensors"))
    added = load_remapped(model, state, CODEC_CHANNEL_PARAMS, old_names, new_names)
    for key, fill in (("latent_shift", 0.0), ("latent_scale", 1.0)):
        if raw.get(key):
            values = remap_channels(torch.tensor(raw[key]), 0, old_names, new_names, fill)
            setattr(model.config, key, values.tolist())
            getattr(model, key).copy_(values.view(1, -1, 1))
    return added


def warm_start_dit(model, bundle_dir: str | Path, new_names: list[str]) -> list[str]:
    """Initialise a DiT from a saved bundle whose codec may have another latent layout (and whose text encoder may
    have fewer number channels: the new ones are appended, so the old columns keep their meaning; and which may
    lack the rhythm conditioner, which then starts at zero)."""
    bundle_dir = Path(bundle_dir)
    cfg = json.loads((bundle_dir / "config.json").read_text())
    old_names = codec_channel_names((bundle_dir / cfg["codec_from"]).resolve())
    state = load_file(str(bundle_dir / "denoiser.safetensors"))
    return load_remapped(model, state, DIT_CHANNEL_PARAMS, old_names, new_names, widened=DIT_TEXT_INPUTS,
                          added=DIT_ADDED_MODULES)
