"""Integrated Gradients on real trained models: completeness, clipping, the silo vector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedguard.client.training import LocalData, train_non_private
from fedguard.core.config import DatasetName, LocalTrainingConfig, ModelSpec, PartitionSpec
from fedguard.core.datasets import SiloData
from fedguard.core.errors import ConfigError
from fedguard.core.models import build_model
from fedguard.core.preprocessing import FeatureScaler, FeatureStatistics
from fedguard.core.silos import simulation_silos
from fedguard.trust.explanations import (
    AttributionSettings,
    DataSplit,
    attribution_sensitivity,
    attribution_vector,
    clip_rows,
    explain_record,
    integrated_gradients,
)


def _trained(dataset: DatasetName) -> tuple[torch.nn.Module, FeatureScaler, SiloData, np.ndarray]:
    silos = simulation_silos(dataset, 3, PartitionSpec.parse("iid", min_silo_size=20), 0.2, 0)
    schema = silos[0].schema
    stats = FeatureStatistics.sum([FeatureStatistics.from_features(s.train) for s in silos])
    scaler = FeatureScaler.from_statistics(stats, schema)
    torch.manual_seed(0)
    model = build_model(schema, ModelSpec())
    x = scaler.transform(silos[0].train.features).reshape((-1, *schema.input_shape))
    training = LocalTrainingConfig(local_epochs=3, batch_size=32, learning_rate=0.1)
    train_non_private(model, LocalData(x, silos[0].train.labels), training, seed=0)
    return model.eval(), scaler, silos[0], x


@pytest.fixture(scope="module")
def breast_cancer() -> tuple[torch.nn.Module, FeatureScaler, SiloData, np.ndarray]:
    return _trained(DatasetName.BREAST_CANCER)


def test_completeness_binary_log_odds(breast_cancer: tuple) -> None:
    model, _, _, x = breast_cancer
    x = x[:60]
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double()
        base = model(torch.zeros(1, x.shape[1])).double()
    f_x = (logits[:, 1] - logits[:, 0]).numpy()
    f_0 = float(base[0, 1] - base[0, 0])
    errors = {}
    for steps in (16, 64, 256):
        result = integrated_gradients(model, x, 2, steps=steps)
        np.testing.assert_allclose(result.output, f_x, rtol=1e-6, atol=1e-5)
        gap = np.abs(result.attributions.sum(axis=1) - (f_x - f_0))
        errors[steps] = float(gap.max())
        # Captum's convergence delta is the same quantity.
        np.testing.assert_allclose(np.abs(result.delta), gap, atol=1e-4)
    # The model is far from constant (the test is not vacuous) ...
    assert np.abs(f_x - f_0).mean() > 1.0
    # ... completeness holds to 2% of the explained difference at 256 steps ...
    assert errors[256] <= 0.02 * np.abs(f_x - f_0).max()
    # ... and the integration error falls with the number of steps.
    assert errors[256] < errors[64] < errors[16]


def test_completeness_multiclass_predicted_class() -> None:
    model, _, _, x = _trained(DatasetName.DIGITS)
    x = x[:40]
    result = integrated_gradients(model, x, 10, steps=64)
    with torch.no_grad():
        log_p = torch.log_softmax(model(torch.from_numpy(x)), dim=1).double()
        log_p0 = torch.log_softmax(model(torch.zeros_like(torch.from_numpy(x[:1]))), dim=1)
    predicted = log_p.argmax(dim=1).numpy()
    np.testing.assert_array_equal(result.targets, predicted)
    explained = log_p.numpy()[np.arange(len(x)), predicted]
    baseline = log_p0.double().numpy()[0, predicted]
    gap = np.abs(result.attributions.sum(axis=1) - (explained - baseline))
    assert result.attributions.shape == (40, 64)
    assert gap.max() <= 0.1 * np.abs(explained - baseline).max()


def test_clip_rows_bounds_a_huge_record_and_keeps_small_ones() -> None:
    small = np.array([[0.3, -0.4], [0.0, 0.0]])
    huge = np.array([[3e6, -4e6]])
    clipped = clip_rows(np.vstack([small, huge]), 1.0)
    np.testing.assert_array_equal(clipped[:2], small)
    assert np.linalg.norm(clipped[2]) == pytest.approx(1.0)
    np.testing.assert_allclose(clipped[2], [0.6, -0.8])
    # One record, however extreme, moves the sum by at most C.
    with_huge = clipped.sum(axis=0)
    without = clip_rows(small, 1.0).sum(axis=0)
    assert np.linalg.norm(with_huge - without) <= 1.0 + 1e-12
    with pytest.raises(ConfigError):
        clip_rows(np.array([[np.inf, 0.0]]), 1.0)
    with pytest.raises(ConfigError):
        clip_rows(small, 0.0)


def test_silo_vector_sensitivity_on_a_real_model(breast_cancer: tuple) -> None:
    model, _, _, x = breast_cancer
    settings = AttributionSettings(clip_norm=1.5, steps=16)
    full = attribution_vector(model, x, 2, settings)
    d = x.shape[1]
    assert full.shape == (2 * d + 1,)
    assert full[-1] == len(x)
    assert (full[:d] >= np.abs(full[d : 2 * d]) - 1e-12).all()  # Σ|c| ≥ |Σc|
    # Remove any one record: the vector moves by at most sqrt(2C² + 1) (the other
    # records' float32 attributions may change in the last bits with the batch).
    sensitivity = attribution_sensitivity(1.5)
    assert sensitivity == pytest.approx(math.sqrt(2 * 1.5**2 + 1))
    for drop in (0, 7, len(x) - 1):
        rest = attribution_vector(model, np.delete(x, drop, axis=0), 2, settings)
        assert np.linalg.norm(full - rest) <= sensitivity + 1e-5
    # The records are really clipped (attributions of this model exceed C), so the
    # bound is not met by accident.
    raw = integrated_gradients(model, x, 2, steps=16).attributions
    assert (np.linalg.norm(raw, axis=1) > 1.5).mean() > 0.5


def test_local_explanation_of_one_record(breast_cancer: tuple) -> None:
    model, scaler, silo, _ = breast_cancer
    row = silo.test.features[3]
    explanation = explain_record(model, scaler, silo.schema, row, steps=128)
    assert explanation.predicted_class in silo.schema.class_names
    assert explanation.probabilities.sum() == pytest.approx(1.0)
    total = explanation.attributions.sum()
    assert total == pytest.approx(explanation.output - explanation.baseline_output, abs=0.05)
    ranked = explanation.ranked()
    assert [abs(a) for _, _, a in ranked] == sorted((abs(a) for _, _, a in ranked), reverse=True)
    assert "prediction:" in explanation.render(top=5)
    assert len(explanation.to_json(top=5)["features"]) == 5
    with pytest.raises(ConfigError, match="features"):
        explain_record(model, scaler, silo.schema, row[:-1])


def test_settings_from_options_round_trip_and_validation() -> None:
    settings = AttributionSettings(clip_norm=2.0, steps=20, split=DataSplit.TEST)
    assert AttributionSettings.from_options(settings.to_options()) == settings
    assert AttributionSettings.from_options({}) == AttributionSettings()
    with pytest.raises(ConfigError, match="split"):
        AttributionSettings.from_options({"attribution-split": "validation"})
    with pytest.raises(ConfigError):
        AttributionSettings(clip_norm=-1.0)
    with pytest.raises(ConfigError):
        AttributionSettings(steps=0)
