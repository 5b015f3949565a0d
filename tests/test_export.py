"""ONNX export and the ONNX Runtime runtime, on tiny random models: the real-valued iSTFT, checker and per-graph
parity with PyTorch, staleness, the runtime registry, ONE parity test that every non-torch runtime must pass, the
``tta export`` command, and the service serving /generate with runtime=onnxruntime."""
from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
import logging
import math
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import float32_default
from service_support import (
    PARITY,
    TINY,
    TINY_ARC,
    LiveServer,
    build_tiny_bundle,
    compare_runtimes,
    derived_student,
    run_jobs,
)
from test_checkpoints import tango  # noqa: F401 - the tiny Tango checkpoint (skips without the checkpoints extra)

onnx = pytest.importorskip("onnx", reason="the 'onnx' extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")

from models.dit import DiTConfig
from models.export import TOLERANCES, ensure_onnx_export, export_onnx
from models.export.graphs import finish_native, native_head, native_tail, start_native
from models.export.onnx_export import encoder_test_waves
from models.export.parity import (
    max_abs_error,
    max_rel_error,
    rms_rel_error,
    spectral_rel_error,
)
from models.layers import fill_zero_parameters

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

LATENT = DiTConfig.latent_dim  # the embedded codec's latent channels

STALE = "tiny-stale"
SR = 44100


@pytest.fixture(autouse=True)
def _float32():
    with float32_default():
        yield


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, text_encoder):
    """Two tiny models (guided DDIM; ping-pong without guidance) and one for the staleness test, all exported."""
    root = tmp_path_factory.mktemp("export-zoo")
    with float32_default():
        build_tiny_bundle(TINY, text_encoder, 0).save(root / TINY)
        build_tiny_bundle(TINY_ARC, text_encoder, 1, kind="arc", sampler="pingpong",
                          schedule={"name": "rectified-flow"}, default_guidance=1.0).save(root / TINY_ARC)
        build_tiny_bundle(STALE, text_encoder, 2).save(root / STALE)
        exports = {name: export_onnx(root / name) for name in (TINY, TINY_ARC, STALE)}
    return root, exports


def bundle(zoo, name, text_encoder):
    from models.bundle import ModelBundle

    return ModelBundle.load(zoo[0] / name, text_encoder=text_encoder)


# ------------------------------------------------------------------------------------------ the exported files
def test_export_writes_checked_graphs_and_manifest(zoo):
    root, exports = zoo
    ex = exports[TINY]
    assert ex.dir == root / TINY / "onnx"
    m = json.loads((ex.dir / "manifest.json").read_text())
    assert m == ex.manifest and m["opset"] >= 17 and set(m["versions"]) >= {"torch", "onnx", "onnxruntime"}
    names = {g: ([i["name"] for i in m["graphs"][g]["inputs"]], [o["name"] for o in m["graphs"][g]["outputs"]])
             for g in m["graphs"]}
    assert names == {"text_encoder": (["input_ids", "attention_mask"], ["tokens", "pooled"]),
                     "denoiser": (["z", "t", "tokens", "token_mask", "pooled", "seconds", "frame_mask"], ["out"]),
                     "decoder": (["latents"], ["decoded"]), "encoder": (["analysis"], ["latents"])}
    # the decoder graph stops before the inverse STFT (ONNX Runtime has no fast one): the runtime finishes with it;
    # the encoder graph starts after the STFT, which the runtime computes before it
    assert m["codec"]["istft"] == {"n_fft": 2048, "hop": 512}
    assert m["codec"]["native_head"] == {"stft": {"n_fft": 2048, "hop": 512}} and "no_encoder" not in m["codec"]
    analysis = m["graphs"]["encoder"]["inputs"][0]["shape"]  # [B, C, K, F, (real, imaginary)]
    assert analysis == ["batch", 2, 1025, "frames", 2]
    assert m["graphs"]["encoder"]["outputs"][0]["shape"][::2] == ["batch", "frames"]
    spectrum = m["graphs"]["decoder"]["outputs"][0]["shape"]  # [B, C, K, F, (real, imaginary)]
    assert len(spectrum) == 5 and spectrum[0] == "batch" and spectrum[3] == "frames" and spectrum[4] == 2
    z = m["graphs"]["denoiser"]["inputs"][0]
    assert z["shape"][0] == "batch" and z["shape"][2] == "frames"  # dynamic batch and frame axes
    assert m["graphs"]["decoder"]["inputs"][0]["shape"][2] == "frames"
    for name, graph in m["graphs"].items():
        path = ex.dir / graph["file"]
        onnx.checker.check_model(str(path), full_check=True)
        assert onnx.load(str(path), load_external_data=False).opset_import[0].version >= 17
        check = graph["parity"]
        assert check["passed"] and check["tolerance"] == TOLERANCES[name], (name, check)
        assert all(check[metric] <= limit for metric, limit in TOLERANCES[name].items()), (name, check)
        print(f"{name}: {check}")
    assert m["limits"]["max_latent_frames"] == -(-4 * SR // 2048)  # the tiny models' max_duration is 4 s
    # the second model of the zoo took the first one's (identical) text-encoder graph instead of exporting it again
    assert exports[TINY_ARC].manifest["graphs"]["text_encoder"]["reused_from"] in (TINY, STALE)


def test_each_graph_matches_pytorch_on_new_shapes(zoo, text_encoder):
    from models.export.ort import session

    ex = zoo[1][TINY]
    b = bundle(zoo, TINY, text_encoder)
    g = torch.Generator().manual_seed(7)
    # denoiser: a batch, length and text length the export never saw, ragged masks
    n, frames, length = 4, 17, 7
    c = b.denoiser.config
    args = (torch.randn(n, c.latent_dim, frames, generator=g), torch.rand(n, generator=g),
            torch.randn(n, length, c.text_dim, generator=g), torch.arange(length)[None] < torch.tensor([[7], [3], [1], [5]]),
            torch.randn(n, c.pooled_dim, generator=g), torch.tensor([1.0, 2.5, 4.0, 0.5]),
            torch.arange(frames)[None] < torch.tensor([[17], [9], [12], [2]]))
    got = session(ex.path("denoiser")).run(["out"], {k: a.numpy() for k, a in zip(
        ["z", "t", "tokens", "token_mask", "pooled", "seconds", "frame_mask"], args)})[0]
    with torch.no_grad():
        want = b.denoiser(*args)
    assert want.abs().max() > 0.1 and max_rel_error(got, want) <= 1e-4
    # text encoder: prompts the export never saw, tokenised as the runtime does
    enc = text_encoder.encoder
    prompts = ["an owl hoots twice in the forest", "", "bells"]
    batch = enc.tokenizer(prompts, padding=True, truncation=True, max_length=enc.max_length, return_tensors="np")
    states, pooled = session(ex.path("text_encoder")).run(["tokens", "pooled"], {
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    for i, (tokens, vec) in enumerate(enc.encode_unpadded(prompts)):
        assert max_rel_error(states[i, : tokens.shape[0]], tokens) <= 1e-4
        assert max_rel_error(pooled[i], vec) <= 1e-4
    # decoder: two clips of 0.3 s and one of 3 s, against float32 PyTorch; the 3 s clip also against a float64
    # PyTorch decode: the graph must be as accurate as float32 PyTorch is (the export's custom cumsum / remainder
    # translations are what make it so: the exporter's defaults are 5-10 times less accurate on long clips)
    decoder = session(ex.path("decoder"))
    exact = copy.deepcopy(b.codec).double()
    for batch, frames in ((2, 7), (1, 66)):
        z = torch.randn(batch, b.codec.latent_dim, frames, generator=g)
        out = torch.from_numpy(decoder.run(["decoded"], {"latents": z.numpy()})[0])
        wave = finish_native(out, ex.manifest["codec"], SR).numpy()
        ref = b.codec.decode(z)
        assert wave.shape == tuple(ref.shape) == (batch, 2, frames * 2048)
        for i in range(batch):
            assert spectral_rel_error(wave[i], ref[i]) <= TOLERANCES["decoder"]["spectral_rel"]
            assert rms_rel_error(wave[i], ref[i]) <= 1e-2
        if frames > 11:
            ref64 = exact.decode(z.double())
            assert rms_rel_error(wave, ref64) <= 2 * rms_rel_error(ref, ref64) + 1e-5


def encoder_errors(path, codec, head: dict, shapes, seed: int) -> float:
    """max_rel of the encoder graph at ``path``, fed what the runtime feeds it (``start_native`` with the manifest
    codec's ``head``), against ``codec.encode`` on tones over noise of these (batch, samples) shapes."""
    from models.export.ort import session

    sess = session(path)
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch, samples in shapes:
        wave = encoder_test_waves(batch, samples, codec.sample_rate, g)
        analysis = start_native(wave, head, codec.sample_rate, codec.samples_per_latent)
        got = sess.run(["latents"], {"analysis": analysis.numpy()})[0]
        with torch.no_grad():
            want = codec.encode(wave)
        assert got.shape == tuple(want.shape) == (batch, codec.latent_dim, -(-samples // codec.samples_per_latent))
        assert want.abs().max() > 0.1
        worst = max(worst, max_rel_error(got, want))
    return worst


def test_the_encoder_graph_matches_pytorch_on_new_shapes(zoo, text_encoder):
    """The harmonic codec's encoder (pitch analyser, posterior, analytic channels; the STFT before it in torch) on a
    batch and lengths the export never saw, one of them shorter than a latent frame."""
    ex = zoo[1][TINY]
    codec = bundle(zoo, TINY, text_encoder).codec
    worst = encoder_errors(ex.path("encoder"), codec, ex.manifest["codec"]["native_head"], ((4, 50000), (1, 1500)),
                           seed=8)
    print(f"encoder, tiny codec: max_rel {worst:.2e}")
    assert worst <= TOLERANCES["encoder"]["max_rel"]


@pytest.mark.parametrize("masked", [False, True])
def test_onnx_text_encoder_appends_the_same_number_channels(zoo, masked):
    """The number channels are computed in Python beside the encoder graph: under ONNX Runtime they must be
    torch's, Fourier and linear ones alike (the graph itself is the plain encoder's), and a masking encoder's graph
    must read the same placeholder text."""
    from models.text import HFTextEncoder, NumberChannels, minilm_path
    from service.runtimes.onnx_runtime import OnnxTextEncoder

    ex = zoo[1][TINY]
    reference = HFTextEncoder(minilm_path(), numbers=NumberChannels(16, True, masked))
    info = {**ex.manifest["text_encoder"], "dim": reference.dim, "pooled_dim": reference.pooled_dim,
            "number_freqs": 16, "number_linear": True, "number_masked": masked}
    onnx_encoder = OnnxTextEncoder(ex.path("text_encoder"), minilm_path(), info, "cpu")
    prompts = ["a 440 Hz sine tone on the left", "clicks at 127.5 BPM", "rain"]
    for (tokens, pooled), (want_tokens, want_pooled) in zip(onnx_encoder.encode_unpadded(prompts),
                                                            reference.encode_unpadded(prompts)):
        assert tokens.shape == want_tokens.shape and tokens.shape[1] == 384 + 34
        assert torch.equal(tokens[:, 384:], want_tokens[:, 384:]) and torch.equal(pooled[384:], want_pooled[384:])
        assert max_rel_error(tokens, want_tokens) <= 1e-4


def test_models_share_an_onnx_text_encoder_only_with_the_same_number_channels(zoo):
    """Two exports of one encoder graph whose models read numbers differently must not share embeddings."""
    import types

    from models.text import minilm_path
    from service.runtimes.onnx_runtime import shared_onnx_text_encoder

    ex = zoo[1][TINY]
    config = {"name": "minilm"}

    def export_with(**numbers):
        manifest = {**ex.manifest, "text_encoder": {**ex.manifest["text_encoder"], **numbers}}
        return types.SimpleNamespace(manifest=manifest, path=ex.path)

    plain = shared_onnx_text_encoder(export_with(number_freqs=0, number_linear=False), config, "cpu")
    assert shared_onnx_text_encoder(export_with(number_freqs=0, number_linear=False), config, "cpu") is plain
    masked = shared_onnx_text_encoder(export_with(number_freqs=0, number_linear=True, number_masked=True,
                                                  dim=386, pooled_dim=386), config, "cpu")
    assert masked is not plain and masked.encoder.numbers.masked and not plain.encoder.numbers.masked
    assert masked.encoder.tokenizer.name_or_path == plain.encoder.tokenizer.name_or_path == str(minilm_path())


def test_decoder_graph_matches_pytorch_with_sounding_partials(tmp_path):
    """The tiny bundles' codecs draw no partials (their tonality gate is shut), so the tests above hear only noise.
    Here partials are all that sounds: two tonal slots (220 and 660 Hz), each gated off for a few latent frames
    with a pitch channel that puts its frequency at 1e10 - 1e15 Hz, as generated latents do. A gated-off frame draws
    nothing, but its frequency was integrated into the phase of every later frame, where one float32 rounding of it
    (ONNX Runtime vs PyTorch) moved the later partials by radians: rms_rel 0.3-0.8 before ``render_parts`` capped
    the integrated frequency at Nyquist."""
    from training_support import tiny_codec

    from models.export.onnx_export import export_decoder
    from models.export.ort import session

    torch.manual_seed(0)
    codec = tiny_codec().eval()
    c = codec.config
    with torch.no_grad():  # partials at 0.05 per channel (times the 1/n shape), the noise 60 dB below that
        slots = codec.dec_out.bias[: c.slots * c.slot_outputs].view(c.slots, c.slot_outputs)
        slots[:, 1: 1 + c.audio_channels] = math.log(0.05)
        codec.dec_out.bias[c.slots * c.slot_outputs:] = math.log(1e-3)
    z = 0.5 * torch.randn(1, c.latent_dim, 12, generator=torch.Generator().manual_seed(0))  # raw = normalised here
    z[:, : c.analytic_channels] = 0.0
    for s, hz in enumerate((220.0, 660.0)):
        z[:, 2 * s] = 1.0  # tonality
        z[:, 2 * s + 1] = c.pitch_scale * math.log(hz / c.pitch_ref_hz)
    z[:, 0, 3:7], z[:, 1, 3:7] = 0.0, torch.tensor([9.0, 13.0, 11.0, 15.0])  # gated off; f = 400 e^(2 pitch) Hz
    z[:, 2, 7:9], z[:, 3, 7:9] = 0.0, torch.tensor([14.0, 10.0])
    export_decoder(codec, tmp_path / "decoder.onnx", max_latent_frames=16)
    out = session(tmp_path / "decoder.onnx").run(["decoded"], {"latents": z.numpy()})[0]
    got = finish_native(torch.from_numpy(out), native_tail(codec), SR).numpy()
    with torch.no_grad():
        want = codec.decode(z)
        unvoiced = z.clone()
        unvoiced[:, [0, 2]] = 0.0
        noise = codec.decode(unvoiced)
    assert want.pow(2).mean() > 1e4 * noise.pow(2).mean()  # the partials are what is heard
    rms, worst = rms_rel_error(got, want), max_abs_error(got, want)
    print(f"decoder with sounding partials: rms_rel {rms:.2e}, max_abs {worst:.2e} (peak {want.abs().max():.2f})")
    assert rms < 1e-3 and worst < 1e-3


def test_atan2_is_exported_with_pytorchs_values_at_zero(tmp_path):
    """The encoder's phase: the exporter's own atan2 gives NaN at 0 / 0 (a silent bin), which turned every latent of
    a clip with a silent stretch into NaN; and a NaN must fail a parity check, not pass it."""
    from models.export.onnx_export import _trace_to_onnx
    from models.export.ort import session
    from models.export.parity import worst

    class Atan2(torch.nn.Module):
        def forward(self, y, x):
            return torch.atan2(y, x)

    values = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -2.5, 1e20, -1e20])
    y, x = (v.flatten().contiguous() for v in torch.meshgrid(values, values, indexing="ij"))
    axes = {"y": {0: "n"}, "x": {0: "n"}, "angle": {0: "n"}}
    _trace_to_onnx(Atan2(), (y, x), tmp_path / "atan2.onnx", ["y", "x"], ["angle"], axes, 17)
    got = session(tmp_path / "atan2.onnx").run(["angle"], {"y": y.numpy(), "x": x.numpy()})[0]
    assert np.abs(got - torch.atan2(y, x).numpy()).max() <= 1e-6  # atan2(+-0, -0) = +-pi, atan2(0, 0) = 0, ...
    y, x = torch.randn(2, 10000, generator=torch.Generator().manual_seed(0))
    got = session(tmp_path / "atan2.onnx").run(["angle"], {"y": y.numpy(), "x": x.numpy()})[0]
    assert np.abs(got - torch.atan2(y, x).numpy()).max() <= 1e-6
    assert math.isnan(worst(0.0, float("nan"))) and worst(1e-7, 3e-7) == 3e-7


def test_guidance_input_is_exported(tmp_path):
    from models.dit import DiT, DiTConfig
    from models.export.onnx_export import export_denoiser
    from models.export.ort import session

    torch.manual_seed(3)
    dit = DiT(DiTConfig(width=32, depth=1, heads=2, guidance_embed=True))
    fill_zero_parameters(dit, 0.05)
    entry = export_denoiser(dit, tmp_path / "denoiser.onnx")
    assert [i["name"] for i in entry["inputs"]][-1] == "guidance" and entry["parity"]["passed"]
    sess = session(tmp_path / "denoiser.onnx")
    feed = {"z": np.ones((1, LATENT, 6), np.float32), "t": np.array([0.5], np.float32),
            "tokens": np.ones((1, 3, 384), np.float32), "token_mask": np.ones((1, 3), bool),
            "pooled": np.ones((1, 384), np.float32), "seconds": np.array([2.0], np.float32),
            "frame_mask": np.ones((1, 6), bool)}
    low = sess.run(["out"], {**feed, "guidance": np.array([1.0], np.float32)})[0]
    high = sess.run(["out"], {**feed, "guidance": np.array([4.0], np.float32)})[0]
    assert np.abs(low - high).max() > 1e-4  # guidance is a live input, not a constant folded in by the trace


def test_graphs_over_the_size_limit_keep_their_weights_in_one_external_file(zoo, tmp_path, monkeypatch):
    """Past ONNX's 2 GiB single-file limit (Stable Audio Open 1.0's DiT) a graph's weights go to one ``.data`` file
    beside it; the limit is lowered to zero here so that a tiny model takes that path. The manifest names and hashes
    both files, a missing weight file makes the export stale, and the runtime serves the same latents as torch."""
    from models.export import onnx_export
    from models.export.manifest import is_current, load_manifest
    from service.runtimes import load_runtime
    from service.runtimes.onnx_runtime import OnnxRuntime

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    root = zoo[0]
    out = tmp_path / "onnx"
    done = export_onnx(root / TINY, out)
    graphs = done.manifest["graphs"]
    external = {name: entry for name, entry in graphs.items() if not entry.get("reused_from")}
    assert {"denoiser", "decoder"} <= set(external)
    for entry in external.values():
        data = out / entry["external_data"]["file"]
        assert data.name == entry["file"] + ".data" and data.stat().st_size == entry["external_data"]["bytes"]
        graph = onnx.load(str(out / entry["file"]), load_external_data=False).graph
        inline = [len(i.raw_data) for i in graph.initializer]
        inline += [a.t.ByteSize() for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
        assert max(inline) < 1024 < entry["external_data"]["bytes"]  # every tensor of size lives outside the graph
        assert entry["parity"]["passed"]
    assert not list(out.glob(".*"))  # no scratch directories left behind
    jobs = PARITY_JOBS[TINY][:2]
    want, got = run_jobs(load_runtime(root / TINY, "torch"), jobs), run_jobs(OnnxRuntime(root / TINY, done), jobs)
    for a, b in zip(want, got):
        assert max_rel_error(b.latents, a.latents) <= PARITY["onnxruntime"]["latents_max_rel"]
    (out / external["decoder"]["external_data"]["file"]).unlink()
    assert not is_current(out, load_manifest(out), done.manifest["source"]["sha256"])


def test_changed_weights_make_the_export_stale(zoo):
    from safetensors.torch import load_file, save_file

    root, exports = zoo
    before = exports[STALE]
    again = ensure_onnx_export(root / STALE)  # nothing changed: the export is reused as it is
    assert again.manifest == before.manifest
    weights = load_file(root / STALE / "denoiser.safetensors")
    weights["proj_out.bias"] = weights["proj_out.bias"] + 0.5
    save_file(weights, root / STALE / "denoiser.safetensors")
    after = ensure_onnx_export(root / STALE)
    assert after.manifest["source"]["sha256"] != before.manifest["source"]["sha256"]
    assert after.manifest["graphs"]["denoiser"]["sha256"] != before.manifest["graphs"]["denoiser"]["sha256"]
    assert after.manifest["graphs"]["decoder"]["sha256"] == before.manifest["graphs"]["decoder"]["sha256"]


def test_an_export_made_before_the_encoder_graph_is_made_again(zoo, tmp_path, caplog):
    """An export of the previous format (three graphs, no encoder) is stale even with all its files in place:
    ``ensure_onnx_export`` makes a new one, with the encoder graph."""
    import os

    from models.export.manifest import EXPORT_FORMAT, fingerprint, stale_reason

    root, exports = zoo
    old = copy.deepcopy(exports[TINY].manifest)
    old["format"] = 1
    del old["graphs"]["encoder"], old["codec"]["native_head"]
    out = tmp_path / "onnx"
    out.mkdir()
    for entry in old["graphs"].values():
        os.link(exports[TINY].dir / entry["file"], out / entry["file"])
    (out / "manifest.json").write_text(json.dumps(old))
    assert stale_reason(out, old, fingerprint(root / TINY)) == f"export format 1 != {EXPORT_FORMAT}"
    with caplog.at_level(logging.INFO, logger="tta.export"):
        again = ensure_onnx_export(root / TINY, out)
    assert "export format 1" in caplog.text
    assert again.manifest["format"] == EXPORT_FORMAT and again.manifest["graphs"]["encoder"]["parity"]["passed"]
    assert (out / "encoder.onnx").is_file() and again.manifest["codec"]["native_head"] == {"stft": {"n_fft": 2048,
                                                                                                  "hop": 512}}


def test_an_export_without_an_encoder_graph_serves_no_audio_to_audio(zoo, text_encoder, tmp_path, monkeypatch):
    """An encoder that fails its checks leaves the export without an encoder graph (the manifest says why) instead
    of failing it; the runtime of such an export reports no audio-to-audio or inpainting, and refuses them."""
    from models.export import ExportError, OnnxExport, onnx_export
    from models.pipeline import Pipeline, RequestError, SampleRequest
    from service.runtimes.onnx_runtime import OnnxRuntime

    def fails(codec, path, *args, **kwargs):
        path.write_bytes(b"half a graph")
        raise ExportError("encoder: ONNX Runtime differs from PyTorch: max_rel 0.3 > 0.0001")

    monkeypatch.setattr(onnx_export, "export_encoder", fails)
    entry, reason = onnx_export._try_export_encoder(bundle(zoo, TINY, text_encoder).codec, tmp_path / "encoder.onnx",
                                                    8, onnx_export.OPSET)
    assert entry is None and "max_rel 0.3" in reason and not (tmp_path / "encoder.onnx").exists()
    ex = zoo[1][TINY]
    manifest = copy.deepcopy(ex.manifest)
    del manifest["graphs"]["encoder"], manifest["codec"]["native_head"]
    manifest["codec"]["no_encoder"] = reason
    rt = OnnxRuntime(zoo[0] / TINY, OnnxExport(ex.dir, manifest))
    p = Pipeline(rt)
    assert not rt.encodes_audio and p.modes == ["text-to-audio", "negative-prompt"]
    for mode in (dict(init_noise_level=0.5), dict(inpaint=(0.2, 0.4))):
        with pytest.raises(RequestError, match="does not support"):
            p.check(SampleRequest("x", 1.0, 2, 1.0, 0, init_audio=torch.zeros(2, 100), **mode))
    with pytest.raises(NotImplementedError, match="no audio encoder"):
        rt.encode_audio(torch.zeros(1, 2, 100))
    # with the encoder graph, but a denoiser trained with an inpainting input that its graph does not take
    rt = OnnxRuntime(zoo[0] / TINY, ex)
    assert rt.encodes_audio
    rt.config = dataclasses.replace(rt.config, inpaint_conditioning=True)
    assert not rt.encodes_audio and "inpainting" not in Pipeline(rt).modes


# ------------------------------------------------------------------------------------------ runtime selection
def test_registry_resolves_runtimes(zoo, monkeypatch, caplog):
    from pydantic import ValidationError

    from service.runtimes import (
        RUNTIMES,
        OnnxRuntime,
        TorchRuntime,
        load_runtime,
        resolve_runtime,
    )
    from service.settings import Settings

    assert RUNTIMES["onnxruntime"] is OnnxRuntime
    assert resolve_runtime("auto", "cpu") == "onnxruntime"
    assert resolve_runtime("auto", "cuda") == "torch"
    assert resolve_runtime("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown runtime"):
        resolve_runtime("tensorflow", "cpu")
    assert Settings(_env_file=None, runtime="onnxruntime").runtime == "onnxruntime"
    with pytest.raises(ValidationError):
        Settings(_env_file=None, runtime="tensorflow")
    assert isinstance(load_runtime(zoo[0] / TINY, "auto"), OnnxRuntime)
    # without onnxruntime: auto means torch, and asking for onnxruntime serves torch with a clear warning
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert resolve_runtime("auto", "cpu") == "torch"
    with caplog.at_level(logging.WARNING, logger="tta.runtimes"):
        rt = load_runtime(zoo[0] / TINY, "onnxruntime")
    assert isinstance(rt, TorchRuntime)
    assert "needs the 'onnxruntime' package" in caplog.text and "torch runtime instead" in caplog.text


# ------------------------------------------------------------------------------------------ one parity test for all
PARITY_JOBS = {
    TINY: [{"prompt": "a dog barks twice", "duration": 1.0, "steps": 4, "guidance": 3.0, "seed": 11},
           {"prompt": "rain on a tin roof", "duration": 0.6, "steps": 3, "guidance": 1.0, "seed": 12},
           {"prompt": "a violin plays a slow melody", "duration": 1.3, "steps": 4, "guidance": 6.5, "seed": 13}],
    TINY_ARC: [{"prompt": "a dog barks twice", "duration": 1.2, "steps": 4, "guidance": 1.0, "seed": 21},
               {"prompt": "thunder", "duration": 0.7, "steps": 2, "guidance": 1.0, "seed": 22}],
}


def _other_runtimes() -> list[str]:
    """Every runtime but torch and tensorrt, which needs TensorRT and a GPU (it has never been run here)."""
    from service.runtimes import RUNTIMES

    return [name for name in RUNTIMES if name not in ("torch", "tensorrt")]


@pytest.mark.parametrize("runtime", _other_runtimes())
@pytest.mark.parametrize("model", [TINY, TINY_ARC])
def test_runtime_matches_eager_torch(zoo, runtime, model):
    """Same seeds and prompts (guided and unguided samples of several lengths sharing each forward), eager torch vs
    the runtime, through the engine."""
    from service.runtimes import load_runtime

    candidate = load_runtime(zoo[0] / model, runtime)
    assert candidate.name == runtime
    assert_matches_torch(candidate, load_runtime(zoo[0] / model, "torch"), PARITY_JOBS[model])


def assert_matches_torch(candidate, reference, jobs: list[dict]) -> list:
    """``jobs`` through the engine on both runtimes: every sample's latents and audio within the candidate
    runtime's parity tolerance of eager torch's. Returns the candidate's results."""
    tol = PARITY[candidate.name]
    want, got = run_jobs(reference, jobs), run_jobs(candidate, jobs)
    for spec, a, b in zip(jobs, want, got):
        assert b.wave.shape == a.wave.shape == (2, round(spec["duration"] * SR))
        assert a.wave.abs().max() > 1e-3
        latents, rms, spectral = (max_rel_error(b.latents, a.latents), rms_rel_error(b.wave, a.wave),
                                  spectral_rel_error(b.wave, a.wave))
        shown = {k: spec[k] for k in ("guidance", "init_noise_level", "inpaint") if k in spec}
        print(f"{candidate.name} {candidate.model_name} {shown}: latents max_rel {latents:.2e}, audio rms_rel "
              f"{rms:.2e}, spectral_rel {spectral:.2e}")
        assert latents <= tol["latents_max_rel"], spec
        assert rms <= tol["audio_rms_rel"] and spectral <= tol["audio_spectral_rel"], spec
    return got


def test_onnxruntime_runs_audio_to_audio_and_inpainting_like_torch(zoo):
    """The modes that start from a clip, under ONNX Runtime: reported by the pipeline, and through the engine (an
    audio-to-audio sample guided and one not, an inpainting one and a plain one sharing every forward) the same
    latents and audio as eager torch, the init clip encoded by the encoder graph in one case and by the codec in
    the other."""
    from models.pipeline import Pipeline
    from service.runtimes import load_runtime

    candidate, reference = load_runtime(zoo[0] / TINY, "onnxruntime"), load_runtime(zoo[0] / TINY, "torch")
    assert candidate.name == "onnxruntime" and candidate.encodes_audio
    modes = ["text-to-audio", "audio-to-audio", "inpainting", "negative-prompt"]
    assert Pipeline(candidate).modes == Pipeline(reference).modes == modes
    clips = encoder_test_waves(2, round(1.2 * SR), SR, torch.Generator().manual_seed(6))
    direct = max_rel_error(candidate.encode_audio(clips), reference.encode_audio(clips))  # a batch of two
    assert direct <= TOLERANCES["encoder"]["max_rel"]
    clip = clips[0]
    jobs = [{"prompt": "a dog barks twice", "duration": 1.0, "steps": 4, "guidance": 3.0, "seed": 11,
             "init_audio": clip[:, : SR], "init_noise_level": 0.5},
            {"prompt": "rain on a tin roof", "duration": 1.2, "steps": 4, "guidance": 1.0, "seed": 12,
             "init_audio": clip, "init_noise_level": 0.3},
            {"prompt": "thunder", "duration": 1.2, "steps": 3, "guidance": 2.0, "seed": 13, "init_audio": clip,
             "inpaint": (0.4, 0.8)},
            {"prompt": "a dog barks twice", "duration": 1.0, "steps": 4, "guidance": 3.0, "seed": 11}]
    print(f"onnxruntime {TINY} encode_audio, batch of two: max_rel {direct:.2e}")
    got = assert_matches_torch(candidate, reference, jobs)
    assert (got[0].latents - got[3].latents).abs().max() > 0.1  # the init clip mattered: same seed, other result


# ------------------------------------------------------------------------------------------ CLI and service
def test_cli_export(zoo, capsys):
    from service.cli import main

    main(["export", "--format", "onnx", str(zoo[0] / TINY)])  # current: reported, not redone
    out = capsys.readouterr().out
    assert str(zoo[0] / TINY / "onnx") in out
    assert all(f in out for f in ("text_encoder.onnx", "denoiser.onnx", "decoder.onnx"))
    try:
        import tensorrt  # noqa: F401
    except ImportError:  # with the package, the build itself is the GPU suite's to check
        with pytest.raises(SystemExit, match="needs the 'tensorrt' package"):
            main(["export", "--format", "tensorrt", str(zoo[0] / TINY)])


def test_service_serves_with_onnxruntime(zoo, base_settings, text_encoder):
    settings = base_settings.model_copy(update={"model_dir": zoo[0], "models": TINY, "default_model": TINY,
                                                "runtime": "onnxruntime", "debug_faults": False})
    srv = LiveServer(settings)
    try:
        with srv.client() as c:
            models = c.get("/models").json()
            assert [(m["name"], m["runtime"]) for m in models] == [(TINY, "onnxruntime")]
            assert models[0]["modes"] == ["text-to-audio", "audio-to-audio", "inpainting", "negative-prompt"]
            r = c.post("/generate", json={"prompt": "a dog barks", "duration": 1.1, "steps": 3, "seed": 5})
            clip = io.BytesIO()
            sf.write(clip, encoder_test_waves(1, SR, SR, torch.Generator().manual_seed(1))[0].T.numpy(), SR,
                     format="WAV", subtype="PCM_16")
            a2a = c.post("/generate", json={"prompt": "a dog barks", "duration": 1.0, "steps": 3, "seed": 5,
                                            "init_noise_level": 0.5,
                                            "init_audio": base64.b64encode(clip.getvalue()).decode()})
        assert r.status_code == 200, r.text
        assert a2a.status_code == 200, a2a.text  # the default CPU runtime encodes an init clip too
        assert sf.read(io.BytesIO(a2a.content), dtype="int16")[0].shape == (SR, 2)
        data, sr = sf.read(io.BytesIO(r.content), dtype="int16")
        assert sr == SR and data.shape == (round(1.1 * SR), 2)
        assert srv.metric("tta_model_loaded", model=TINY, runtime="onnxruntime") == 1
    finally:
        srv.stop()
    ref = bundle(zoo, TINY, text_encoder).pipeline.generate(["a dog barks"], [1.1], [5], steps=3)[0]
    expected = (ref.clamp(-1, 1).numpy() * 32767).round()
    assert rms_rel_error(data.T.astype(np.float64), expected) <= PARITY["onnxruntime"]["audio_rms_rel"]


# ------------------------------------------------------------------------------------------ checkpoint directories
@pytest.fixture(scope="module")
def sao_tiny(tmp_path_factory):
    from models.checkpoints.sized import write_random_sao_small

    root = tmp_path_factory.mktemp("sao-export") / "sao-tiny"
    with float32_default():
        write_random_sao_small(root, scale="tiny", seed=7)
    return root


CHECKPOINT_JOBS = [{"prompt": "a dog barks twice", "duration": 0.016, "steps": 8, "guidance": 1.0, "seed": 31},
                   {"prompt": "rain on a tin roof", "duration": 0.01, "steps": 4, "guidance": 3.0, "seed": 32}]


def test_a_stable_audio_checkpoint_exports_and_runs_under_onnxruntime(sao_tiny):
    """The checkpoint's T5, its DiT with the conditioning adapter inside, and its Oobleck decoder as graphs; the
    serving config and the null condition travel in the manifest (the runtime loads no torch model). Guided rows use
    Stable Audio's zeroed condition in both runtimes."""
    done = export_onnx(sao_tiny)
    m = done.manifest
    assert m["checkpoint"]["format"] == "stable-audio-tools" and m["checkpoint"]["null_condition"] is True
    assert m["checkpoint"]["config"]["sampler"] == "pingpong" and m["text_encoder"]["number_freqs"] == 0
    assert all(g["parity"]["passed"] for g in m["graphs"].values())
    inputs = [i["name"] for i in m["graphs"]["denoiser"]["inputs"]]
    assert "pooled" not in inputs and {"z", "t", "tokens", "token_mask", "seconds", "frame_mask"} <= set(inputs)
    assert any(k.startswith("checkpoint/text_encoder/") for k in m["source"]["files"])
    compare_runtimes(sao_tiny, CHECKPOINT_JOBS)


def test_a_derived_model_exports_over_its_base(sao_tiny, tmp_path):
    from models.export.manifest import fingerprint

    out = derived_student(sao_tiny, tmp_path / "sao-tiny-student", 1.05, default_steps=4, sampler="ddim")
    before = fingerprint(out)
    assert any(k.startswith("base/") for k in before["files"]) and "checkpoint/derived.json" in before["files"]
    done = export_onnx(out)
    assert done.manifest["checkpoint"]["config"]["default_steps"] == 4
    compare_runtimes(out, [{**CHECKPOINT_JOBS[1], "steps": 4}])
    (out / "derived.json").write_text((out / "derived.json").read_text().replace('"default_steps": 4',
                                                                                  '"default_steps": 2'))
    assert fingerprint(out)["sha256"] != before["sha256"]  # a changed config makes the export stale


@pytest.mark.parametrize("form", [{}, {"values_only": True, "number_width": 2 * 4 + 2}])
def test_the_number_conditioners_are_exported(tmp_path, text_encoder, form):
    from models.dit import DiT, DiTConfig
    from models.export.onnx_export import export_denoiser
    from models.export.ort import session
    from models.text import load_text_encoder

    torch.manual_seed(4)
    encoder = load_text_encoder({"name": "minilm", "number_freqs": 4, "number_linear": True})
    dit = DiT(DiTConfig(width=32, depth=1, heads=2, text_dim=encoder.dim, pooled_dim=encoder.dim,
                        rhythm_frame_rate=SR / 2048, number_values=True, **form))
    fill_zero_parameters(dit, 0.05)
    entry = export_denoiser(dit, tmp_path / "denoiser.onnx")
    assert entry["parity"]["passed"]
    text = encoder.encode(["clicks at 1141 BPM", "a knock"])
    feed = {"z": np.ones((2, LATENT, 40), np.float32), "t": np.array([0.5, 0.5], np.float32),
            "tokens": text.tokens.numpy(), "token_mask": text.mask.numpy(), "pooled": text.pooled.numpy(),
            "seconds": np.array([2.0, 2.0], np.float32), "frame_mask": np.ones((2, 40), bool)}
    got = session(tmp_path / "denoiser.onnx").run(["out"], feed)[0]
    args = [torch.from_numpy(feed[k]) for k in ("z", "t", "tokens", "token_mask", "pooled", "seconds", "frame_mask")]
    with torch.no_grad():
        want = dit(*args)
        dit.values = None
        without_values = dit(*args)
        dit.rhythm = None
        without = dit(*args)
    assert max_rel_error(got, want) <= 1e-4
    # the stated value (split into several tokens) moves the outputs of its prompt, not those of the one without a
    # number; so, by the beat phase, does the rhythm conditioner
    for other in (without_values, without):
        assert (want[0] - other[0]).abs().max() > 1e-3 and torch.allclose(want[1], other[1], atol=1e-6)
    assert (without_values[0] - without[0]).abs().max() > 1e-3


def test_the_stable_audio_encoder_graph_matches_pytorch_and_serves_audio_to_audio(sao_tiny):
    """Oobleck's encoder is plain convolutions: the runtime only pads the clip to a whole latent frame. On new
    shapes it matches the codec; under ONNX Runtime the checkpoint serves audio-to-audio and inpainting as torch
    does."""
    from models.checkpoints import load_checkpoint_dir

    ex = ensure_onnx_export(sao_tiny)
    assert ex.manifest["codec"]["native_head"] == {} and ex.manifest["graphs"]["encoder"]["parity"]["passed"]
    codec = load_checkpoint_dir(sao_tiny).codec
    worst = encoder_errors(ex.path("encoder"), codec, ex.manifest["codec"]["native_head"], ((2, 37), (5, 128)),
                           seed=3)
    print(f"encoder, Stable Audio Open Small (tiny): max_rel {worst:.2e}")
    assert worst <= TOLERANCES["encoder"]["max_rel"]
    clip = encoder_test_waves(1, 128, codec.sample_rate, torch.Generator().manual_seed(4))[0]
    compare_runtimes(sao_tiny, [{**CHECKPOINT_JOBS[0], "init_audio": clip, "init_noise_level": 0.5},
                                {**CHECKPOINT_JOBS[1], "init_audio": clip[:, :80], "inpaint": (0.002, 0.006)}])


def test_the_tango_encoder_graph_matches_pytorch(tango, tmp_path):
    """The mel codec's encoder: resampling to 16 kHz, loudness normalisation and the STFT in torch before the graph;
    the mel projection, the log and the VAE encoder in it."""
    from models.export.onnx_export import export_encoder

    b = tango["bundle"]
    codec, frames = b.codec, b.latent_frames(b.config.max_duration)
    entry = export_encoder(codec, tmp_path / "encoder.onnx", frames)
    head = native_head(codec)
    assert head == {"mel": {"native_rate": 16000, "n_fft": 1024, "hop": 160, "frames_per_latent": 2}}
    spl = codec.samples_per_latent
    worst = encoder_errors(tmp_path / "encoder.onnx", codec, head, ((2, 5 * spl - 300), (4, 2000)), seed=5)
    print(f"encoder, Tango (tiny): max_rel {worst:.2e} (export check: {entry['parity']['max_rel']:.2e})")
    assert entry["parity"]["passed"] and worst <= TOLERANCES["encoder"]["max_rel"]


# ------------------------------------------------------------------------------------------ Stable Audio 3
@pytest.fixture(scope="module")
def sa3_tiny(tmp_path_factory):
    """``tta sized sa3-small --scale tiny``: Stable Audio 3 Small's structure (T5Gemma, the DiT with its trained
    inpainting input, SAME) at test size, 8 kHz, 16 samples per latent frame."""
    from models.checkpoints.sized import write_random_checkpoint

    root = tmp_path_factory.mktemp("sa3-export") / "sa3-tiny"
    with float32_default():
        write_random_checkpoint(root, "sa3-small", scale="tiny", seed=5)
    return root


def test_stable_audio_3_exports_split_at_the_request_and_serves_every_mode_like_torch(sa3_tiny):
    """Stable Audio 3's DiT exports as three graphs: the request's part (the conditioning's cross-attention keys and
    values, the duration's global embedding), the trained inpainting input's block embeddings and the step; the
    runtime runs the first two once per request. Under ONNX Runtime the checkpoint serves text-to-audio,
    audio-to-audio, inpainting and a guided row with a negative prompt, all sharing the engine's forwards, with the
    latents and audio of eager torch (the SAME encoder graph encoding the init clips)."""
    from models.export.graphs import CONTEXT_INPUTS, CONTEXT_OUTPUTS, STEP_INPUTS
    from models.pipeline import MODES, Pipeline
    from service.runtimes import load_runtime

    m = export_onnx(sa3_tiny).manifest
    assert list(m["graphs"]) == ["text_encoder", "context", "denoiser", "inpaint", "decoder", "encoder"]
    names = {g: ([i["name"] for i in e["inputs"]], [o["name"] for o in e["outputs"]]) for g, e in m["graphs"].items()}
    assert names["context"] == (CONTEXT_INPUTS, CONTEXT_OUTPUTS) and names["denoiser"] == (STEP_INPUTS, ["out"])
    assert names["inpaint"] == (["local_cond"], ["local"]) and m["graphs"]["denoiser"]["layout"] == "request-split"
    assert m["codec"]["native_head"] == {} and m["checkpoint"]["config"]["inpaint_conditioning"] is True
    for name, entry in m["graphs"].items():
        print(f"{name}: {entry['parity']}")
        assert entry["parity"]["passed"] and entry["parity"]["tolerance"] == TOLERANCES[name]
    candidate, reference = load_runtime(sa3_tiny, "onnxruntime"), load_runtime(sa3_tiny, "torch")
    assert candidate.name == "onnxruntime" and candidate.encodes_audio
    assert Pipeline(candidate).modes == Pipeline(reference).modes == list(MODES)
    rate = candidate.sample_rate
    clip = encoder_test_waves(1, 400, rate, torch.Generator().manual_seed(4))[0]
    jobs = [{"prompt": "a dog barks twice", "duration": 0.032, "steps": 8, "guidance": 1.0, "seed": 31},
            {"prompt": "rain on a tin roof", "duration": 0.02, "steps": 8, "guidance": 1.0, "seed": 32},
            {"prompt": "thunder", "duration": 0.032, "steps": 8, "guidance": 1.0, "seed": 33, "init_audio": clip,
             "init_noise_level": 0.6},
            {"prompt": "thunder", "duration": 0.04, "steps": 8, "guidance": 1.0, "seed": 34, "init_audio": clip,
             "inpaint": (0.008, 0.02)},
            {"prompt": "a dog barks twice", "duration": 0.032, "steps": 6, "guidance": 2.5, "seed": 35,
             "negative_prompt": "rain"}]
    tol = PARITY["onnxruntime"]
    want, got = run_jobs(reference, jobs), run_jobs(candidate, jobs)
    for spec, a, b in zip(jobs, want, got):
        assert b.wave.shape == a.wave.shape == (2, round(spec["duration"] * rate)) and a.wave.abs().max() > 1e-3
        latents, rms = max_rel_error(b.latents, a.latents), rms_rel_error(b.wave, a.wave)
        shown = {k: spec[k] for k in ("guidance", "init_noise_level", "inpaint") if k in spec}
        print(f"onnxruntime sa3-tiny {shown}: latents max_rel {latents:.2e}, audio rms_rel {rms:.2e}")
        assert latents <= tol["latents_max_rel"] and rms <= tol["audio_rms_rel"], spec
    assert (got[2].latents - got[0].latents).abs().max() > 0.1  # the init clip mattered
    # each request's part ran once per request, not per step (the guided row's batch is rebuilt at every step)
    assert candidate.request_cache.hits > 0 and candidate.local_cache.row_hits > 0
