"""Reading a diffusers pipeline directory: ``model_index.json`` naming components, one folder each with a
``config.json`` and its weights (single file or sharded with an index)."""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from models.checkpoints.bundle import read_json
from models.checkpoints.weights import CheckpointError, read_state_dict

INDEX = "model_index.json"
WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def read_index(path: Path) -> dict:
    return read_json(path / INDEX)


def components(path: Path) -> dict[str, str]:
    """Component name -> class name, from model_index.json."""
    index = read_index(path)
    return {k: v[1] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
            and v[1] is not None}


def component_config(path: Path, name: str, file: str = "config.json") -> dict:
    folder = path / name
    if not folder.is_dir():
        raise CheckpointError(f"{path}: component folder {name}/ is missing (listed in {INDEX})")
    return read_json(folder / file)


def component_weights(path: Path, name: str) -> tuple[dict[str, Tensor], str]:
    """All tensors of one component and a description of where they came from (for error messages)."""
    folder = path / name
    for stem in WEIGHT_NAMES:
        for suffix in (".safetensors", ".bin"):
            index = folder / f"{stem}{suffix}.index.json"
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
                if not shards:
                    raise CheckpointError(f"{index}: empty weight_map")
                out: dict[str, Tensor] = {}
                for shard in shards:
                    out.update(read_state_dict(folder / shard))
                return out, str(index)
            single = folder / f"{stem}{suffix}"
            if single.is_file():
                return read_state_dict(single), str(single)
    raise CheckpointError(f"{folder}: no weights found (expected {WEIGHT_NAMES[0]}.safetensors or model.safetensors)")
