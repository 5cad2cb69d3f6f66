"""Global attributions through the secure DP statistic (in-process engine, 3 silos)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedguard.audit.chain import read_records
from fedguard.client.app import make_client_app
from fedguard.client.silo import SiloSettings
from fedguard.client.training import LocalData, train_non_private
from fedguard.core.config import LocalTrainingConfig, ModelSpec
from fedguard.core.datasets import schema_for
from fedguard.core.errors import FedguardError
from fedguard.core.models import build_model
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.serialization import load_weights, model_weights, record_to_weights
from fedguard.core.trust_config import TrustNoise
from fedguard.privacy.analysis.release import release_epsilon
from fedguard.privacy.events import GaussianRelease
from fedguard.privacy.ledger import ChargePurpose, LedgerEntry, PrivacyLedger
from fedguard.server.secure_round import SecAggIdentities
from fedguard.server.statistic_collection import (
    SecureStatisticResult,
    collect_secure_statistic,
    grid_send,
)
from fedguard.simulation.inprocess import InProcessGrid
from fedguard.trust.explanations import AttributionSettings, attribution_statistic
from fedguard.trust.results import (
    ReleaseCost,
    attribution_from_sum,
    attribution_vector_length,
)
from fedguard.trust.silo_statistics import SILO_AND_TRUST_PRODUCERS
from fedguard.wire.statistics import StatisticKind
from tests.factories import (
    DATASET,
    consortium_identities,
    instruction,
    local_scaler,
    silo_settings,
)

SILOS = 3
SETTINGS = AttributionSettings(clip_norm=1.0, steps=16)


def _setup(tmp_path: Path) -> tuple[InProcessGrid, list[SiloSettings], FeatureScaler, RecordDict]:
    settings = [silo_settings(tmp_path, i) for i in range(SILOS)]
    scaler = local_scaler(settings[0])
    silo = settings[0].data.load()
    torch.manual_seed(0)
    model = build_model(schema_for(DATASET), ModelSpec())
    x = scaler.transform(silo.train.features)
    training = LocalTrainingConfig(local_epochs=3, batch_size=32, learning_rate=0.1)
    train_non_private(model, LocalData(x, silo.train.labels), training, seed=0)
    content = instruction(0, model_weights(model), scaler).content
    app = make_client_app(
        lambda context: settings[int(str(context.node_config["partition-id"]))],
        allow_non_private=True,
        producers=SILO_AND_TRUST_PRODUCERS,
    )
    return InProcessGrid(app, SILOS), settings, scaler, content


def _local_vectors(
    settings: list[SiloSettings], scaler: FeatureScaler, content: RecordDict
) -> list[np.ndarray]:
    model = build_model(schema_for(DATASET), ModelSpec())
    load_weights(model, record_to_weights(content["arrays"]))  # type: ignore[arg-type]
    return [
        attribution_statistic(s.data.load(), model, scaler, SETTINGS.to_options()).values
        for s in settings
    ]


def _collect(
    grid: InProcessGrid,
    content: RecordDict,
    noise: TrustNoise,
    identities: SecAggIdentities,
    query_round: int = 0,
) -> SecureStatisticResult:
    return collect_secure_statistic(
        grid_send(grid, "explain"),
        list(grid.get_node_ids()),
        StatisticKind.ATTRIBUTION,
        instruction=content,
        vector_length=attribution_vector_length(schema_for(DATASET).num_features),
        query_round=query_round,
        target_epsilon=1.0,
        noise=noise,
        options=SETTINGS.to_options(),
        identities=identities,
    )


def test_secure_sum_without_noise_equals_the_silos_local_sums(tmp_path: Path) -> None:
    grid, settings, scaler, content = _setup(tmp_path)
    result = _collect(grid, content, TrustNoise.NONE, consortium_identities(tmp_path, SILOS))
    expected = np.sum(_local_vectors(settings, scaler, content), axis=0)
    assert len(result.contributors) == SILOS
    # The count is exact; the real sums are rounded (unbiasedly) to 2^-12 per silo.
    assert result.values[-1] == expected[-1] == sum(len(s.data.load().train) for s in settings)
    np.testing.assert_allclose(result.values[:-1], expected[:-1], atol=SILOS * 2.0**-12)
    assert np.abs(expected[:-1]).max() > 1.0  # not a sum of zeros
    mean = attribution_from_sum(
        result.values,
        schema_for(DATASET).feature_names,
        model="global",
        clip_norm=1.0,
        steps=16,
        output="",
        cost=ReleaseCost(epsilon=math.inf, delta=0.0, noise_multiplier=0.0, contributors=SILOS),
    )
    d = schema_for(DATASET).num_features
    importance = expected[:d] / expected[-1]
    assert mean.features[0].mean_abs_attribution == pytest.approx(importance.max(), abs=1e-4)
    assert mean.features[0].feature == schema_for(DATASET).feature_names[importance.argmax()]
    # No silo was charged for an un-noised release.
    for s in settings:
        if (s.state_dir / PrivacyLedger.FILENAME).exists():
            assert not any(e.purpose is ChargePurpose.ATTRIBUTION for e in _entries(s))


def _entries(s: SiloSettings) -> list[LedgerEntry]:
    with PrivacyLedger.open(s.state_dir, s.silo_id, s.budget) as ledger:
        return ledger.entries()


def test_noised_release_is_charged_once_to_every_ledger(tmp_path: Path) -> None:
    grid, settings, scaler, content = _setup(tmp_path)
    result = _collect(grid, content, TrustNoise.GAUSSIAN, consortium_identities(tmp_path, SILOS))
    expected = np.sum(_local_vectors(settings, scaler, content), axis=0)
    for s in settings:
        charges = [e for e in _entries(s) if e.purpose is ChargePurpose.ATTRIBUTION]
        assert len(charges) == 1
        assert isinstance(charges[0].event, GaussianRelease)
        sigma = charges[0].event.noise_multiplier
        assert release_epsilon(sigma, s.budget.delta, 1) == pytest.approx(1.0, rel=1e-3)
    assert list(result.release_epsilon.values()) == pytest.approx([1.0] * SILOS, rel=1e-3)
    # The noise is really there, of the size the three silos' σ·Δ say.
    residual = result.values - expected
    assert np.abs(residual).max() > 0.1
    assert np.std(residual) == pytest.approx(result.noise_std, rel=0.5)
    # Asking again with the same query round is a second SecAgg instance over the same
    # release (the difference of two sums could isolate a silo): every silo refuses it.
    with pytest.raises(FedguardError, match="only 0 client"):
        _collect(grid, content, TrustNoise.GAUSSIAN, consortium_identities(tmp_path, SILOS))
    for s in settings:
        logged = read_records(s.state_dir / "silo-log.jsonl")
        refusals = [r.payload for r in logged if r.payload.get("status") == "refused"]
        assert refusals and "[secagg-second-instance]" in refusals[-1]["reason"]
    for s in settings:
        assert len([e for e in _entries(s) if e.purpose is ChargePurpose.ATTRIBUTION]) == 1
