"""Model weights as named numpy arrays, their Flower records, and update checks.

Weights travel as an ordered ``name -> float32 array`` mapping (``ModelWeights``).
Every array a peer sends is checked against the reference layout before it is
used: same names, same shapes, float32, finite. A failed check raises a typed
:class:`~fedguard.core.errors.UpdateRejectedError` whose ``reason`` goes to the
round log.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedguard.core.canonical import canonical_json
from fedguard.core.errors import NonFiniteUpdateError, ShapeMismatchError

ModelWeights = OrderedDict[str, np.ndarray]

WEIGHT_DTYPE = np.dtype(np.float32)


def _unwrapped_name(name: str) -> str:
    # Opacus's GradSampleModule prefixes every key with "_module."
    return name.removeprefix("_module.")


def model_weights(model: nn.Module) -> ModelWeights:
    """A detached float32 copy of a model's parameters and buffers."""
    return OrderedDict(
        (_unwrapped_name(k), v.detach().cpu().numpy().astype(WEIGHT_DTYPE, copy=True))
        for k, v in model.state_dict().items()
    )


def load_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load checked weights into a model (strict: every key must match)."""
    validate_weights(model_weights(model), weights)
    state = OrderedDict((k, torch.from_numpy(np.array(v, copy=True))) for k, v in weights.items())
    model.load_state_dict(state, strict=True)


def weights_to_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in weights.items()))


def record_to_weights(record: ArrayRecord) -> ModelWeights:
    return OrderedDict((k, record[k].numpy()) for k in record)


def validate_weights(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> None:
    """Raise unless ``candidate`` has exactly the reference layout and finite float32 values."""
    missing = [k for k in reference if k not in candidate]
    extra = [k for k in candidate if k not in reference]
    if missing or extra:
        raise ShapeMismatchError(
            f"tensor names differ from the global model: missing {missing}, unexpected {extra}"
        )
    for name, ref in reference.items():
        value = candidate[name]
        if not isinstance(value, np.ndarray):
            raise ShapeMismatchError(f"tensor {name!r} is a {type(value).__name__}, not an array")
        if value.shape != ref.shape:
            raise ShapeMismatchError(
                f"tensor {name!r} has shape {value.shape}, expected {ref.shape}"
            )
        if value.dtype != WEIGHT_DTYPE:
            raise ShapeMismatchError(f"tensor {name!r} has dtype {value.dtype}, expected float32")
        if not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).sum())
            raise NonFiniteUpdateError(f"tensor {name!r} holds {bad} NaN or Inf values")


def flatten_weights(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """All tensors as one float64 vector, in key order (for clipping and norms)."""
    if not weights:
        return np.zeros(0)
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in weights.values()])


def unflatten_weights(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> ModelWeights:
    """Inverse of :func:`flatten_weights` with the layout of ``like`` (float32 out)."""
    total = sum(v.size for v in like.values())
    if vector.shape != (total,):
        raise ShapeMismatchError(f"vector has shape {vector.shape}, expected ({total},)")
    out: ModelWeights = OrderedDict()
    offset = 0
    for name, ref in like.items():
        out[name] = vector[offset : offset + ref.size].reshape(ref.shape).astype(WEIGHT_DTYPE)
        offset += ref.size
    return out


def canonical_weights_bytes(weights: Mapping[str, np.ndarray]) -> bytes:
    """The bytes a model's content hash is taken over.

    For every tensor in *name* order: its name, dtype and shape as a canonical
    JSON header, then its raw little-endian C-order bytes (each part preceded by
    its length). The same weights give the same bytes whatever the key order,
    memory layout or byte order they are held in; any changed bit, dtype, shape or
    name gives other bytes.
    """
    out = io.BytesIO()
    for name in sorted(weights):
        array = np.asarray(weights[name])
        if array.dtype.hasobject:
            raise ShapeMismatchError(f"tensor {name!r} holds Python objects, not numbers")
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header = canonical_json(
            {"name": name, "dtype": little.dtype.str, "shape": list(little.shape)}
        )
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        data = np.ascontiguousarray(little).tobytes()
        out.write(len(data).to_bytes(8, "little"))
        out.write(data)
    return out.getvalue()


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
    """The content hash (hex SHA-256) of named tensors, independent of their order.

    The model registry addresses models by it, the audit log names models by it
    and each silo's log names the updates it sent by it.
    """
    return hashlib.sha256(canonical_weights_bytes(weights)).hexdigest()
