"""Reading a model directory's files, with errors that name the file and say what is wrong with it."""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a ``ValueError`` naming the file when it is missing, not JSON or not an
    object."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_weights(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors; a missing or damaged file is an error that names it."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for a truncated or corrupt file
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
