"""Export: a model directory -> ONNX graphs (text encoder, denoiser, decoder, encoder) with a manifest, for the
ONNX Runtime serving runtime, and TensorRT engines built from those graphs (``tensorrt``). See ``onnx_export`` for
the procedure, ``parity`` for the tolerances and ``manifest`` for when an export counts as current."""
from models.export.manifest import ExportError, fingerprint, load_manifest
from models.export.onnx_export import OPSET, OnnxExport, ensure_onnx_export, export_onnx
from models.export.ort import MissingPackage, onnxruntime_available
from models.export.parity import TOLERANCES

__all__ = [
           "OPSET",
           "TOLERANCES",
           "ExportError",
           "MissingPackage",
           "OnnxExport",
           "ensure_onnx_export",
           "export_onnx",
           "fingerprint",
           "load_manifest",
           "onnxruntime_available",
]
