"""ONNX export with the scaler folded in, int8 quantization, synthetic calibration rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedguard.core.config import DatasetName, PartitionSpec
from fedguard.core.datasets import schema_for
from fedguard.core.preprocessing import FeatureScaler, FeatureStatistics
from fedguard.core.silos import simulation_silos
from fedguard.edge.distill import StudentSpec
from fedguard.edge.predict import EdgeModel
from fedguard.edge.quantize import (
    FoldedScalerModel,
    QuantizeConfig,
    QuantMethod,
    check_agreement,
    export_onnx,
    quantize_onnx,
    scaled_for_model,
    synthetic_features,
)

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier


def _setup(name: DatasetName) -> tuple[FeatureStatistics, FeatureScaler, np.ndarray]:
    silos = simulation_silos(name, 2, PartitionSpec.parse("iid"), 0.2, seed=0)
    stats = FeatureStatistics.sum([FeatureStatistics.from_features(s.train) for s in silos])
    return stats, FeatureScaler.from_statistics(stats, silos[0].schema), silos[0].test.features


def test_folded_scaler_equals_the_federated_preprocessing() -> None:
    _, scaler, x = _setup(DatasetName.FLCHAIN)
    schema = schema_for(DatasetName.FLCHAIN)
    assert np.isnan(x).any()  # flchain has missing creatinine
    torch.manual_seed(0)
    student = StudentSpec().build(schema).eval()
    folded = FoldedScalerModel(student, scaler, schema.input_shape).eval()
    with torch.no_grad():
        a = folded(torch.from_numpy(x.astype(np.float32))).numpy()
        b = student(torch.from_numpy(scaled_for_model(scaler, schema, x))).numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "method"),
    [
        (DatasetName.DIGITS, QuantMethod.STATIC_QOPERATOR),
        (DatasetName.FLCHAIN, QuantMethod.DYNAMIC),
    ],
)
def test_export_and_int8_follow_torch(
    name: DatasetName, method: QuantMethod, tmp_path: Path
) -> None:
    stats, scaler, x = _setup(name)
    schema = schema_for(name)
    torch.manual_seed(0)
    student = StudentSpec().build(schema).eval()
    assert QuantizeConfig().resolve(student) is method
    fp32_path, int8_path = tmp_path / "m.onnx", tmp_path / "m8.onnx"
    export_onnx(student, scaler, schema, fp32_path)
    calibration = synthetic_features(stats, schema, 256, 0).astype(np.float32)
    quantize_onnx(fp32_path, int8_path, method, calibration)
    fp32, int8 = EdgeModel(fp32_path), EdgeModel(int8_path)
    with torch.no_grad():
        expected = student(torch.from_numpy(scaled_for_model(scaler, schema, x))).numpy()
    np.testing.assert_allclose(fp32.logits(x), expected, atol=1e-4)
    for rows in (1, 3, 300):  # the batch axis is dynamic
        assert int8.logits(x[:rows]).shape == (min(rows, len(x)), schema.num_classes)
    report = check_agreement(fp32, int8, x)
    assert report.rows == len(x) and report.top1_agreement >= 0.9
    assert 0 < report.max_abs_logit_error < 0.5
    assert int8_path.stat().st_size < fp32_path.stat().st_size or method is QuantMethod.DYNAMIC


def test_synthetic_rows_follow_the_federated_statistics() -> None:
    stats, _, _ = _setup(DatasetName.FLCHAIN)
    schema = schema_for(DatasetName.FLCHAIN)
    rows = synthetic_features(stats, schema, 20000, seed=3)
    names = list(schema.feature_names)
    mean = stats.total / stats.count
    got = np.nanmean(rows, axis=0)
    np.testing.assert_allclose(got, mean, rtol=0.05, atol=0.02)
    creatinine, indicator = names.index("creatinine"), names.index("creatinine_missing")
    assert np.array_equal(np.isnan(rows[:, creatinine]), rows[:, indicator] == 1)
    assert set(np.unique(rows[:, names.index("sex=M")])) <= {0.0, 1.0}
    again = synthetic_features(stats, schema, 20000, seed=3)
    np.testing.assert_array_equal(np.isnan(rows), np.isnan(again))
    digits_stats, _, _ = _setup(DatasetName.DIGITS)
    pixels = synthetic_features(digits_stats, schema_for(DatasetName.DIGITS), 100, seed=0)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0


def test_quantize_config_is_validated() -> None:
    from fedguard.core.errors import ConfigError

    for bad in ({"calibration_rows": 3}, {"min_top1_agreement": 1.5}, {"method": "dynamic"}):
        with pytest.raises(ConfigError):
            QuantizeConfig(**bad)  # type: ignore[arg-type]
