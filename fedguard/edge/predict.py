"""Torch-free inference with an exported fedguard edge model (``fedguard predict``).

This module imports only the standard library, numpy and onnxruntime (plus
:mod:`fedguard.edge.errors`, which imports only :mod:`fedguard.core.errors`), so
it runs on a device that has neither torch, pandas nor scikit-learn installed::

    pip install numpy onnxruntime
    fedguard predict student-int8.onnx patients.csv          # or:
    python -m fedguard.edge.predict student-int8.onnx patients.csv

Input CSV
---------
One row per record, **encoded features** (fedguard's fixed, data-independent
encoding of :mod:`fedguard.core.datasets`: one-hot columns ``col=level``, 0/1
binary columns, ``col_missing`` indicators, raw numeric values, digit pixels
divided by 16) under a header naming exactly the model's features, in any
order. The feature names are stored in the ONNX file's metadata (key
:data:`METADATA_KEY`) and in the sidecar ``MODEL.json`` next to it (both are
written by ``fedguard export``; the sidecar is used when the metadata is
absent, and they must agree when both exist). Numbers are *not* standardized:
the federated feature scaler is folded into the model. An empty cell, ``nan``
or ``NA`` marks a missing value, which the model imputes with the federated mean
exactly as training did.

Output CSV
----------
``row, prediction, class_index, p_<class>...``: the predicted class name, its
index and the softmax probability of every class.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fedguard.edge.errors import (
    EdgeError,
    MissingEdgeExtraError,
    ModelFileError,
    PredictInputError,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "EdgeModel",
    "ModelMetadata",
    "main",
    "read_feature_csv",
    "run_predict",
    "sidecar_path",
    "write_predictions",
]

#: Key of fedguard's JSON metadata inside the ONNX file's ``metadata_props``.
METADATA_KEY = "fedguard.edge"
FORMAT_VERSION = 1
_MISSING = {"", "nan", "na", "n/a", "null", "none"}
_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class ModelMetadata:
    """What a caller must know to feed an edge model: features in, classes out."""

    dataset: str
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    input_name: str
    output_name: str
    precision: str  # "fp32" or "int8"

    def __post_init__(self) -> None:
        if not self.feature_names or len(set(self.feature_names)) != len(self.feature_names):
            raise ModelFileError("model metadata needs unique, non-empty feature names")
        if len(self.class_names) < 2:
            raise ModelFileError("model metadata needs at least two class names")

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "feature_names": list(self.feature_names),
            "class_names": list(self.class_names),
            "input_name": self.input_name,
            "output_name": self.output_name,
            "precision": self.precision,
            "input": "encoded features, not standardized; empty cell or nan = missing",
        }

    @classmethod
    def from_json(cls, data: object, where: str) -> ModelMetadata:
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            version = data.get("format_version") if isinstance(data, dict) else None
            raise ModelFileError(
                f"{where}: unknown fedguard edge metadata version {version!r}; "
                f"this fedguard reads version {FORMAT_VERSION}"
            )
        try:
            return cls(
                dataset=str(data["dataset"]),
                feature_names=tuple(str(n) for n in data["feature_names"]),
                class_names=tuple(str(n) for n in data["class_names"]),
                input_name=str(data["input_name"]),
                output_name=str(data["output_name"]),
                precision=str(data["precision"]),
            )
        except (KeyError, TypeError) as bad:
            raise ModelFileError(f"{where}: malformed fedguard edge metadata ({bad})") from None


def sidecar_path(model_path: Path) -> Path:
    """``MODEL.json`` next to ``MODEL.onnx``."""
    return Path(model_path).with_suffix(".json")


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingEdgeExtraError(
            "fedguard predict needs onnxruntime: pip install onnxruntime numpy "
            "(or pip install 'fedguard[edge]')"
        ) from None
    return onnxruntime


class EdgeModel:
    """An exported fedguard model on onnxruntime's CPU provider."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"model file {path} does not exist")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise PredictInputError(f"threads must be an integer >= 0, got {threads!r}")
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (all cores)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as bad:  # onnxruntime raises its own untyped errors
            raise ModelFileError(f"onnxruntime cannot load {path}: {bad}") from None
        self.path = path
        self.metadata = _read_metadata(path, self._session)
        inputs = [i.name for i in self._session.get_inputs()]
        if inputs != [self.metadata.input_name]:
            raise ModelFileError(
                f"{path}: model inputs {inputs} do not match the metadata's "
                f"{self.metadata.input_name!r}"
            )

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.metadata.feature_names

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Logits of ``(n, num_features)`` encoded features (NaN = missing)."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise PredictInputError(
                f"features must have shape (n, {len(self.feature_names)}), got {x.shape}"
            )
        if np.isinf(x).any():
            raise PredictInputError("features hold infinite values")
        if x.shape[0] == 0:
            return np.zeros((0, len(self.metadata.class_names)), dtype=np.float32)
        parts = [
            self._session.run(
                [self.metadata.output_name],
                {self.metadata.input_name: np.ascontiguousarray(x[i : i + _CHUNK_ROWS])},
            )[0]
            for i in range(0, x.shape[0], _CHUNK_ROWS)
        ]
        return np.asarray(np.concatenate(parts), dtype=np.float32)

    def run_raw(self, features: np.ndarray) -> np.ndarray:
        """One unchecked onnxruntime call on float32 rows (for timing)."""
        return np.asarray(
            self._session.run([self.metadata.output_name], {self.metadata.input_name: features})[0]
        )

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return softmax(self.logits(features))

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.logits(features).argmax(axis=1), dtype=np.int64)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _read_metadata(path: Path, session: Any) -> ModelMetadata:
    embedded_text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    embedded = (
        ModelMetadata.from_json(_loads(embedded_text, str(path)), str(path))
        if embedded_text
        else None
    )
    sidecar_file = sidecar_path(path)
    sidecar = None
    if sidecar_file.is_file():
        sidecar = ModelMetadata.from_json(
            _loads(sidecar_file.read_text(encoding="utf-8"), str(sidecar_file)), str(sidecar_file)
        )
    if embedded is None and sidecar is None:
        raise ModelFileError(
            f"{path} has no fedguard feature metadata (ONNX metadata key {METADATA_KEY!r}) "
            f"and no sidecar {sidecar_file.name}; export models with fedguard export"
        )
    if embedded is not None and sidecar is not None and embedded != sidecar:
        raise ModelFileError(
            f"the feature metadata inside {path} and in {sidecar_file} differ; "
            "the sidecar belongs to another model"
        )
    result = embedded or sidecar
    if result is None:  # pragma: no cover - excluded above
        raise ModelFileError(f"{path}: no metadata")
    return result


def _loads(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except ValueError as bad:
        raise ModelFileError(f"{where}: fedguard edge metadata is not JSON: {bad}") from None


# --------------------------------------------------------------------------- CSV


def _parse_cell(text: str, row: int, column: str) -> float:
    cell = text.strip()
    if cell.lower() in _MISSING:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        raise PredictInputError(
            f"row {row}, column {column!r}: {text!r} is not a number (encoded features are "
            "numbers; leave the cell empty for a missing value)"
        ) from None
    if math.isinf(value):
        raise PredictInputError(f"row {row}, column {column!r}: infinite value {text!r}")
    return value


def read_feature_csv(source: Path | TextIO, feature_names: Sequence[str]) -> np.ndarray:
    """Encoded features from a CSV whose header names exactly ``feature_names``.

    Columns may come in any order; they are returned in ``feature_names`` order as
    float32 with NaN for missing cells. A missing, unknown or repeated column, a
    ragged row or a non-numeric cell raises :class:`PredictInputError` naming it.
    """
    if isinstance(source, Path | str):
        path = Path(source)
        if not path.is_file():
            raise PredictInputError(f"input file {path} does not exist")
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _read_rows(handle, feature_names, str(path))
    return _read_rows(source, feature_names, "input")


def _read_rows(handle: TextIO, feature_names: Sequence[str], where: str) -> np.ndarray:
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None:
        raise PredictInputError(f"{where} is empty; it needs a header row of feature names")
    header = [name.strip() for name in header]
    repeated = sorted({name for name in header if header.count(name) > 1})
    missing = [name for name in feature_names if name not in header]
    unknown = [name for name in header if name not in set(feature_names)]
    if repeated or missing or unknown:
        raise PredictInputError(
            f"{where}: the header must name exactly the model's {len(feature_names)} features "
            f"(any order); missing {missing}, unknown {unknown}, repeated {repeated}"
        )
    order = [header.index(name) for name in feature_names]
    rows: list[list[float]] = []
    for line, record in enumerate(_records(reader), start=2):
        if len(record) != len(header):
            raise PredictInputError(
                f"{where}, line {line}: {len(record)} cells for {len(header)} columns"
            )
        rows.append([_parse_cell(record[i], line, header[i]) for i in order])
    return np.asarray(rows, dtype=np.float32).reshape((len(rows), len(feature_names)))


def _records(reader: Iterator[list[str]]) -> Iterator[list[str]]:
    for record in reader:
        if record and any(cell.strip() for cell in record):
            yield record


def write_predictions(
    handle: TextIO, probabilities: np.ndarray, class_names: Sequence[str]
) -> None:
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(["row", "prediction", "class_index", *(f"p_{c}" for c in class_names)])
    for row, probs in enumerate(probabilities):
        index = int(np.argmax(probs))
        writer.writerow([row, class_names[index], index, *(f"{float(p):.6g}" for p in probs)])


def run_predict(
    model_path: Path, input_path: Path, output: Path | None = None, threads: int = 1
) -> np.ndarray:
    """Predict every row of ``input_path``; write the output CSV to ``output`` or stdout.

    Returns the predicted class indices.
    """
    model = EdgeModel(model_path, threads=threads)
    features = read_feature_csv(Path(input_path), model.feature_names)
    probabilities = model.predict_proba(features)
    buffer = io.StringIO()
    write_predictions(buffer, probabilities, model.metadata.class_names)
    if output is None:
        sys.stdout.write(buffer.getvalue())
    else:
        Path(output).write_text(buffer.getvalue(), encoding="utf-8")
    return np.asarray(probabilities.argmax(axis=1), dtype=np.int64)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of ``fedguard predict`` (added to ``parser`` when one is given)."""
    p = parser or argparse.ArgumentParser(
        prog="fedguard predict", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("model", type=Path, metavar="MODEL.onnx", help="an exported edge model")
    p.add_argument(
        "input",
        type=Path,
        metavar="INPUT.csv",
        help="encoded features, header = the model's feature names (any order)",
    )
    p.add_argument("--output", type=Path, default=None, metavar="OUT.csv", help="[default: stdout]")
    p.add_argument(
        "--threads", type=int, default=1, help="onnxruntime threads; 0 = all cores [default: 1]"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_predict(args.model, args.input, args.output, args.threads)
    except EdgeError as error:
        print(f"fedguard predict: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
