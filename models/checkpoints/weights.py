"""Reading foreign weight files safely and fitting them to our modules strictly.

Weights are read only through safetensors or ``torch.load(weights_only=True)``: a pickle that holds anything but
tensors and plain containers is refused rather than executed. Fitting is strict: every key the module expects must be
present with the module's shape and no key may be left over, and a failure names the file and the offending keys,
because a silently half-loaded model generates plausible noise instead of failing.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint directory or weight file that cannot be loaded; the message names the file and the problem."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a weight file. ``.safetensors`` through safetensors; ``.ckpt``/``.bin``/``.pt``/``.pth`` through
    ``torch.load(weights_only=True)``, unwrapping a Lightning-style ``{"state_dict": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r}; expected one of {WEIGHT_SUFFIXES}")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: holds objects other than tensors, refused by torch.load(weights_only=True) "
                              f"({str(exc).splitlines()[0]})") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read by torch.load(weights_only=True) ({exc})") from exc
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors, found {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {_few(bad)}")
    return dict(data)


def tensor_shapes(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def fold_weight_norm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace weight-norm pairs by the plain weight they stand for, in either spelling torch has used:
    ``x.weight_g`` / ``x.weight_v`` (torch.nn.utils.weight_norm) and ``x.parametrizations.weight.original0`` /
    ``original1`` (torch.nn.utils.parametrizations.weight_norm). w = g * v / ||v||, the norm taken over every
    dimension but the one g keeps."""
    out: dict[str, Tensor] = {}
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        for g_suffix, v_suffix in ((".weight_g", ".weight_v"),
                                   (".parametrizations.weight.original0", ".parametrizations.weight.original1")):
            if key.endswith(g_suffix):
                pairs.setdefault(key[: -len(g_suffix)], {})["g"] = value
                break
            if key.endswith(v_suffix):
                pairs.setdefault(key[: -len(v_suffix)], {})["v"] = value
                break
        else:
            out[key] = value
    for stem, pair in pairs.items():
        if set(pair) != {"g", "v"}:
            raise CheckpointError(f"weight-norm parameters of {stem!r} are incomplete: only {sorted(pair)} present")
        g, v = pair["g"], pair["v"]
        dim = next((d for d in range(v.dim()) if g.dim() == v.dim() and g.shape[d] == v.shape[d] and g.shape[d] != 1),
                   0)
        out[stem + ".weight"] = torch._weight_norm(v, g, dim)
    return out


def check_fit(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], source: str,
              what: str, origin: Mapping[str, str] | None = None) -> None:
    """Raise a CheckpointError naming ``source`` unless ``found`` has exactly the keys and shapes of ``expected``.
    ``origin`` maps translated keys back to the file's own names, used for the keys the model has no place for."""
    origin = origin or {}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(origin.get(k, k) for k in set(found) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_few(missing)} (this loader's names)")
    if unexpected:
        parts.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        shown = ", ".join(f"{k}: file {tuple(found[k])} vs config {tuple(expected[k])}" for k in mismatched[:4])
        more = f" (+{len(mismatched) - 4} more)" if len(mismatched) > 4 else ""
        parts.append(f"shape mismatch {shown}{more}")
    raise CheckpointError(f"{source}: the {what} weights do not fit its config: " + "; ".join(parts))


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of everything ``module.load_state_dict`` expects (works on the meta device too)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_checked(module: nn.Module, state_dict: Mapping[str, Tensor], source: str, what: str) -> None:
    """Load ``state_dict`` into ``module`` strictly, after ``check_fit`` has named any missing, unexpected or
    mis-shaped weight."""
    check_fit(expected_shapes(module), tensor_shapes(state_dict), source, what)
    module.load_state_dict(state_dict, strict=True)


def _few(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"
