"""Where models are found and how a directory becomes a loaded model: the embedded zoo, project model directories
and downloaded checkpoints (``models.checkpoints``) all resolve here, for the service, the CLI and training alike."""
from __future__ import annotations

from pathlib import Path

from models.bundle import ModelBundle
from models.checkpoints import FORMATS, is_checkpoint_dir, load_checkpoint_dir
from models.config import BundleConfig
from models.text import load_text_encoder

ZOO = Path(__file__).parent / "zoo"


def is_bundle_dir(path: Path) -> bool:
    """A project model directory: a config.json beside denoiser weights (a codec-only directory is not one)."""
    return (path / "config.json").is_file() and (path / "denoiser.safetensors").is_file()


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or is_checkpoint_dir(path)


def available_models(model_dir: str | Path = ZOO) -> list[Path]:
    """Model directories under ``model_dir`` (project models and checkpoints in a format ``models.checkpoints``
    reads); ``model_dir`` may also be such a checkpoint itself."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    if is_checkpoint_dir(root):
        return [root]
    return sorted(p for p in root.iterdir() if is_bundle_dir(p) or is_checkpoint_dir(p))


def resolve_model(name_or_path: str | Path, model_dir: str | Path = ZOO) -> Path:
    """A model directory (project or checkpoint format), or the name of one under ``model_dir``."""
    path = Path(name_or_path)
    if is_model_dir(path):
        return path
    named = Path(model_dir) / str(name_or_path)
    if is_model_dir(named):
        return named
    raise FileNotFoundError(f"{name_or_path}: neither a model directory (config.json, or a checkpoint format: "
                            f"{', '.join(FORMATS)}) nor a model in {model_dir}")


def load_bundle(name_or_path: str | Path, device: str = "cpu", text_encoder=None) -> ModelBundle:
    """The eager PyTorch model of a project directory or a checkpoint, by path or zoo name."""
    path = resolve_model(name_or_path)
    if is_checkpoint_dir(path):
        return load_checkpoint_dir(path, device=device, text_encoder=text_encoder)
    if text_encoder is None:
        config = BundleConfig.load(path / "config.json")
        text_encoder = load_text_encoder(config.text_encoder, cache_size=2048)
    return ModelBundle.load(path, device=device, text_encoder=text_encoder)
