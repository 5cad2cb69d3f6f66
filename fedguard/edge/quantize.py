"""ONNX export with the feature scaler folded in, int8 quantization, and the int8 check.

Export
------
:class:`FoldedScalerModel` puts the federated :class:`FeatureScaler` (the run
checkpoint's ``scaler/mean`` and ``scaler/scale``) and the missing-value rule in
front of the network: ``z = (x - mean) / scale``, ``NaN -> 0`` (the mean), then
the reshape to the model's input shape. The exported graph therefore takes
*encoded* features, exactly the columns of :mod:`fedguard.core.datasets`, and an
edge device needs no preprocessing code. The standardization stays in float32
ahead of the quantized layers (folding it into the first layer's weights would put
features of very different raw ranges into one int8 scale). Export is
``torch.onnx.export(..., dynamo=True)`` with a dynamic batch axis; the exporter's
debugging metadata (stack traces, source paths) is stripped, and fedguard's
feature metadata (:data:`fedguard.edge.predict.METADATA_KEY`) is added.

Quantization
------------
onnxruntime post-training quantization, int8 weights (per output channel) and
uint8 activations:

* ``static-qoperator`` (the default for models with convolutions): QLinearConv /
  QGemm kernels, activation ranges fixed from calibration data. Static is
  required for convolutions: ``quantize_dynamic`` on convolutions runs 4–8×
  slower than fp32.
* ``static-qdq``: the same ranges as QuantizeLinear/DequantizeLinear pairs.
* ``dynamic`` (the default for MLPs): int8 weights, activation ranges measured
  per batch at run time, so it needs no calibration data at all.

Only Conv, Gemm and MatMul are quantized; the scaler, the NaN rule, pooling and
the output stay float.

Calibration data: synthetic, not silo records
---------------------------------------------
Static ranges are calibrated on **synthetic rows drawn from the federated feature
statistics** (:func:`synthetic_features`), or on the public transfer set when one
is given. Why this choice: the statistics (per-feature counts, sums and sums of
squares over all silos) are what every silo already sends the server to build
the shared scaler (:mod:`fedguard.core.preprocessing`), and the standardized
features' mean and scale are already embedded in the exported model; drawing
calibration rows from them needs no new message to any silo and never touches a
silo record. Silo records would leak: activation ranges are extremes, which are
determined by single outlying patients. DP-aggregated activation ranges would
also work but need an extra federated round and privacy budget. Limitation
(written into the model card): the statistics themselves are not DP-protected,
and the int8 ranges (like the folded scaler) are a function of them.

The int8 check
--------------
:func:`check_agreement` runs the fp32 and the int8 ONNX models on the same rows
and reports top-1 agreement, the maximum and mean absolute logit error; the
pipeline reports it on the synthetic rows and on each silo's held-out test split,
and fails with :class:`QuantizationCheckError` below ``min_top1_agreement``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedguard.core.datasets import FeatureSchema
from fedguard.core.errors import ConfigError
from fedguard.core.preprocessing import FeatureScaler, FeatureStatistics
from fedguard.core.seeding import numpy_rng
from fedguard.edge.errors import ExportError, MissingEdgeExtraError, QuantizationCheckError
from fedguard.edge.predict import METADATA_KEY, EdgeModel, ModelMetadata

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "AgreementReport",
    "FoldedScalerModel",
    "QuantMethod",
    "QuantizeConfig",
    "check_agreement",
    "export_onnx",
    "federated_statistics",
    "has_convolution",
    "quantize_onnx",
    "require_agreement",
    "scaled_for_model",
    "synthetic_features",
]

INPUT_NAME = "features"
OUTPUT_NAME = "logits"
_QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]
_MISSING_SUFFIX = "_missing"


class QuantMethod(StrEnum):
    AUTO = "auto"  # static-qoperator for models with convolutions, dynamic otherwise
    STATIC_QOPERATOR = "static-qoperator"
    STATIC_QDQ = "static-qdq"
    DYNAMIC = "dynamic"


@dataclass(frozen=True)
class QuantizeConfig:
    """How the student becomes int8."""

    method: QuantMethod = QuantMethod.AUTO
    calibration_rows: int = 512
    per_channel: bool = True
    min_top1_agreement: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.method, QuantMethod):
            raise ConfigError(f"quantization method must be a QuantMethod, got {self.method!r}")
        if (
            isinstance(self.calibration_rows, bool)
            or not isinstance(self.calibration_rows, int)
            or self.calibration_rows < 16
        ):
            raise ConfigError(
                f"calibration_rows must be an integer >= 16, got {self.calibration_rows!r}"
            )
        if not (
            isinstance(self.min_top1_agreement, (int, float))
            and 0.0 <= self.min_top1_agreement <= 1.0
        ):
            raise ConfigError(
                f"min_top1_agreement must lie in [0, 1], got {self.min_top1_agreement!r}"
            )

    def resolve(self, model: nn.Module) -> QuantMethod:
        """The concrete method for ``model`` (``auto`` decided by its layers)."""
        if self.method is not QuantMethod.AUTO:
            return self.method
        return QuantMethod.STATIC_QOPERATOR if has_convolution(model) else QuantMethod.DYNAMIC


def has_convolution(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in model.modules())


class FoldedScalerModel(nn.Module):
    """``model((where(isnan(x), mean, x) - mean) / scale)`` on encoded features ``x``."""

    mean: torch.Tensor
    inv_scale: torch.Tensor

    def __init__(self, model: nn.Module, scaler: FeatureScaler, input_shape: tuple[int, ...]):
        super().__init__()
        if scaler.num_features != math.prod(input_shape):
            raise ConfigError(
                f"the scaler has {scaler.num_features} features; the model's input shape "
                f"{input_shape} has {math.prod(input_shape)}"
            )
        self.model = model
        self.input_shape = tuple(input_shape)
        self.register_buffer("mean", torch.tensor(scaler.mean, dtype=torch.float32))
        self.register_buffer("inv_scale", torch.tensor(1.0 / scaler.scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) * self.inv_scale
        z = torch.where(torch.isnan(z), torch.zeros((), dtype=z.dtype), z)
        return self.model(z.reshape((-1, *self.input_shape)))  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- onnx helpers


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise MissingEdgeExtraError(
            "the edge export needs onnx, onnxruntime and onnxscript: pip install 'fedguard[edge]'"
        ) from None
    return onnx


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and quantizer's chatter (warnings and INFO logs)."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "root", "")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _minify_names(model_proto: Any) -> None:
    """Short tensor names (``t0``, ``t1``, ...) and no node names: a few hundred bytes less.

    The graph's input and output keep their names (callers feed them by name).
    """
    graph = model_proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        if name not in names:
            names[name] = f"t{len(names)}"
        return names[name]

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        node.name = ""
        for i, name in enumerate(node.input):
            node.input[i] = short(name)
        for i, name in enumerate(node.output):
            node.output[i] = short(name)


def _strip_and_tag(model_proto: Any, metadata: ModelMetadata) -> None:
    """Drop debugging metadata (stack traces, source paths); add fedguard's metadata."""
    if any(len(node.attribute) and _has_subgraph(node) for node in model_proto.graph.node):
        raise ExportError("edge models must be flat graphs (no control-flow subgraphs)")
    _minify_names(model_proto)
    used = {node.domain for node in model_proto.graph.node} | {"", "ai.onnx"}
    kept = [o for o in model_proto.opset_import if o.domain in used]
    del model_proto.opset_import[:]
    model_proto.opset_import.extend(kept)
    for node in model_proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*model_proto.graph.input, *model_proto.graph.output]:
        del value.metadata_props[:]
    del model_proto.graph.value_info[:]
    del model_proto.graph.metadata_props[:]
    model_proto.graph.doc_string = ""
    model_proto.doc_string = ""
    del model_proto.metadata_props[:]
    import json

    entry = model_proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(metadata.to_json(), sort_keys=True, separators=(",", ":"))


def _has_subgraph(node: Any) -> bool:
    return any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def export_onnx(
    model: nn.Module,
    scaler: FeatureScaler,
    schema: FeatureSchema,
    path: Path,
    *,
    precision_tag: str = "fp32",
) -> ModelMetadata:
    """Export ``model`` with the scaler folded in to ``path`` (fp32, dynamic batch)."""
    onnx = _onnx()
    metadata = ModelMetadata(
        dataset=schema.dataset,
        feature_names=schema.feature_names,
        class_names=schema.class_names,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        precision=precision_tag,
    )
    wrapper = FoldedScalerModel(model, scaler, schema.input_shape).eval()
    example = torch.zeros((4, schema.num_features), dtype=torch.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet(), tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.onnx"
            torch.onnx.export(
                wrapper,
                (example,),
                str(raw),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                verbose=False,
            )
            proto = onnx.load(str(raw))
    except MissingEdgeExtraError:
        raise
    except Exception as bad:  # the exporter raises many untyped errors
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {bad}") from bad
    _strip_and_tag(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return metadata


class _Calibration:
    """onnxruntime ``CalibrationDataReader`` over rows of encoded features."""

    def __init__(self, rows: np.ndarray, batch: int = 64) -> None:
        self._batches = iter(
            [
                {INPUT_NAME: np.ascontiguousarray(rows[i : i + batch], dtype=np.float32)}
                for i in range(0, rows.shape[0], batch)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_onnx(
    fp32_path: Path,
    int8_path: Path,
    method: QuantMethod,
    calibration: np.ndarray | None,
    per_channel: bool = True,
) -> ModelMetadata:
    """Quantize the fp32 edge model at ``fp32_path`` to int8 at ``int8_path``."""
    onnx = _onnx()
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise MissingEdgeExtraError(
            "int8 quantization needs onnxruntime: pip install 'fedguard[edge]'"
        ) from None
    if method is QuantMethod.AUTO:
        raise ConfigError("resolve QuantMethod.AUTO with QuantizeConfig.resolve() first")
    source = EdgeModel(fp32_path).metadata
    reader_class = type("CalibrationReader", (_Calibration, CalibrationDataReader), {})
    try:
        with _quiet(), tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            out = Path(tmp) / "int8.onnx"
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
            if method is QuantMethod.DYNAMIC:
                quantize_dynamic(
                    str(prepared),
                    str(out),
                    weight_type=QuantType.QInt8,
                    per_channel=per_channel,
                    op_types_to_quantize=_QUANTIZED_OPS,
                )
            else:
                if calibration is None or calibration.shape[0] == 0:
                    raise ConfigError("static quantization needs calibration rows")
                quantize_static(
                    str(prepared),
                    str(out),
                    reader_class(calibration),
                    quant_format=(
                        QuantFormat.QOperator
                        if method is QuantMethod.STATIC_QOPERATOR
                        else QuantFormat.QDQ
                    ),
                    per_channel=per_channel,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=_QUANTIZED_OPS,
                )
            proto = onnx.load(str(out))
    except ConfigError:
        raise
    except Exception as bad:
        raise ExportError(f"onnxruntime quantization ({method.value}) failed: {bad}") from bad
    metadata = ModelMetadata(
        dataset=source.dataset,
        feature_names=source.feature_names,
        class_names=source.class_names,
        input_name=source.input_name,
        output_name=source.output_name,
        precision="int8",
    )
    _strip_and_tag(proto, metadata)
    Path(int8_path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(int8_path))
    return metadata


# --------------------------------------------------------------------------- agreement


@dataclass(frozen=True)
class AgreementReport:
    """How closely the int8 model follows its fp32 source on ``rows`` inputs."""

    rows: int
    top1_agreement: float
    max_abs_logit_error: float
    mean_abs_logit_error: float

    def to_json(self) -> dict[str, float | int]:
        return {
            "rows": self.rows,
            "top1_agreement": self.top1_agreement,
            "max_abs_logit_error": self.max_abs_logit_error,
            "mean_abs_logit_error": self.mean_abs_logit_error,
        }


def check_agreement(fp32: EdgeModel, int8: EdgeModel, features: np.ndarray) -> AgreementReport:
    """Top-1 agreement and logit errors of ``int8`` against ``fp32`` on ``features``."""
    if features.shape[0] == 0:
        raise ConfigError("the agreement check needs at least one row")
    a = fp32.logits(features).astype(np.float64)
    b = int8.logits(features).astype(np.float64)
    error = np.abs(a - b)
    return AgreementReport(
        rows=int(features.shape[0]),
        top1_agreement=float((a.argmax(axis=1) == b.argmax(axis=1)).mean()),
        max_abs_logit_error=float(error.max()),
        mean_abs_logit_error=float(error.mean()),
    )


def require_agreement(report: AgreementReport, minimum: float, where: str) -> None:
    if report.top1_agreement < minimum:
        raise QuantizationCheckError(
            f"int8 model agrees with fp32 on only {report.top1_agreement:.3f} of {report.rows} "
            f"{where} rows (minimum {minimum:g}; max logit error "
            f"{report.max_abs_logit_error:.3g}); try --quantization static-qdq or more "
            f"calibration rows"
        )


# --------------------------------------------------------------------------- synthetic rows


def synthetic_features(
    stats: FeatureStatistics, schema: FeatureSchema, rows: int, seed: int
) -> np.ndarray:
    """Encoded rows drawn from the federated feature statistics (no silo record is used).

    The structure comes from the schema's feature names (fedguard's fixed encoding):

    * image data sets (3-D input): each pixel ~ N(mean, std²), clipped to [0, 1];
    * ``col=level`` features sharing ``col`` (one-hot): one level drawn with the
      federated level frequencies; rows in none of them are missing rows, marked in
      ``col_missing`` when the schema has it;
    * a single ``col=level`` (binary) or other unscaled 0/1 feature: Bernoulli(mean);
    * standardized numeric ``col``: N(mean, std²); when ``col_missing`` exists, NaN
      with the federated missing rate, and the indicator set to match.

    Features are independent apart from those couplings: the statistics hold no
    correlations. Returns float64 ``(rows, num_features)``, NaN = missing.
    """
    if stats.num_features != schema.num_features:
        raise ConfigError(
            f"statistics cover {stats.num_features} features; the schema has {schema.num_features}"
        )
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"rows must be an integer >= 1, got {rows!r}")
    rng = numpy_rng(seed, "edge-synthetic-features")
    count = stats.count
    safe = np.where(count > 0, count, 1.0)
    mean = np.where(count > 0, stats.total / safe, 0.0)
    std = np.sqrt(np.maximum(stats.total_squares / safe - mean**2, 0.0))
    names = schema.feature_names
    index = {name: j for j, name in enumerate(names)}
    out = np.zeros((rows, len(names)), dtype=np.float64)
    if len(schema.input_shape) == 3:
        out[:] = np.clip(rng.normal(mean, std, size=out.shape), 0.0, 1.0)
        return out
    done: set[int] = set()
    groups: dict[str, list[int]] = {}
    for j, name in enumerate(names):
        if "=" in name:
            groups.setdefault(name.split("=", 1)[0], []).append(j)
    for column, members in groups.items():
        indicator = index.get(column + _MISSING_SUFFIX)
        if len(members) == 1:
            j = members[0]
            out[:, j] = rng.random(rows) < np.clip(mean[j], 0.0, 1.0)
            done.add(j)
            continue
        probs = np.clip(mean[members], 0.0, None)
        none = max(0.0, 1.0 - float(probs.sum()))
        weights = np.append(probs, none)
        choice = rng.choice(len(weights), size=rows, p=weights / weights.sum())
        for k, j in enumerate(members):
            out[:, j] = choice == k
        done.update(members)
        if indicator is not None:
            out[:, indicator] = choice == len(members)
            done.add(indicator)
    for j, name in enumerate(names):
        if j in done or not schema.standardize[j]:
            continue
        out[:, j] = rng.normal(mean[j], std[j], size=rows)
        done.add(j)
        indicator = index.get(name + _MISSING_SUFFIX)
        if indicator is not None:
            missing = rng.random(rows) < np.clip(mean[indicator], 0.0, 1.0)
            out[missing, j] = np.nan
            out[:, indicator] = missing
            done.add(indicator)
    for j in range(len(names)):
        if j not in done:  # any other unscaled feature is 0/1 in fedguard's encodings
            out[:, j] = rng.random(rows) < np.clip(mean[j], 0.0, 1.0)
    return out


def scaled_for_model(
    scaler: FeatureScaler, schema: FeatureSchema, features: np.ndarray
) -> np.ndarray:
    """Encoded features → the float32, model-shaped input torch models take."""
    scaled = scaler.transform(features).reshape((-1, *schema.input_shape))
    return np.ascontiguousarray(scaled, dtype=np.float32)


def federated_statistics(parts: Mapping[str, FeatureStatistics]) -> FeatureStatistics:
    """The sum of the silos' statistics (what the server adds up for its scaler)."""
    return FeatureStatistics.sum(list(parts.values()))
