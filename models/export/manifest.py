"""Where exports live, what they were made from, and whether they are still current.

An export directory (``<model_dir>/onnx`` by default) holds the graphs and ``manifest.json``. The manifest records a
fingerprint of everything the graphs were made from: the model's config and weights, its codec's, the text encoder's
files (for a checkpoint directory: every file in it, and in a derived model's base), and the source of the code that
defines the graphs. A runtime re-exports when the fingerprint differs, so a
retrained model (or a changed architecture) never runs through stale graphs.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

MANIFEST = "manifest.json"
EXPORT_FORMAT = 2  # bump when the graphs' interface changes (2: the codec's encoder graph)
_MODELS = Path(__file__).resolve().parent.parent
# the code that decides what the graphs compute; an edit to any of it makes existing exports stale
GRAPH_SOURCES = ("dit.py", "layers.py", "codec", "audio/spectral.py", "text/encoders.py", "export/graphs.py",
                 "export/onnx_export.py")
CHECKPOINT_SOURCES = ("checkpoints",)  # and, for a checkpoint directory, the networks that read it

_HASHES: dict[tuple[str, int, int], str] = {}
_HASHES_LOCK = threading.Lock()


class ExportError(RuntimeError):
    """An export could not be made or failed its checks (the message says which and why)."""


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so that a service start hashes each weight file once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _HASHES_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _HASHES_LOCK:
        _HASHES[key] = digest
    return digest


def codec_dir(model_dir: Path, config: dict) -> Path:
    return (model_dir / config["codec_from"]).resolve() if config.get("codec_from") else model_dir


def text_encoder_dir(config: dict) -> Path:
    """The local directory of the model's text encoder (the same resolution as ``load_text_encoder``)."""
    te = config.get("text_encoder") or {"name": "minilm"}
    if te.get("path"):
        return Path(te["path"])
    if te.get("name", "minilm") == "minilm":
        from models.text import minilm_path

        return minilm_path()
    raise ExportError(f"text encoder {te.get('name')!r} needs a local 'path'")


def tokenizer_dir(config: dict) -> Path:
    """Where the tokenizer of the model's text encoder lives (a checkpoint may keep it apart from the weights)."""
    te = config.get("text_encoder") or {}
    return Path(te["tokenizer"]) if te.get("tokenizer") else text_encoder_dir(config)


def _tree(root: Path, label: str) -> dict[str, Path]:
    """Every file under a checkpoint directory (exports and hidden files aside), labelled by its relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] != "onnx" and not any(part.startswith(".") for part in rel.parts):
            out[f"{label}/{rel.as_posix()}"] = p
    return out


def is_checkpoint(model_dir: Path) -> bool:
    from models.checkpoints import is_checkpoint_dir  # the registry imports the model code; only needed here

    return is_checkpoint_dir(model_dir)


def source_files(model_dir: Path) -> dict[str, Path]:
    """Every file whose content the exported graphs depend on, by a stable label. A checkpoint directory: all its
    files (its text encoder lives inside it), and a derived model's base checkpoint's too."""
    model_dir = Path(model_dir)
    if is_checkpoint(model_dir):
        from models.checkpoints import format_derived

        files = _tree(model_dir, "checkpoint")
        if format_derived.detect(model_dir):
            base = format_derived.base_dir(model_dir, json.loads((model_dir / format_derived.MANIFEST).read_text()))
            files.update(_tree(base, "base"))
        return files
    config = json.loads((model_dir / "config.json").read_text())
    files = {"config.json": model_dir / "config.json", "denoiser.safetensors": model_dir / "denoiser.safetensors"}
    cdir = codec_dir(model_dir, config)
    files["codec/codec.safetensors"] = cdir / "codec.safetensors"
    if cdir != model_dir:
        files["codec/config.json"] = cdir / "config.json"
    tdir = text_encoder_dir(config)
    for p in sorted(tdir.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".md":
            files[f"text_encoder/{p.name}"] = p
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ExportError(f"{model_dir}: cannot export, missing {', '.join(missing)}")
    return files


def code_files(checkpoint: bool = False) -> dict[str, Path]:
    out = {}
    for name in GRAPH_SOURCES + (CHECKPOINT_SOURCES if checkpoint else ()):
        p = _MODELS / name
        for f in sorted(p.glob("*.py")) if p.is_dir() else [p]:
            out[str(f.relative_to(_MODELS))] = f
    return out


def fingerprint(model_dir: Path) -> dict:
    """{"sha256": one digest over everything, "files": per source file, "code": per graph-defining module}."""
    files = {k: file_sha256(p) for k, p in source_files(model_dir).items()}
    code = {k: file_sha256(p) for k, p in code_files(is_checkpoint(Path(model_dir))).items()}
    blob = json.dumps({"format": EXPORT_FORMAT, "files": files, "code": code}, sort_keys=True)
    return {"sha256": hashlib.sha256(blob.encode()).hexdigest(), "files": files, "code": code}


def load_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def graph_files(entry: dict) -> list[str]:
    """The files of one graph's manifest entry: the graph, and its external weight file when it has one."""
    return [entry["file"]] + ([entry["external_data"]["file"]] if entry.get("external_data") else [])


def is_current(out_dir: Path, manifest: dict | None, digest: str) -> bool:
    """The manifest exists, was made from exactly these sources, and every graph file it names is there."""
    if not manifest or manifest.get("format") != EXPORT_FORMAT or manifest.get("source", {}).get("sha256") != digest:
        return False
    return all((Path(out_dir) / f).is_file() for g in manifest.get("graphs", {}).values() for f in graph_files(g))


def stale_reason(out_dir: Path, manifest: dict | None, current: dict) -> str:
    """Why an export directory does not match the sources (for the log line that announces a re-export)."""
    if not manifest:
        return "no export yet"
    if manifest.get("format") != EXPORT_FORMAT:
        return f"export format {manifest.get('format')} != {EXPORT_FORMAT}"
    old = manifest.get("source", {})
    changed = [k for k in sorted(set(current["files"]) | set(old.get("files", {})))
               if current["files"].get(k) != old.get("files", {}).get(k)]
    changed += [k for k in sorted(set(current["code"]) | set(old.get("code", {})))
                if current["code"].get(k) != old.get("code", {}).get(k)]
    if changed:
        return "changed since the export: " + ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
    return "graph files missing"


def export_dirs(model_dir: Path) -> list[Path]:
    """Candidate export directories, preferred first: ``<model_dir>/onnx``, then a per-model user cache directory
    (for read-only model directories, e.g. a container image)."""
    model_dir = Path(model_dir).resolve()
    cache = Path(os.environ.get("TTA_EXPORT_CACHE") or
                 Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tta-serve" / "onnx")
    tag = hashlib.sha256(str(model_dir).encode()).hexdigest()[:12]
    return [model_dir / "onnx", cache / f"{model_dir.name}-{tag}"]


def writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)
