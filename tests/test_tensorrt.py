"""The TensorRT backend's pure logic, on the CPU and without TensorRT: optimisation profiles for the real exported
graphs of a tiny model, the engine cache key, the rebuild rules, the runtime registry (``auto`` and ``tensorrt`` by
name) and the message when the ``tensorrt`` package is absent, and the row chunking of engine runs.

Nothing here runs TensorRT, and no test claims that the backend works: it has never been executed in this project's
CI or benchmarks. Where a ``tensorrt`` module is needed, a recording stand-in (``FakeTensorRT``) is put in
``sys.modules``; it only records what the builder is asked (flags, profile shapes, timing cache) and returns
placeholder bytes as the "engine", which the tests never run."""
from __future__ import annotations

import json
import logging
import sys
import types

import pytest
import torch
from conftest import float32_default
from service_support import TINY, build_tiny_bundle

pytest.importorskip("onnx", reason="the 'onnx' extra is not installed")
pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")

from models.export import ExportError, export_onnx
from models.export.graphs import start_native
from models.export.manifest import file_sha256
from models.export.ort import MissingPackage, session
from models.export.tensorrt import (
    DENOISER_GRAPHS,
    ProfileLimits,
    check_precision,
    engine_key,
    engine_precision,
    graph_precision,
    graph_profile,
    import_tensorrt,
    needs_rebuild,
    profile_limits,
    tensorrt_blocker,
    timing_cache_name,
)
from models.export.tensorrt_engines import engines_dir, engines_ready, ensure_engines

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
L4 = {"name": "NVIDIA L4", "compute_capability": "8.9"}
T4 = {"name": "Tesla T4", "compute_capability": "7.5"}


@pytest.fixture(scope="module")
def model(tmp_path_factory, text_encoder):
    """A tiny guided model (max_duration 4 s, default 1 s) and its ONNX export."""
    root = tmp_path_factory.mktemp("trt-zoo")
    with float32_default():
        build_tiny_bundle(TINY, text_encoder, 0).save(root / TINY)
        export = export_onnx(root / TINY)
    return root / TINY, export


@pytest.fixture
def export(model):
    """The export with no engines yet (each test starts from an empty engine directory)."""
    import shutil

    shutil.rmtree(engines_dir(model[1]), ignore_errors=True)
    return model[1]


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, whatever is installed


# ------------------------------------------------------------------------------------------ profiles
def test_profiles_cover_every_dynamic_axis_of_the_exported_graphs(model, export):
    m = export.manifest
    limits = profile_limits(model[0], m)
    # 4 s and 1 s of 44.1 kHz audio in latent frames of 2048 samples; the MiniLM encoder's token limit
    assert (limits.max_frames, limits.opt_frames) == (m["limits"]["max_latent_frames"], 22) == (87, 22)
    assert (limits.max_tokens, limits.opt_tokens) == (m["text_encoder"]["max_length"], 32) == (64, 32)
    assert (limits.max_batch, limits.opt_batch) == (32, 4)
    profiles = {g: graph_profile(g, e, limits) for g, e in m["graphs"].items()}
    assert set(profiles) == {"text_encoder", "denoiser", "decoder", "encoder"}
    for graph, profile in profiles.items():
        dynamic = {i["name"] for i in m["graphs"][graph]["inputs"] if any(isinstance(d, str) for d in i["shape"])}
        assert set(profile) == dynamic, graph
        for name, (low, opt, high) in profile.items():
            assert len(low) == len(opt) == len(high) and all(a <= b <= c for a, b, c in zip(low, opt, high))
    assert profiles["text_encoder"]["input_ids"] == [[1, 1], [4, 32], [32, 64]]
    channels = m["codec"]["latent_dim"]
    assert profiles["denoiser"]["z"] == [[1, channels, 1], [4, channels, 22], [32, channels, 87]]
    assert profiles["denoiser"]["tokens"][2][:2] == [32, 64] and profiles["denoiser"]["frame_mask"][2] == [32, 87]
    assert profiles["denoiser"]["t"] == [[1], [4], [32]]
    assert profiles["decoder"]["latents"] == [[1, channels, 1], [4, channels, 22], [32, channels, 87]]
    # the encoder's input is the STFT the runtime computes before it: its frame axis in STFT frames
    head, spl = m["codec"]["native_head"], m["codec"]["samples_per_latent"]
    stft = [start_native(torch.zeros(1, 2, f * spl), head, 44100, spl).shape[3] for f in (1, 22, 87)]
    assert [shape[3] for shape in profiles["encoder"]["analysis"]] == stft == list(limits.analysis)
    assert profiles["encoder"]["analysis"][2] == [32, 2, 1025, stft[2], 2]


def test_the_graphs_run_at_their_profiles_extreme_shapes(export):
    """What the profiles hand TensorRT are shapes the exported graphs take: each graph runs under ONNX Runtime at
    its profile's smallest and largest shapes (the codec's graphs at the largest length with one row)."""
    limits = profile_limits(export.dir.parent, export.manifest)
    for graph, entry in export.manifest["graphs"].items():
        profile, sess = graph_profile(graph, entry, limits), session(export.path(graph))
        types_ = {i["name"]: i["dtype"] for i in entry["inputs"]}
        for k in (0, 2):
            shapes = {n: [1, *s[k][1:]] if graph in ("decoder", "encoder") else s[k] for n, s in profile.items()}
            feed = {n: (torch.ones(s, dtype=torch.int64) if types_[n] == "int64" else
                        torch.ones(s, dtype=torch.bool) if types_[n] == "bool" else torch.rand(s) * 0.1).numpy()
                    for n, s in shapes.items()}
            outs = sess.run(None, feed)
            assert outs[0].shape[0] == next(iter(shapes.values()))[0], (graph, k)


def test_an_axis_without_a_range_is_an_error():
    limits = ProfileLimits(max_frames=10, opt_frames=5, max_tokens=8, opt_tokens=8)
    entry = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", "Addx_dim_1"]}]}
    with pytest.raises(ExportError, match="Addx_dim_1"):
        graph_profile("denoiser", entry, limits)
    static = {"inputs": [{"name": "x", "dtype": "float32", "shape": [2, 3]}]}
    assert graph_profile("denoiser", static, limits) == {}  # a static input needs no profile


# ------------------------------------------------------------------------------------------ keys and rules
def test_the_engine_key_holds_version_gpu_graph_hash_precision_and_profile(model, export):
    limits = profile_limits(model[0], export.manifest)
    for graph, entry in export.manifest["graphs"].items():
        precision = graph_precision(graph, "bf16")
        key = engine_key("10.9.0", H100, entry, precision, graph_profile(graph, entry, limits))
        assert key["tensorrt"] == "10.9.0" and key["gpu"] == H100
        assert key["graph"]["sha256"] == entry["sha256"] == file_sha256(export.path(graph))
        assert key["precision"] == ("bf16" if graph in DENOISER_GRAPHS else "fp32")
        assert key["profile"] == graph_profile(graph, entry, limits)
        assert json.loads(json.dumps(key)) == key  # a stored key compares equal to a computed one
    assert engine_precision("bfloat16") == "bf16" and engine_precision("float16") == "fp16"
    assert engine_precision("float32") is None and engine_precision(None) is None
    with pytest.raises(ValueError, match="precision 'int8'"):
        engine_precision("int8")
    check_precision("bf16", L4)
    with pytest.raises(ExportError, match="compute capability 8.0"):
        check_precision("bf16", T4)
    assert timing_cache_name("10.9.0", H100) == "timing-10.9.0-nvidia-h100-80gb-hbm3-sm90.cache"


def _key(**change) -> dict:
    entry = {"file": "denoiser.onnx", "sha256": "a" * 64}
    profile = {"z": [[1, 4, 1], [4, 4, 22], [32, 4, 87]]}
    key = engine_key("10.9.0", H100, entry, "fp16", profile)
    for field, value in change.items():
        key[field] = value
    return key


@pytest.mark.parametrize("field, value, says", [
    ("tensorrt", "10.10.0", "TensorRT version changed: 10.9.0 -> 10.10.0"),
    ("gpu", L4, "GPU changed: NVIDIA H100 80GB HBM3 (sm 9.0) -> NVIDIA L4 (sm 8.9)"),
    ("gpu", {**H100, "compute_capability": "9.1"}, "GPU changed"),
    ("graph", {"file": "denoiser.onnx", "sha256": "b" * 64, "external_sha256": None}, "ONNX graph changed"),
    ("precision", "bf16", "precision changed: fp16 -> bf16"),
    ("profile", {"z": [[1, 4, 1], [4, 4, 22], [32, 4, 100]]}, "optimisation profile changed"),
    ("format", 0, "engine format changed"),
])
def test_a_change_in_any_part_of_the_key_rebuilds(tmp_path, field, value, says):
    engine = tmp_path / "denoiser.engine"
    engine.write_bytes(b"x" * 10)
    built = {"key": _key(), "bytes": 10}  # the record of the engine there, and the key now wanted
    assert says in needs_rebuild(built, _key(**{field: value}), engine)
    assert needs_rebuild(built, _key(), engine) is None  # the same key: reused
    # a failed build is not retried for the same key, and is once the key changes
    assert needs_rebuild({"key": _key(), "failed": "no"}, _key(), engine) is None
    assert says in needs_rebuild({"key": _key(), "failed": "no"}, _key(**{field: value}), engine)


def test_a_missing_record_or_engine_file_rebuilds(tmp_path):
    engine = tmp_path / "denoiser.engine"
    assert needs_rebuild(None, _key(), engine) == "no engine yet"
    assert "missing or incomplete" in needs_rebuild({"key": _key(), "bytes": 10}, _key(), engine)
    engine.write_bytes(b"x" * 7)  # a build cut short
    assert "missing or incomplete" in needs_rebuild({"key": _key(), "bytes": 10}, _key(), engine)


def test_graphs_computing_in_float64_stay_on_onnx_runtime(export):
    """The harmonic codec's decoder accumulates phases in float64 (its parity depends on it): TensorRT has no
    float64, so it is left to ONNX Runtime; the other graphs are handed to TensorRT."""
    blockers = {g: tensorrt_blocker(export.path(g)) for g in export.manifest["graphs"]}
    assert "float64" in blockers.pop("decoder")
    assert set(blockers.values()) == {None}


# ------------------------------------------------------------------------------------------ the package is absent
def test_without_tensorrt_export_says_how_to_install_it(model, no_tensorrt):
    from service.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", "--format", "tensorrt", str(model[0])])
    message = str(exc.value)
    assert "--format tensorrt needs the 'tensorrt' package" in message
    assert "pip install 'tensorrt-cu12>=10,<11'" in message and "NVIDIA's package index" in message
    assert "--format onnx works everywhere" in message
    with pytest.raises(MissingPackage, match="the tensorrt runtime needs the 'tensorrt' package"):
        import_tensorrt()


def test_tta_runtime_tensorrt_without_the_package_serves_torch_and_says_why(model, no_tensorrt, monkeypatch, caplog):
    from service.app import load_model
    from service.runtimes import RUNTIMES, TensorRTRuntime, TorchRuntime, resolve_runtime
    from service.settings import Settings

    assert RUNTIMES["tensorrt"] is TensorRTRuntime and resolve_runtime("tensorrt", "cuda") == "tensorrt"
    monkeypatch.setenv("TTA_RUNTIME", "tensorrt")
    settings = Settings(_env_file=None, warmup=False)
    assert settings.runtime == "tensorrt"
    with caplog.at_level(logging.WARNING, logger="tta.runtimes"), float32_default():
        rt = load_model(model[0], settings)
    assert isinstance(rt, TorchRuntime)
    assert "the tensorrt runtime needs the 'tensorrt' package: pip install 'tensorrt-cu12" in caplog.text
    assert "serving tiny with the torch runtime instead" in caplog.text


def test_another_tensorrt_major_version_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.0.0"))
    with pytest.raises(MissingPackage, match=r"needs TensorRT 10.x, found 11.0.0"):
        import_tensorrt()


# ------------------------------------------------------------------------------------------ what the builder is asked
class FakeTensorRT(types.ModuleType):
    """A recording stand-in for the ``tensorrt`` module: the calls ``build_engine`` makes, with the network's inputs
    read from the ONNX file. It builds nothing: the "engine" is a placeholder that no test runs."""

    __version__ = "10.9.0"

    def __init__(self):
        super().__init__("tensorrt")
        self.builds: list[dict] = []
        fake = self

        class Logger:
            WARNING = "warning"

            def __init__(self, level):
                self.level = level

        class BuilderFlag:
            FP16, BF16, TF32 = "FP16", "BF16", "TF32"

        class Network:
            def __init__(self):
                self.inputs: list = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Parser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                import onnx

                fake.builds.append({"onnx": path, "flags": [], "cleared": [], "shapes": {}, "profiles": 0})
                for v in onnx.load(path, load_external_data=False).graph.input:
                    dims = [d.dim_value if d.dim_value else -1 for d in v.type.tensor_type.shape.dim]
                    self.network.inputs.append(types.SimpleNamespace(name=v.name, shape=dims))
                return True

        class Cache:
            def __init__(self, blob: bytes):
                self.blob = blob

            def serialize(self):
                return self.blob

        class Config:
            def set_flag(self, flag):
                fake.builds[-1]["flags"].append(flag)

            def clear_flag(self, flag):
                fake.builds[-1]["cleared"].append(flag)

            def add_optimization_profile(self, profile):
                fake.builds[-1]["profiles"] += 1

            def create_timing_cache(self, blob):
                return Cache(bytes(blob))

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.builds[-1]["timing_cache_in"] = cache.blob
                self.cache = cache
                return True

            def get_timing_cache(self):
                return Cache(self.cache.blob + b"+" + fake.builds[-1]["onnx"].rsplit("/", 1)[-1].encode())

        class Profile:
            def set_shape(self, name, low, opt, high):
                fake.builds[-1]["shapes"][name] = [list(low), list(opt), list(high)]

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                assert flags == 0  # explicit batch is TensorRT 10's only mode
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"placeholder, not an engine"

        self.Logger, self.BuilderFlag, self.OnnxParser, self.Builder = Logger, BuilderFlag, Parser, Builder


@pytest.fixture
def fake_tensorrt(monkeypatch):
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def test_the_builder_is_asked_for_the_profiles_precisions_and_timing_cache(model, export, fake_tensorrt):
    """What ``build_engine`` asks of TensorRT's builder API, recorded by the stand-in; nothing is built or run."""
    plans = ensure_engines(model[0], export, "bf16", gpu=H100)
    limits = profile_limits(model[0], export.manifest)
    built = {b["onnx"].rsplit("/", 1)[-1].removesuffix(".onnx"): b for b in fake_tensorrt.builds}
    assert set(built) == {"text_encoder", "denoiser", "encoder"}  # the float64 decoder is not handed over
    for graph, b in built.items():
        assert b["shapes"] == graph_profile(graph, export.manifest["graphs"][graph], limits) and b["profiles"] == 1
        assert (b["flags"], b["cleared"]) == ((["BF16"], []) if graph == "denoiser" else ([], ["TF32"]))
    # one timing cache for the directory: each build starts from what the builds before it left
    cache = engines_dir(export) / timing_cache_name("10.9.0", H100)
    ins = [b["timing_cache_in"] for b in fake_tensorrt.builds]
    assert ins[0] == b"" and all(later.startswith(earlier) and later != earlier for earlier, later in zip(ins, ins[1:]))
    assert cache.read_bytes().startswith(ins[-1]) and len(cache.read_bytes()) > len(ins[-1])
    # the records beside the engines: the key, and for the decoder why it stays on ONNX Runtime
    for graph, plan in plans.items():
        record = json.loads(plan.record_path.read_text())
        assert record["key"] == plan.key and plan.record_path.parent == engines_dir(export)
        assert ("failed" in record) == (graph == "decoder") and plan.usable == (graph != "decoder")
        assert graph == "decoder" or plan.engine.stat().st_size == record["bytes"]
    assert "float64" in plans["decoder"].record["failed"]

    n = len(fake_tensorrt.builds)
    ensure_engines(model[0], export, "bf16", gpu=H100)  # all current: nothing built again
    ensure_engines(model[0], export, None, gpu=H100)  # not asked: the existing engines' precision
    assert len(fake_tensorrt.builds) == n
    ensure_engines(model[0], export, "fp16", gpu=H100)  # another precision: only the denoiser is built at it
    assert [b["onnx"].rsplit("/", 1)[-1] for b in fake_tensorrt.builds[n:]] == ["denoiser.onnx"]
    assert fake_tensorrt.builds[-1]["flags"] == ["FP16"]
    ensure_engines(model[0], export, "fp16", gpu=L4)  # another GPU: everything TensorRT takes is built again
    assert len(fake_tensorrt.builds) == n + 1 + 3
    ensure_engines(model[0], export, "fp16", gpu=L4, force=True)
    assert len(fake_tensorrt.builds) == n + 1 + 6


def test_auto_picks_tensorrt_only_where_current_engines_and_the_package_are(model, export, fake_tensorrt,
                                                                           monkeypatch):
    """The selection rule of ``auto`` on CUDA (the GPU's identity is given: there is none here)."""
    from models.export import tensorrt_engines
    from service.runtimes import resolve_runtime

    monkeypatch.setattr(tensorrt_engines, "gpu_identity", lambda device="cuda": H100)
    path = model[0]
    assert not engines_ready(path) and resolve_runtime("auto", "cuda", path) == "torch"  # no engines yet
    assert resolve_runtime("auto", "cuda") == "torch"  # no model to look at
    ensure_engines(path, export, "fp16")
    assert engines_ready(path) and resolve_runtime("auto", "cuda", path) == "tensorrt"
    assert resolve_runtime("auto", "cuda", path, "float16") == "tensorrt"
    assert resolve_runtime("auto", "cuda", path, "bfloat16") == "torch"  # the engines are fp16
    assert resolve_runtime("auto", "cpu", path) == "onnxruntime"  # the CPU keeps ONNX Runtime
    assert not engines_ready(path, gpu=L4)  # built for another GPU
    monkeypatch.setattr(fake_tensorrt, "__version__", "10.10.0")
    assert resolve_runtime("auto", "cuda", path) == "torch"  # built by another TensorRT
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert resolve_runtime("auto", "cuda", path) == "torch"  # no package


def test_the_tensorrt_runtime_asked_for_on_the_cpu_fails_loudly(model, fake_tensorrt):
    from service.runtimes import load_runtime

    with pytest.raises(ValueError, match="runs on a CUDA device"):
        load_runtime(model[0], "tensorrt", "cpu")


# ------------------------------------------------------------------------------------------ engine runs
def test_batches_beyond_the_profile_run_in_row_chunks(export):
    from service.runtimes.tensorrt_runtime import batch_axes, run_in_row_chunks

    assert set(batch_axes(export.manifest["graphs"]["denoiser"]).values()) == {0}
    axes = {"z": 0, "keys": 1, "out": 0}
    calls = []

    def execute(inputs):  # rows are independent: each output row depends on its own input rows only
        calls.append((inputs["z"].shape[0], inputs["keys"].shape[1]))
        return {"out": inputs["z"] * 2 + inputs["keys"].sum(0)[:, :1], "fixed": inputs["scale"]}

    inputs = {"z": torch.randn(70, 3), "keys": torch.randn(2, 70, 3), "scale": torch.tensor(2.0)}
    whole = execute(inputs)
    calls.clear()
    out = run_in_row_chunks(execute, inputs, axes, 32)
    assert calls == [(32, 32), (32, 32), (6, 6)]
    assert torch.equal(out["out"], whole["out"]) and torch.equal(out["fixed"], inputs["scale"])
    calls.clear()
    run_in_row_chunks(execute, inputs, axes, None)
    run_in_row_chunks(execute, inputs, axes, 70)
    assert calls == [(70, 70), (70, 70)]
