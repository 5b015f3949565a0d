"""Building TensorRT engines from an ONNX export, and finding the current ones.

Engines live in ``<export dir>/tensorrt/``: ``<graph>.engine`` with ``<graph>.engine.json`` beside it (the key it was
built for, ``models.export.tensorrt.engine_key``, and its size; or, for a graph TensorRT could not take, why), and one
timing cache per TensorRT version and GPU model, reused by every build there. ``ensure_engines`` builds what
``needs_rebuild`` says is missing or stale; ``engines_ready`` only looks (``auto`` uses it to pick the runtime).

``build_engine`` is written against TensorRT 10's documented Python API and has not been executed in this project's
CI or benchmarks (no TensorRT there).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from models.export.manifest import ExportError, export_dirs, fingerprint, is_current, load_manifest
from models.export.onnx_export import OnnxExport
from models.export.tensorrt import (
    DEFAULT_PRECISION,
    check_precision,
    engine_key,
    engine_precision,
    gpu_identity,
    graph_precision,
    graph_profile,
    import_tensorrt,
    needs_rebuild,
    profile_limits,
    tensorrt_blocker,
    timing_cache_name,
)

log = logging.getLogger("tta.export")

ENGINES_DIR = "tensorrt"
# builder flags per precision; fp32 also clears TF32 (on by default), whose 10-bit products the codec's graphs
# were never checked with
BUILDER_FLAGS = {"fp16": ("FP16",), "bf16": ("BF16",), "fp32": ()}


@dataclass
class EnginePlan:
    """One graph's engine: its ONNX file, the engine file, the key it must have been built for and its record."""

    graph: str
    onnx: Path
    engine: Path
    key: dict
    record: dict | None

    @property
    def record_path(self) -> Path:
        return self.engine.with_name(self.engine.name + ".json")

    def rebuild_reason(self) -> str | None:
        return needs_rebuild(self.record, self.key, self.engine)

    @property
    def usable(self) -> bool:
        """A current engine is there (not a record of a failed build)."""
        return self.rebuild_reason() is None and "failed" not in self.record


def engines_dir(export: OnnxExport) -> Path:
    return export.dir / ENGINES_DIR


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, data) -> None:
    """``data``: bytes, or any buffer (TensorRT's IHostMemory), written without a copy."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def resolve_precision(directory: Path, requested: str | None) -> str:
    """The asked precision; not asked: the one the existing denoiser engine was built at, else the default."""
    requested = engine_precision(requested)
    if requested:
        return requested
    record = _read_json(directory / "denoiser.engine.json") or {}
    return (record.get("key") or {}).get("precision") or DEFAULT_PRECISION


def plan_engines(model_dir: Path, export: OnnxExport, precision: str, trt_version: str,
                 gpu: dict) -> list[EnginePlan]:
    """One plan per graph of the export, with the key each engine must match."""
    limits = profile_limits(model_dir, export.manifest)
    directory = engines_dir(export)
    plans = []
    for graph, entry in export.manifest["graphs"].items():
        profile = graph_profile(graph, entry, limits)
        key = engine_key(trt_version, gpu, entry, graph_precision(graph, precision), profile)
        plan = EnginePlan(graph, export.path(graph), directory / f"{graph}.engine", key, None)
        plan.record = _read_json(plan.record_path)
        plans.append(plan)
    return plans


def current_export(model_dir: Path) -> OnnxExport | None:
    """The current ONNX export of ``model_dir`` if one exists (none is made)."""
    digest = fingerprint(model_dir)["sha256"]
    for d in export_dirs(model_dir):
        manifest = load_manifest(d)
        if is_current(d, manifest, digest):
            return OnnxExport(d, manifest)
    return None


def engines_ready(model_dir: Path, device: str = "cuda", precision: str | None = None,
                  gpu: dict | None = None) -> bool:
    """TensorRT imports, a GPU is there, and every graph of the model's current ONNX export has a current record (an
    engine, or a failed build for the same key), the denoiser an engine. Builds nothing; never raises."""
    try:
        trt = import_tensorrt()
        gpu = gpu or gpu_identity(device)
        export = current_export(Path(model_dir)) if gpu else None
        if export is None:
            return False
        precision = resolve_precision(engines_dir(export), precision)
        plans = {p.graph: p for p in plan_engines(Path(model_dir), export, precision, trt.__version__, gpu)}
    except Exception as exc:  # noqa: BLE001 - auto then serves with torch, whatever the reason
        log.debug("no TensorRT engines for %s: %s", model_dir, exc)
        return False
    return all(p.rebuild_reason() is None for p in plans.values()) and plans["denoiser"].usable


def ensure_engines(model_dir: Path, export: OnnxExport, precision: str | None = None, device: str = "cuda",
                   force: bool = False, gpu: dict | None = None) -> dict[str, EnginePlan]:
    """Build every engine of the export that is missing or stale (all of them with ``force``); returns the plans by
    graph, each with its record. A graph TensorRT cannot take (``tensorrt_blocker``, a parser error, no engine from
    the builder) is recorded as failed and served by ONNX Runtime; the denoiser must build."""
    trt = import_tensorrt("building TensorRT engines")
    gpu = gpu or gpu_identity(device)
    if gpu is None:
        raise ExportError("building TensorRT engines needs a CUDA GPU, and torch sees none here")
    directory = engines_dir(export)
    directory.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(directory, precision)
    check_precision(precision, gpu)
    timing_cache = directory / timing_cache_name(trt.__version__, gpu)
    plans = plan_engines(Path(model_dir), export, precision, trt.__version__, gpu)
    for plan in plans:
        reason = "rebuild asked for" if force else plan.rebuild_reason()
        if reason is not None:
            log.info("building the TensorRT engine of %s/%s: %s", export.manifest.get("model"), plan.graph, reason)
            plan.record = _build(trt, plan, timing_cache)
    by_graph = {p.graph: p for p in plans}
    if not by_graph["denoiser"].usable:
        raise ExportError(f"TensorRT could not build the denoiser: {by_graph['denoiser'].record.get('failed')} "
                          "(after a fix, rebuild with tta export --format tensorrt --force)")
    return by_graph


def _build(trt, plan: EnginePlan, timing_cache: Path) -> dict:
    """Build one engine and write its record; a graph TensorRT cannot take gets a record that says why."""
    plan.engine.unlink(missing_ok=True)
    t0 = time.perf_counter()
    reason = tensorrt_blocker(plan.onnx)
    record = {"key": plan.key}
    if reason is None:
        try:
            size = build_engine(trt, plan.onnx, plan.engine, plan.key["profile"], plan.key["precision"], timing_cache)
            record.update(bytes=size, build_seconds=round(time.perf_counter() - t0, 1),
                          created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        except ExportError as exc:
            reason = str(exc)
    if reason is not None:
        log.warning("%s stays on ONNX Runtime: %s", plan.graph, reason)
        record["failed"] = reason
    _write_atomic(plan.record_path, (json.dumps(record, indent=2) + "\n").encode())
    return record


def network_profile(network, profile: dict[str, list]) -> dict[str, list]:
    """The profile's shapes for the parsed network's inputs. An input that the profile does not cover but has dynamic
    axes is an error; profile entries for inputs the network dropped are ignored."""
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name in profile:
            shapes[tensor.name] = profile[tensor.name]
        elif any(int(d) < 0 for d in tensor.shape):
            raise ExportError(f"input {tensor.name} {tuple(tensor.shape)} has dynamic axes the manifest does not name")
    return shapes


def build_engine(trt, onnx_path: Path, engine_path: Path, profile: dict[str, list], precision: str,
                 timing_cache: Path) -> int:
    """Parse the ONNX graph (external weights are read from beside it), build a serialised engine for one
    optimisation profile at ``precision`` with the timing cache loaded from and saved back to ``timing_cache``, and
    write it to ``engine_path``. Returns its size in bytes."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: TensorRT 10's only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    for flag in BUILDER_FLAGS[precision]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    shapes = builder.create_optimization_profile()
    for name, (low, opt, high) in network_profile(network, profile).items():
        shapes.set_shape(name, low, opt, high)
    config.add_optimization_profile(shapes)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("the timing cache %s does not match this TensorRT and GPU; starting an empty one", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT built no engine from {onnx_path.name} (the TensorRT log above says why)")
    _write_atomic(engine_path, serialized)
    _write_atomic(timing_cache, config.get_timing_cache().serialize())
    return engine_path.stat().st_size
