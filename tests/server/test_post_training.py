"""The round loop runs no trust code itself: a trust run needs its post-training phase."""

from pathlib import Path

import pytest

from fedguard.client.app import SiloAgent, make_client_app
from fedguard.client.statistic_release import SILO_PRODUCERS, producer_for
from fedguard.core.errors import ConfigError
from fedguard.core.trust_config import TrustConfig
from fedguard.server.app import make_server_app
from fedguard.server.orchestrator import FederatedRun
from fedguard.simulation.inprocess import InProcessGrid
from fedguard.wire.statistics import StatisticKind
from tests.factories import silo_settings, small_config

TRUST = TrustConfig(fairness_attribute="mean radius", fairness_bands=(14.0,), drift=True)


def test_a_trust_run_without_a_post_training_phase_is_refused_up_front(tmp_path: Path) -> None:
    config = small_config(tmp_path, trust=TRUST)
    with pytest.raises(ConfigError, match="post_training"):
        make_server_app(config, "r", tmp_path / "run")
    grid = InProcessGrid(make_client_app(lambda _: silo_settings(tmp_path, 0)), 1)
    with pytest.raises(ConfigError, match="post-training phase"):
        FederatedRun(grid, config, "r", tmp_path / "run")


def test_a_silo_answers_only_the_statistics_it_was_given(tmp_path: Path) -> None:
    assert producer_for(SILO_PRODUCERS, StatisticKind.EVALUATION) is not None
    with pytest.raises(ConfigError, match="answers no fairness statistics"):
        producer_for(SILO_PRODUCERS, StatisticKind.FAIRNESS)
    agent = SiloAgent(silo_settings(tmp_path, 0))
    assert agent.producers is SILO_PRODUCERS  # the trust layer's are added by the composition root
