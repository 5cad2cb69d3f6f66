"""Typed errors of the edge path (distillation, ONNX export, quantization, prediction).

Torch-free on purpose: :mod:`fedguard.edge.predict` raises these in an environment
that has only numpy and onnxruntime.
"""

from __future__ import annotations

from fedguard.core.errors import ConfigError, FedguardError, RunFolderError

__all__ = [
    "EdgeError",
    "ExportError",
    "MissingEdgeExtraError",
    "ModelFileError",
    "PredictInputError",
    "QuantizationCheckError",
    "RunFolderError",  # raised by fedguard.runs.saved; listed here for export's callers
]


class EdgeError(FedguardError):
    """Base class of the edge path's errors."""


class ExportError(EdgeError):
    """Exporting or quantizing a model to ONNX failed."""


class QuantizationCheckError(ExportError):
    """The int8 model disagrees with its fp32 source beyond the configured tolerance."""


class ModelFileError(EdgeError):
    """An ONNX model file is missing, unreadable, or lacks fedguard's feature metadata."""


class PredictInputError(EdgeError, ConfigError):
    """An input CSV for ``fedguard predict`` does not fit the model's features."""


class MissingEdgeExtraError(EdgeError, ImportError):
    """onnx / onnxruntime / onnxscript are not installed (``pip install 'fedguard[edge]'``)."""
