"""The noised feature-moment sum a run's scaler was built from, and the check on it.

The server writes the sum next to the run's checkpoints
(:func:`fedguard.server.secure_metrics.write_moments`); export checks a rebuilt
run against it (the silos' data and the checkpoint's scaler must fit it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedguard.core.datasets import EncodedData, FeatureSchema
from fedguard.core.errors import DataError
from fedguard.core.feature_moments import moment_layout
from fedguard.core.preprocessing import FeatureScaler

__all__ = ["MOMENTS_FILENAME", "MOMENT_SIGMAS", "same_scaler", "scaler_reproduced"]

#: Where the server keeps the (noised) moment sum its scaler was built from.
MOMENTS_FILENAME = "feature-moments.json"
#: Exact moments farther than this many noise standard deviations from a run's noised
#: sum are other data (a false alarm is below 1e-8 a value).
MOMENT_SIGMAS = 6.0


def same_scaler(a: FeatureScaler, b: FeatureScaler) -> bool:
    return bool(
        np.allclose(a.mean, b.mean, rtol=1e-9, atol=0)
        and np.allclose(a.scale, b.scale, rtol=1e-9, atol=0)
    )


def scaler_reproduced(
    run_dir: Path, schema: FeatureSchema, train: Sequence[EncodedData], stored: FeatureScaler
) -> bool | None:
    """Whether ``train`` (the silos' rows, rebuilt) and ``stored`` fit the run's moments.

    The stored scaler must follow from the noised sum in ``run_dir``'s
    :data:`MOMENTS_FILENAME`, and the rows' exact moments must lie within
    :data:`MOMENT_SIGMAS` noise standard deviations of it (plus one rounding step
    a silo). ``None``: the folder has no moment file (a run from before it).

    Raises:
        DataError: the moment file is malformed.
    """
    layout = moment_layout(schema)
    if layout.num_features == 0:  # nothing is standardized: the identity scaler
        return same_scaler(FeatureScaler.identity(layout.schema.num_features), stored)
    path = Path(run_dir) / MOMENTS_FILENAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        noised = np.asarray(data["values"], dtype=np.float64)
        noise_std = float(data["noise_std"])
        rounding = int(data["contributors"]) * float(data["resolution"])
        derived = layout.scaler(noised, noise_std)
    except (ValueError, KeyError, TypeError, DataError) as bad:
        raise DataError(f"{path} is malformed: {bad}") from None
    exact = np.sum([layout.vector(part.features) for part in train], axis=0)
    return (
        noised.shape == exact.shape
        and bool(np.all(np.abs(noised - exact) <= MOMENT_SIGMAS * noise_std + rounding))
        and same_scaler(derived, stored)
    )
