"""Export a model directory to ONNX: text encoder, denoiser, decoder and the codec's encoder (audio-to-audio and
inpainting), each checked by ``onnx.checker`` and compared with PyTorch through ONNX Runtime on inputs of other shapes
than the trace's (so the dynamic axes are exercised too). An export that misses a tolerance
(``models.export.parity``) is not written; only the encoder is optional: without it the export is written with no
encoder graph, and the manifest says why.

    export_onnx("models/zoo/tta-teacher")          # -> <model_dir>/onnx/{text_encoder,denoiser,decoder,encoder}.onnx
    ensure_onnx_export("models/zoo/tta-teacher")   # the same, unless a current export is already there

The TorchScript-based exporter (``dynamo=False``) is used: it needs no packages beyond torch and onnx.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.default_dtype import default_dtype
from models.export import parity
from models.export.graphs import (
    CONTEXT_INPUTS,
    CONTEXT_OUTPUTS,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    DENOISER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    INPAINT_INPUTS,
    INPAINT_OUTPUTS,
    PER_LENGTH_INPUTS,
    TEXT_INPUTS,
    TEXT_OUTPUTS,
    ContextGraph,
    DecoderGraph,
    DenoiserGraph,
    EncoderGraph,
    InpaintGraph,
    PerLengthDenoiserGraph,
    StepGraph,
    TextEncoderGraph,
    decoder_output_axes,
    encoder_input_axes,
    finish_native,
    native_head,
    native_tail,
    start_native,
)
from models.export.manifest import (
    EXPORT_FORMAT,
    MANIFEST,
    ExportError,
    export_dirs,
    file_sha256,
    fingerprint,
    graph_files,
    is_current,
    load_manifest,
    stale_reason,
    writable,
)
from models.export.ort import import_onnx, import_onnxruntime, per_length_call, request_split_call, session
from models.text.encoders import tokenize

log = logging.getLogger("tta.export")

OPSET = 17
PROTOBUF_LIMIT = 2**31  # bytes: one ONNX file (weights inside) cannot be larger
# graphs with more weight bytes than this keep them in one external file beside the graph (``<graph>.onnx.data``);
# the margin leaves room for the graph itself under the protobuf limit
EXTERNAL_DATA_BYTES = PROTOBUF_LIMIT - 2**27
VERIFY_PROMPTS = ["", "a dog barks", "rain on a tin roof, then thunder far away", "a 440 Hz sine tone on the left",
                  " ".join(["a long prompt that the tokenizer truncates"] * 12)]


@dataclass
class OnnxExport:
    dir: Path
    manifest: dict

    def path(self, graph: str) -> Path:
        return self.dir / self.manifest["graphs"][graph]["file"]


def _remainder_symbolic(g, a, b):
    """``torch.remainder`` as ONNX ``Mod(fmod=1)`` plus torch's sign rule. The exporter's own translation,
    a - floor(a / b) * b, loses digits for large arguments (0.4 rad at 5e6 rad where torch loses 0.14), and the
    codec wraps accumulated phases of that size; fmod is exact, so this matches torch bit for bit."""
    r = g.op("Mod", a, b, fmod_i=1)
    zero = g.op("Constant", value_t=torch.tensor(0.0))
    fix = g.op("And", g.op("Not", g.op("Equal", r, zero)),
               g.op("Not", g.op("Equal", g.op("Less", r, zero), g.op("Less", b, zero))))
    return g.op("Where", fix, g.op("Add", r, b), r)


def _cumsum_symbolic(g, x, dim, dtype):
    """``torch.cumsum`` of float32 accumulated in float64, as PyTorch's CPU kernel does (ONNX Runtime's CumSum
    accumulates in the input type). The codec integrates frequency tracks to phases of 1e5 rad and more, where a
    float32 running sum drifts by ~1e-7 relative, i.e. by radians once multiplied by a harmonic number."""
    from torch.onnx import symbolic_helper

    axis = g.op("Constant", value_t=torch.tensor(symbolic_helper._get_const(dim, "i", "dim"), dtype=torch.int64))
    if x.type().scalarType() != "Float":
        return g.op("CumSum", x, axis)
    wide = g.op("Cast", x, to_i=11)  # DOUBLE
    return g.op("Cast", g.op("CumSum", wide, axis), to_i=1)  # FLOAT


def _atan2_symbolic(g, y, x):
    """``torch.atan2`` with its values where the exporter's translation, Atan(y / x) moved by pi, has none or other
    ones: 0 / 0 (a silent bin; the default gives NaN, which the harmonic codec's analyser would carry into the
    pitch of every silent frame) and signed zeros (atan2(+-0, -0) = +-pi, atan2(y, -0) = +-pi / 2). A zero's sign is
    read from 1 / x. Elsewhere it is Atan(y / x), within a few float32 roundings of PyTorch's."""
    zero = g.op("Constant", value_t=torch.tensor(0.0))
    one = g.op("Constant", value_t=torch.tensor(1.0))
    pi = g.op("Constant", value_t=torch.tensor(math.pi))
    minus_pi = g.op("Constant", value_t=torch.tensor(-math.pi))

    def negative(v):  # v < 0, or v = -0
        return g.op("Or", g.op("Less", v, zero), g.op("Less", g.op("Div", one, v), zero))

    neg_x, half_turn = negative(x), g.op("Where", negative(y), minus_pi, pi)
    ratio = g.op("Atan", g.op("Div", y, x))
    out = g.op("Where", neg_x, g.op("Add", ratio, half_turn), ratio)
    both_zero = g.op("And", g.op("Equal", x, zero), g.op("Equal", y, zero))
    return g.op("Where", both_zero, g.op("Where", neg_x, half_turn, y), out)


_SYMBOLICS = {"aten::remainder": _remainder_symbolic, "aten::cumsum": _cumsum_symbolic,
              "aten::atan2": _atan2_symbolic}


@contextlib.contextmanager
def _custom_symbolics(opset: int):
    """Translations of ours, for this export only, where the exporter's default rounds differently from PyTorch."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    for name, fn in _SYMBOLICS.items():
        register_custom_op_symbolic(name, fn, opset)
    try:
        yield
    finally:
        for name in _SYMBOLICS:
            unregister_custom_op_symbolic(name, opset)


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _constants_to_initializers(model, min_bytes: int = 1024):
    """Move the top-level graph's large Constant tensors (constant folding makes them from weights, and the codec's
    tables are constants) into initializers, which are what external data holds."""
    graph = model.graph
    keep = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.t.ByteSize() >= min_bytes), None)
        if node.op_type != "Constant" or value is None:
            keep.append(node)
            continue
        value.name = node.output[0]
        graph.initializer.append(value)
    del graph.node[:]
    graph.node.extend(keep)
    return model


def _trace_to_onnx(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str],
                   output_names: list[str], dynamic_axes: dict, opset: int) -> None:
    """Trace ``module`` to ``path``. Weights over ``EXTERNAL_DATA_BYTES`` (Stable Audio Open 1.0's DiT: ~4 GiB of
    float32) go to one external file beside it, ``<path>.data``, which ONNX Runtime reads from the graph's
    directory: the exporter writes such a model as one file per tensor into a scratch directory, and the graph is
    re-saved from there with every tensor in one file."""
    module.eval()
    scratch = path.parent / f".trace-{path.stem}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        traced = scratch / path.name
        with torch.no_grad(), warnings.catch_warnings(), _custom_symbolics(opset):
            # the tracer warns about every Python-level branch on a shape; the parity checks on other shapes are
            # what tells whether a branch mattered
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # deliberate: the TorchScript exporter needs no onnxscript, and its graphs are checked below
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
            # strided slices (the DiT's rotary embedding) are computed at run time instead of folded: harmless
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1 can be constant folded")
            warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
            torch.onnx.export(module, args, str(traced), dynamo=False, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
        module.eval()  # the exporter restores the wrapper's training flag, which for a fresh wrapper is True
        onnx = import_onnx()
        # the exporter went external by itself when the serialised model would pass the protobuf limit
        if _weight_bytes(module) > EXTERNAL_DATA_BYTES or len(list(scratch.iterdir())) > 1:
            onnx.save_model(_constants_to_initializers(onnx.load(str(traced))), str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
        else:
            os.replace(traced, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    import_onnx().checker.check_model(str(path), full_check=True)


def _io_signature(path: Path) -> dict:
    """Input and output names, element types and shapes (named axes for dynamic ones) as the file declares them."""
    onnx = import_onnx()
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": shape})
        return out

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def _graph_entry(path: Path, errors: dict, graph: str, **extra) -> dict:
    ok = parity.within(graph, errors)
    entry = {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size, **_io_signature(path),
             "parity": {**errors, "tolerance": parity.TOLERANCES[graph], "passed": ok, **extra}}
    data = path.with_name(path.name + ".data")
    if data.is_file():
        entry["external_data"] = {"file": data.name, "sha256": file_sha256(data), "bytes": data.stat().st_size}
    if not ok:
        raise ExportError(f"{graph}: ONNX Runtime differs from PyTorch: {'; '.join(parity.failures(graph, errors))} "
                          f"(all measurements: {errors})")
    return entry


# ---------------------------------------------------------------------------------------------------- text encoder
def export_text_encoder(encoder, path: Path, opset: int = OPSET) -> dict:
    """``encoder``: an ``HFTextEncoder`` (tokenizer + transformers model). Compared with its ``encode_unpadded``."""
    graph = TextEncoderGraph(encoder.model, encoder.normalize_pooled).eval()
    example = encoder.tokenizer(["a dog barks twice", "rain"], padding=True, return_tensors="pt")
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
            "tokens": {0: "batch", 1: "length"}, "pooled": {0: "batch"}}
    _trace_to_onnx(graph, (example["input_ids"], example["attention_mask"]), path, TEXT_INPUTS, TEXT_OUTPUTS, axes,
                   opset)
    sess = session(path)
    batch, _ = tokenize(encoder.tokenizer, VERIFY_PROMPTS, encoder.numbers, encoder.max_length, "np")
    states, pooled = sess.run(TEXT_OUTPUTS, {k: batch[k] for k in TEXT_INPUTS})
    reference = encoder.encode_unpadded(VERIFY_PROMPTS)
    lengths = batch["attention_mask"].sum(1)
    # the number channels are appended in Python by every runtime
    base = encoder.dim - encoder.numbers.width
    got_t = torch.cat([torch.from_numpy(states[i, :n]) for i, n in enumerate(lengths)])
    want_t = torch.cat([t[:, :base] for t, _ in reference])
    got_p, want_p = torch.from_numpy(pooled), torch.stack([p[:base] for _, p in reference])
    errors = {"max_rel": parity.worst(parity.max_rel_error(got_t, want_t), parity.max_rel_error(got_p, want_p)),
              "max_abs": parity.worst(parity.max_abs_error(got_t, want_t), parity.max_abs_error(got_p, want_p))}
    return _graph_entry(path, errors, "text_encoder", checked_on=f"{len(VERIFY_PROMPTS)} prompts, one padded batch")


# ---------------------------------------------------------------------------------------------------- denoiser
@dataclass
class DenoiserSpec:
    """The shapes of the denoiser's inputs (from the bundle: the project's DiT and a checkpoint's adapter alike)."""

    latent_dim: int
    text_dim: int
    pooled_dim: int
    max_seconds: float
    takes_guidance: bool

    @classmethod
    def of(cls, bundle) -> DenoiserSpec:
        return cls(bundle.codec.latent_dim, bundle.text_encoder.dim, bundle.text_encoder.pooled_dim,
                   float(bundle.config.max_duration), bool(bundle.config.guidance_in_model))

    @classmethod
    def of_dit(cls, dit) -> DenoiserSpec:
        """The project's DiT carries its input shapes in its config."""
        c = dit.config
        return cls(c.latent_dim, c.text_dim, c.pooled_dim, float(c.max_seconds), bool(c.guidance_embed))


def _denoiser_inputs(spec: DenoiserSpec, batch: int, frames: int, length: int, generator: torch.Generator) -> tuple:
    """Random inputs with ragged token and frame masks: row 0 is full, the last row (of two or more) is cut short,
    so a network that branches in Python on "any padding?" is traced on its padded path."""
    z = torch.randn(batch, spec.latent_dim, frames, generator=generator)
    t = torch.rand(batch, generator=generator)
    tokens = torch.randn(batch, length, spec.text_dim, generator=generator)
    token_mask = torch.arange(length)[None] < torch.randint(1, length + 1, (batch,), generator=generator)[:, None]
    token_mask[0] = True
    pooled = torch.randn(batch, spec.pooled_dim, generator=generator)
    seconds = torch.rand(batch, generator=generator) * spec.max_seconds
    frame_mask = torch.arange(frames)[None] < torch.randint(1, frames + 1, (batch,), generator=generator)[:, None]
    frame_mask[0] = True
    if batch > 1 and frames > 1:
        frame_mask[-1, -1] = False
    args = (z, t, tokens, token_mask, pooled, seconds, frame_mask)
    if spec.takes_guidance:
        args += (1 + 4 * torch.rand(batch, generator=generator),)
    return args


def export_denoiser(dit, path: Path, spec: DenoiserSpec | None = None, opset: int = OPSET) -> dict:
    """Dynamic batch, frame and text-token axes; compared with the denoiser on two batches of other shapes than the
    trace's, with ragged frame and token masks. ``spec``: the input shapes (default: a project DiT's own)."""
    spec = spec or DenoiserSpec.of_dit(dit)
    if getattr(dit, "runs_per_length", False):
        return export_per_length_denoiser(dit, path, spec, opset)
    graph = DenoiserGraph(dit, spec.takes_guidance).eval()
    names = graph.input_names
    g = torch.Generator().manual_seed(0)
    axes = {"z": {0: "batch", 2: "frames"}, "t": {0: "batch"}, "tokens": {0: "batch", 1: "text_length"},
            "token_mask": {0: "batch", 1: "text_length"}, "pooled": {0: "batch"}, "seconds": {0: "batch"},
            "frame_mask": {0: "batch", 1: "frames"}, "guidance": {0: "batch"}, "out": {0: "batch", 2: "frames"}}
    axes = {k: v for k, v in axes.items() if k in names or k in DENOISER_OUTPUTS}
    _trace_to_onnx(graph, _denoiser_inputs(spec, 2, 8, 5, g), path, names, DENOISER_OUTPUTS, axes, opset)
    sess = session(path)
    kept = {i.name for i in sess.get_inputs()}  # inputs the network never reads are not in the graph

    def run_graph(args: tuple):
        return sess.run(DENOISER_OUTPUTS, {n: a.numpy() for n, a in zip(names, args) if n in kept})[0]

    worst = _denoiser_errors(spec, g, run_graph, graph)
    return _graph_entry(path, worst, "denoiser", checked_on=DENOISER_CHECKS)


DENOISER_CHECKS = "batch 3 x 13 frames x 9 tokens, batch 1 x 5 x 2, ragged frame and token masks"


def _denoiser_errors(spec: DenoiserSpec, g: torch.Generator, run_graph, reference) -> dict:
    """Worst errors of ``run_graph(args)`` against ``reference(*args)`` on the inputs ``DENOISER_CHECKS`` names
    (other shapes than the trace's)."""
    worst = {"max_rel": 0.0, "max_abs": 0.0}
    for batch, frames, length in ((3, 13, 9), (1, 5, 2)):
        args = _denoiser_inputs(spec, batch, frames, length, g)
        with torch.no_grad():
            got, want = run_graph(args), reference(*args)
        worst["max_rel"] = parity.worst(worst["max_rel"], parity.max_rel_error(got, want))
        worst["max_abs"] = parity.worst(worst["max_abs"], parity.max_abs_error(got, want))
    return worst


def export_per_length_denoiser(denoiser, path: Path, spec: DenoiserSpec, opset: int = OPSET) -> dict:
    """A denoiser that runs one forward per length (``PerLengthDenoiserGraph``): its fixed-length network with
    dynamic batch, frame and token axes; compared with the whole denoiser (loop over lengths and time conversion
    included) on ragged batches of other shapes than the trace's, the graph driven as the runtime drives it."""
    from models.checkpoints.denoisers import per_length

    graph = PerLengthDenoiserGraph(denoiser).eval()
    g = torch.Generator().manual_seed(0)
    z, t, tokens, token_mask = _denoiser_inputs(spec, 2, 8, 5, g)[:4]
    axes = {"z": {0: "batch", 2: "frames"}, "timestep": {0: "batch"}, "tokens": {0: "batch", 1: "text_length"},
            "token_mask": {0: "batch", 1: "text_length"}, "out": {0: "batch", 2: "frames"}}
    with torch.no_grad():
        example = (z, denoiser.model_time(t), tokens, token_mask)
    _trace_to_onnx(graph, example, path, PER_LENGTH_INPUTS, DENOISER_OUTPUTS, axes, opset)
    fixed_length = per_length_call(session(path))

    def run_graph(args: tuple):
        z, t, tokens, token_mask, frame_mask = args[0], args[1], args[2], args[3], args[6]
        return per_length(fixed_length, z, denoiser.model_time(t), tokens, token_mask, frame_mask)

    worst = _denoiser_errors(spec, g, run_graph, denoiser)
    entry = _graph_entry(path, worst, "denoiser", checked_on=DENOISER_CHECKS + " (one run per length)")
    return {**entry, "layout": "per-length"}


def export_request_split_denoiser(denoiser, out_dir: Path, spec: DenoiserSpec, opset: int = OPSET) -> dict:
    """A denoiser split at the request boundary (``splits_request_state``: Stable Audio 3) as three graphs, so that
    the runtime computes a request's part once (``RequestCache``) instead of at every step:
    ``context.onnx`` (``ContextGraph``: the conditioning's cross-attention keys and values and global embedding),
    ``inpaint.onnx`` (``InpaintGraph``: the trained inpainting input's block embeddings; none for a network without
    that input) and ``denoiser.onnx`` (``StepGraph``: one step from those). Each is checked against its own PyTorch
    part, and the three together, driven as the runtime drives them (zeros for a batch without inpainting), against
    the whole denoiser on ragged batches of other shapes than the trace's, with and without an inpainting input
    (rows of it all zero as well). Returns the manifest entries {"context", "denoiser", "inpaint"}; the denoiser's
    has layout "request-split"."""
    local_dim = int(getattr(denoiser, "local_cond_dim", 0))
    g = torch.Generator().manual_seed(0)
    z, t, tokens, token_mask, _, seconds, frame_mask = _denoiser_inputs(spec, 2, 8, 5, g)[:7]

    def local_input(batch: int, frames: int) -> torch.Tensor:
        local = torch.randn(batch, local_dim, frames, generator=g)
        local[-1] = 0.0  # a batch companion without inpainting (a plain request beside an inpainting one)
        return local

    text_axes = {"tokens": {0: "batch", 1: "text_length"}, "token_mask": {0: "batch", 1: "text_length"},
                 "seconds": {0: "batch"}, "keys": {1: "batch"}, "values": {1: "batch"}, "global_embed": {0: "batch"}}
    frame_axes = {"z": {0: "batch", 2: "frames"}, "t": {0: "batch"}, "frame_mask": {0: "batch", 1: "frames"},
                  "local_cond": {0: "batch", 2: "frames"}, "local": {1: "batch", 2: "frames"},
                  "out": {0: "batch", 2: "frames"}}
    axes = {**text_axes, **frame_axes}
    paths = {name: out_dir / f"{name}.onnx" for name in ("context", "inpaint", "denoiser")}
    with torch.no_grad():
        state = denoiser.request_state(tokens, token_mask, seconds)
        local = denoiser.local_embeddings(local_input(2, 8)) if local_dim else None
    _trace_to_onnx(ContextGraph(denoiser).eval(), (tokens, token_mask, seconds), paths["context"], CONTEXT_INPUTS,
                   CONTEXT_OUTPUTS, {k: v for k, v in text_axes.items()}, opset)
    if local_dim:
        _trace_to_onnx(InpaintGraph(denoiser).eval(), (local_input(2, 8),), paths["inpaint"], INPAINT_INPUTS,
                       INPAINT_OUTPUTS, {k: axes[k] for k in INPAINT_INPUTS + INPAINT_OUTPUTS}, opset)
    step = StepGraph(denoiser, with_local=bool(local_dim)).eval()
    _trace_to_onnx(step, (z, t, frame_mask, *state, *([local] if local_dim else [])), paths["denoiser"],
                   step.input_names, DENOISER_OUTPUTS, {k: axes[k] for k in step.input_names + DENOISER_OUTPUTS},
                   opset)
    sessions = {name: session(path) for name, path in paths.items() if path.is_file()}
    call = request_split_call(sessions["context"], sessions["denoiser"], sessions.get("inpaint"))
    errors = {name: {"max_rel": 0.0, "max_abs": 0.0} for name in sessions}

    def record(name: str, got, want) -> None:
        errors[name]["max_rel"] = parity.worst(errors[name]["max_rel"], parity.max_rel_error(got, want))
        errors[name]["max_abs"] = parity.worst(errors[name]["max_abs"], parity.max_abs_error(got, want))

    for batch, frames, length in ((3, 13, 9), (1, 5, 2)):
        z, t, tokens, token_mask, _, seconds, frame_mask = _denoiser_inputs(spec, batch, frames, length, g)[:7]
        local_cond = local_input(batch, frames) if local_dim else None
        with torch.no_grad():
            context = call.context(tokens, token_mask, seconds)
            for got, want in zip(context, denoiser.request_state(tokens, token_mask, seconds)):
                record("context", got, want)
            if local_dim:
                record("inpaint", call.inpaint(local_cond), denoiser.local_embeddings(local_cond))
            for lc in ([None, local_cond] if local_dim else [None]):
                local = call.inpaint(lc) if lc is not None else call.no_inpainting(z.shape[0], z.shape[-1])
                got = call.step(z, t, frame_mask, context, local)
                record("denoiser", got, denoiser(z, t, tokens, token_mask, None, seconds, frame_mask, local_cond=lc))
    checks = DENOISER_CHECKS + (", each with and without an inpainting input (one row of it all zero)"
                                if local_dim else "")
    out = {"context": {**_graph_entry(paths["context"], errors["context"], "context", checked_on=DENOISER_CHECKS),
                       "text_len": int(denoiser.text_len)}}  # what a request's context depends on (``context_rows``)
    out["denoiser"] = {**_graph_entry(paths["denoiser"], errors["denoiser"], "denoiser",
                                      checked_on=checks + "; the three graphs together against the whole denoiser"),
                       "layout": "request-split"}
    if local_dim:
        out["inpaint"] = _graph_entry(paths["inpaint"], errors["inpaint"], "inpaint", checked_on=checks)
    return out


# ---------------------------------------------------------------------------------------------------- decoder
def export_decoder(codec, path: Path, max_latent_frames: int, opset: int = OPSET) -> dict:
    """Dynamic batch and frame axes; the graph's output, finished as a runtime finishes it (``finish_native``), is
    compared with ``codec.decode`` on a short batch of two (sample by sample and on magnitudes) and at the model's
    maximum length (on magnitudes; see ``parity`` for why)."""
    graph = DecoderGraph(codec).eval()
    tail = native_tail(codec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # one eager call at the longest length first: lazily built tables (the codec's noise
        graph(torch.randn(1, codec.latent_dim, max_latent_frames, generator=g))  # phases) become graph constants
    axes = {"latents": {0: "batch", 2: "frames"}, DECODER_OUTPUTS[0]: decoder_output_axes(tail)}
    _trace_to_onnx(graph, (torch.randn(2, codec.latent_dim, 3, generator=g),), path, DECODER_INPUTS,
                   DECODER_OUTPUTS, axes, opset)
    sess = session(path)
    errors = {"spectral_rel": 0.0, "rms_rel_short": 0.0, "rms_rel": 0.0, "max_abs": 0.0}
    sensitivity = 0.0
    short = min(max_latent_frames, 11)
    for batch, frames in ((2, short), (1, max_latent_frames)):
        z = torch.randn(batch, codec.latent_dim, frames, generator=g)
        out = torch.from_numpy(sess.run(DECODER_OUTPUTS, {"latents": z.numpy()})[0])
        got = finish_native(out, tail, codec.sample_rate).numpy()
        with torch.no_grad():
            want = codec.decode(z)
            nudged = codec.decode(z * (1 + 1e-7 * torch.randn(z.shape, generator=g)))
        for i in range(batch):
            rms = parity.rms_rel_error(got[i], want[i])
            errors["rms_rel"] = parity.worst(errors["rms_rel"], rms)
            if frames == short:
                errors["rms_rel_short"] = parity.worst(errors["rms_rel_short"], rms)
            errors["spectral_rel"] = parity.worst(errors["spectral_rel"], parity.spectral_rel_error(got[i], want[i]))
            sensitivity = parity.worst(sensitivity, parity.rms_rel_error(nudged[i], want[i]))
        errors["max_abs"] = parity.worst(errors["max_abs"], parity.max_abs_error(got, want))
    return _graph_entry(path, errors, "decoder", float32_sensitivity=sensitivity,
                        checked_on=f"batch 2 x {short} latent frames (short), batch 1 x {max_latent_frames} "
                                   "(the maximum)")


# ---------------------------------------------------------------------------------------------------- encoder
def encoder_test_waves(batch: int, samples: int, sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """Stereo clips [batch, 2, samples] to check an encoder on: two tones at random pitches (100 Hz - 2 kHz), each
    panned at random, over a noise floor 40 dB down, the last 15 % silent (a clip's padded end). Tones give the
    harmonic codec's pitch analyser peaks to find; noise alone would leave its tonality at zero."""
    t = torch.arange(samples, dtype=torch.float64) / sample_rate
    clips = []
    for _ in range(batch):
        freq = 100 + 1900 * torch.rand(2, generator=generator, dtype=torch.float64)
        gain = (0.05 + 0.3 * torch.rand(2, 1, generator=generator, dtype=torch.float64)) * torch.rand(
            2, 2, generator=generator, dtype=torch.float64)  # [tone, channel]
        wave = (gain[:, :, None] * torch.sin(2 * math.pi * freq[:, None, None] * t)).sum(0)
        wave = wave + 0.005 * torch.randn(2, samples, generator=generator, dtype=torch.float64)
        wave[:, int(0.85 * samples):] = 0.0
        clips.append(wave.float())
    return torch.stack(clips)


def export_encoder(codec, path: Path, max_latent_frames: int, opset: int = OPSET) -> dict:
    """Dynamic batch and length axes; the graph, fed what a runtime feeds it (``start_native`` of a waveform), is
    compared with ``codec.encode`` on a batch of three short clips that end mid-frame and on one clip of the model's
    maximum length, both other shapes than the trace's."""
    graph = EncoderGraph(codec).eval()
    head = native_head(codec)
    rate, spl = codec.sample_rate, codec.samples_per_latent
    g = torch.Generator().manual_seed(2)

    def analysis(wave: torch.Tensor) -> torch.Tensor:
        return start_native(wave, head, rate, spl)

    axes = {ENCODER_INPUTS[0]: encoder_input_axes(head), ENCODER_OUTPUTS[0]: {0: "batch", 2: "frames"}}
    _trace_to_onnx(graph, (analysis(encoder_test_waves(2, 4 * spl, rate, g)),), path, ENCODER_INPUTS,
                   ENCODER_OUTPUTS, axes, opset)
    sess = session(path)
    errors = {"max_rel": 0.0, "max_abs": 0.0}
    short = min(max_latent_frames, 7)
    checks = ((3, short * spl - spl // 3), (1, max_latent_frames * spl))
    for batch, samples in checks:
        wave = encoder_test_waves(batch, samples, rate, g)
        got = sess.run(ENCODER_OUTPUTS, {ENCODER_INPUTS[0]: analysis(wave).numpy()})[0]
        with torch.no_grad():
            want = codec.encode(wave)
        if got.shape != tuple(want.shape):
            raise ExportError(f"encoder: the graph gives latents of shape {got.shape}, PyTorch {tuple(want.shape)} "
                              f"for {samples} samples")
        errors["max_rel"] = parity.worst(errors["max_rel"], parity.max_rel_error(got, want))
        errors["max_abs"] = parity.worst(errors["max_abs"], parity.max_abs_error(got, want))
    return _graph_entry(path, errors, "encoder", checked_on=", ".join(f"batch {b} x {n} samples" for b, n in checks)
                        + " (tones over noise, silent ends)")


def _try_export_encoder(codec, path: Path, max_latent_frames: int, opset: int) -> tuple[dict | None, str | None]:
    """(the encoder graph's manifest entry, None), or (None, why there is none). Unlike the other three graphs, an
    encoder that cannot be exported or misses its tolerance does not fail the export: the model is served without
    audio-to-audio and inpainting under ONNX Runtime (the runtime reports the modes it has) instead of not at all,
    and never with an encoder that computes something else than PyTorch's."""
    from models.codec.base import AudioCodec

    if type(codec).encode is AudioCodec.encode:
        return None, f"the codec {type(codec).__name__} has no encoder"
    try:
        return export_encoder(codec, path, max_latent_frames, opset), None
    except Exception as exc:  # noqa: BLE001 - any failure leaves the graph out, and says why
        path.unlink(missing_ok=True)
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("the codec's encoder is not exported (no audio-to-audio under ONNX Runtime): %s", reason)
        return None, reason


# ---------------------------------------------------------------------------------------------------- whole model
def load_for_export(bundle_dir: Path):
    """The model as the torch runtime loads it: a project model directory, or a checkpoint directory (Stable Audio
    and Tango formats, and models derived from them)."""
    from models.bundle import ModelBundle
    from models.checkpoints import is_checkpoint_dir, load_checkpoint_dir

    if not is_checkpoint_dir(bundle_dir):
        return ModelBundle.load(bundle_dir)
    return load_checkpoint_dir(bundle_dir)


def checkpoint_entry(bundle) -> dict:
    """What a runtime without the torch model needs to serve a checkpoint: its serving configuration (computed from
    the checkpoint's own files by its format's loader) and its unconditional input."""
    from models.checkpoints import CheckpointBundle

    if not isinstance(bundle, CheckpointBundle):
        return {}
    return {"checkpoint": {"format": bundle.source_format, "config": asdict(bundle.config),
                           "null_condition": bool(bundle.null_condition)}}


def text_encoder_fingerprint(source: dict, max_length: int, opset: int) -> str:
    """What the text-encoder graph depends on: its weights and tokenizer files, the code that defines it, opset."""
    parts = {k: v for k, v in source["files"].items() if k.startswith("text_encoder/")}
    parts.update({k: v for k, v in source["code"].items() if k in ("text/encoders.py", "export/graphs.py", "export/onnx_export.py")})
    blob = json.dumps({"format": EXPORT_FORMAT, "opset": opset, "max_length": max_length, "parts": parts},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _reuse_text_encoder(bundle_dir: Path, digest: str, target: Path) -> dict | None:
    """Models of one zoo usually share a text encoder: take a sibling's checked text-encoder graph with the same
    fingerprint (a hard link where possible) instead of exporting and checking the same graph again."""
    for manifest_path in sorted(bundle_dir.resolve().parent.glob("*/onnx/" + MANIFEST)):
        manifest = load_manifest(manifest_path.parent)
        if not manifest or manifest.get("text_encoder", {}).get("fingerprint") != digest:
            continue
        entry = manifest["graphs"]["text_encoder"]
        if entry.get("external_data"):  # an encoder of over 2 GiB is exported again rather than linked
            continue
        source = manifest_path.parent / entry["file"]
        if not source.is_file() or file_sha256(source) != entry["sha256"]:
            continue
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        return {**entry, "reused_from": manifest.get("model")}
    return None


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "onnx": import_onnx().__version__,
            "onnxruntime": import_onnxruntime().__version__, "transformers": transformers.__version__}


def export_onnx(bundle_dir: str | Path, out_dir: str | Path | None = None, opset: int = OPSET) -> OnnxExport:
    """Export the model in ``bundle_dir`` to ``out_dir`` (default ``<bundle_dir>/onnx``, or a user cache directory
    when that is not writable) and write ``manifest.json`` beside the graphs. Raises ``ExportError`` when a graph
    fails its checks; nothing is replaced then."""
    bundle_dir = Path(bundle_dir)
    if opset < 17:
        raise ExportError("opset 17 or later is required")
    import_onnx()
    import_onnxruntime()  # the parity checks run the graphs
    source = fingerprint(bundle_dir)
    if out_dir is None:
        out_dir = next((d for d in export_dirs(bundle_dir) if writable(d)), None)
        if out_dir is None:
            raise ExportError(f"no writable export directory among {[str(d) for d in export_dirs(bundle_dir)]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f".partial-{os.getpid()}-{time.monotonic_ns()}"
    partial.mkdir()
    t0 = time.perf_counter()
    try:
        with default_dtype(torch.float32):
            bundle = load_for_export(bundle_dir)
            encoder = bundle.text_encoder.encoder  # CachedTextEncoder -> HFTextEncoder (or a checkpoint's T5)
            max_frames = bundle.latent_frames(bundle.config.max_duration)
            te_digest = text_encoder_fingerprint(source, encoder.max_length, opset)
            graphs = {
                "text_encoder": (_reuse_text_encoder(bundle_dir, te_digest, partial / "text_encoder.onnx")
                                 or export_text_encoder(encoder, partial / "text_encoder.onnx", opset)),
            }
            if getattr(bundle.denoiser, "splits_request_state", False):
                graphs.update(export_request_split_denoiser(bundle.denoiser, partial, DenoiserSpec.of(bundle), opset))
            else:
                graphs["denoiser"] = export_denoiser(bundle.denoiser, partial / "denoiser.onnx",
                                                     DenoiserSpec.of(bundle), opset)
            graphs["decoder"] = export_decoder(bundle.codec, partial / "decoder.onnx", max_frames, opset)
            audio_encoder, no_encoder = _try_export_encoder(bundle.codec, partial / "encoder.onnx", max_frames,
                                                            opset)
            if audio_encoder is not None:
                graphs["encoder"] = audio_encoder
        codec = bundle.codec
        manifest = {
            "format": EXPORT_FORMAT,
            "model": bundle.config.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "export_seconds": round(time.perf_counter() - t0, 2),
            "opset": opset,
            "versions": _versions(),
            "source": source,
            "text_encoder": {"kind": encoder.kind, "max_length": encoder.max_length, "dim": encoder.dim,
                             "pooled_dim": encoder.pooled_dim, "normalize_pooled": encoder.normalize_pooled,
                             **encoder.numbers.to_config(),
                             "name": encoder.name, "fingerprint": te_digest},
            "codec": {"sample_rate": codec.sample_rate, "audio_channels": codec.audio_channels,
                      "latent_dim": codec.latent_dim, "samples_per_latent": codec.samples_per_latent,
                      # what the runtime applies to the decoder graph's output (``DecoderGraph``)
                      **native_tail(codec),
                      # what the runtime computes before the encoder graph (``EncoderGraph``), or why there is none
                      **({"native_head": native_head(codec)} if audio_encoder is not None
                         else {"no_encoder": no_encoder})},
            "limits": {"max_latent_frames": max_frames},
            **checkpoint_entry(bundle),
            "parity_metrics": {"max_rel": "max|onnx - torch| / max|torch|",
                               "rms_rel": "||onnx - torch|| / ||torch|| per clip (rms_rel_short: short clips only)",
                               "spectral_rel": "the same on STFT magnitudes (n_fft 2048, hop 512) per clip",
                               "float32_sensitivity": "rms_rel of torch's own decoder when its input latents "
                                                      "are perturbed by 1e-7 relative"},
            "graphs": graphs,
        }
        (out_dir / MANIFEST).unlink(missing_ok=True)  # no manifest names a mix of old and new graphs
        for entry in graphs.values():
            (out_dir / (entry["file"] + ".data")).unlink(missing_ok=True)  # an earlier export's external weights
            for name in graph_files(entry):
                os.replace(partial / name, out_dir / name)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(partial / MANIFEST, out_dir / MANIFEST)  # last: a manifest only ever names complete graphs
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("exported %s to %s in %.1f s", bundle_dir, out_dir, time.perf_counter() - t0,
             extra={"parity": {k: v["parity"] for k, v in graphs.items()}})
    return OnnxExport(out_dir, manifest)


def ensure_onnx_export(bundle_dir: str | Path, out_dir: str | Path | None = None) -> OnnxExport:
    """A current export of ``bundle_dir``: an existing one whose fingerprint matches the sources, else a new one."""
    bundle_dir = Path(bundle_dir)
    current = fingerprint(bundle_dir)
    candidates = [Path(out_dir)] if out_dir is not None else export_dirs(bundle_dir)
    for d in candidates:
        manifest = load_manifest(d)
        if is_current(d, manifest, current["sha256"]):
            return OnnxExport(d, manifest)
    first = candidates[0]
    log.info("exporting %s to ONNX: %s", bundle_dir.name, stale_reason(first, load_manifest(first), current))
    return export_onnx(bundle_dir, out_dir)
