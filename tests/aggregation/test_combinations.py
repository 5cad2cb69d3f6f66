"""The legal (input kind × rule × central DP) combinations, declared once."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from fedguard.aggregation.aggregators import WeightedMean
from fedguard.aggregation.combinations import (
    COMBINATIONS,
    InputKind,
    Refused,
    Release,
    RuleKind,
    UnsupportedCombinationError,
    check_combination,
    checked_rule,
    config_rule_kind,
    input_kind,
    rule_kind,
)
from fedguard.aggregation.pipeline import (
    AggregationPipeline,
    ClientUpdate,
    ClientUpdates,
    GroupSum,
    GroupSums,
    SecureSum,
)
from fedguard.aggregation.preaggregation import Bucketing, Composed
from fedguard.aggregation.registry import build_aggregator
from fedguard.aggregation.robust import CoordinateMedian
from fedguard.core.aggregation_config import AggregatorConfig, AggregatorName, PreAggregationName
from fedguard.core.config import CentralDPConfig, RunConfig, SecureAggregationConfig
from fedguard.core.errors import ConfigError
from fedguard.privacy.central import dp_fedavg_release
from fedguard.privacy.noise import CsprngGaussian
from tests.factories import small_config

KEY = bytes(range(32))
DP = CentralDPConfig(enabled=True, clip_norm=1.0, noise_multiplier=0.7, client_sampling_rate=0.5)
SECAGG = {
    InputKind.CLIENT_UPDATES: SecureAggregationConfig(),
    InputKind.SECURE_SUM: SecureAggregationConfig(enabled=True),
    InputKind.GROUP_SUMS: SecureAggregationConfig(enabled=True, groups=2),
}
RULES = {
    RuleKind.MEAN: AggregatorConfig(),
    RuleKind.ROBUST: AggregatorConfig(AggregatorName.MEDIAN),
}
ALL = list(itertools.product(InputKind, RuleKind, (False, True)))


def test_every_combination_is_declared() -> None:
    assert set(COMBINATIONS) == set(ALL)


@pytest.mark.parametrize(("kind", "rule", "central"), ALL)
def test_run_config_refuses_exactly_what_the_table_refuses(
    tmp_path: Path, kind: InputKind, rule: RuleKind, central: bool
) -> None:
    # RunConfig (core, below aggregation/) still checks on its own: it must agree.
    def build() -> RunConfig:
        return small_config(
            tmp_path,
            num_clients=6,
            secagg=SECAGG[kind],
            aggregation=RULES[rule],
            central_dp=DP if central else CentralDPConfig(),
        )

    verdict = COMBINATIONS[(kind, rule, central)]
    if isinstance(verdict, Refused):
        label = RULES[rule].label
        with pytest.raises(ConfigError) as refused:
            build()
        assert str(refused.value) == verdict.message.format(label=label)
        with pytest.raises(UnsupportedCombinationError) as table:
            check_combination(kind, rule, central, label)
        assert str(table.value) == str(refused.value)
    else:
        config = build()
        assert input_kind(config.secagg) is kind
        assert config_rule_kind(config.aggregation) is rule
        assert check_combination(kind, rule, central, "r") is verdict
        assert checked_rule(config).name == RULES[rule].label


def test_the_rule_kind_of_a_built_rule_is_that_of_its_config() -> None:
    with_steps = AggregatorConfig(pre_aggregation=(PreAggregationName.BUCKETING,), bucket_size=2)
    for config in (*RULES.values(), with_steps, AggregatorConfig(AggregatorName.KRUM)):
        assert rule_kind(build_aggregator(config)) is config_rule_kind(config)
    assert rule_kind(Composed((Bucketing(2, np.random.default_rng(0)),), WeightedMean())) is (
        RuleKind.MEAN
    )


def test_a_custom_rule_over_one_secure_sum_is_refused_before_any_round(tmp_path: Path) -> None:
    config = small_config(tmp_path, secagg=SecureAggregationConfig(enabled=True))
    with pytest.raises(UnsupportedCombinationError, match="median needs several inputs"):
        checked_rule(config, CoordinateMedian(0))
    assert checked_rule(config, WeightedMean()).name == AggregatorName.WEIGHTED_MEAN.value


def _updates(d: int) -> tuple[ClientUpdate, ...]:
    rng = np.random.default_rng(3)
    return tuple(ClientUpdate(i, f"s{i}", rng.normal(size=d), 1) for i in range(3))


def test_the_pipeline_refuses_an_illegal_input() -> None:
    robust_dp = AggregationPipeline(CoordinateMedian(0), central_dp=DP)
    with pytest.raises(UnsupportedCombinationError, match="DP-FedAvg mean only"):
        robust_dp.apply(ClientUpdates(np.zeros(4), _updates(4), 3))
    with pytest.raises(UnsupportedCombinationError, match="single sum"):
        AggregationPipeline(CoordinateMedian(0)).apply(SecureSum(np.zeros(4), np.ones(4), 3, 3))
    group = GroupSum(("a",), np.ones(4), 1.0)
    with pytest.raises(UnsupportedCombinationError, match="secure groups with central DP"):
        AggregationPipeline(central_dp=DP).apply(GroupSums(np.zeros(4), (group,)))


def test_both_dp_fedavg_paths_draw_the_noise_in_privacy_central() -> None:
    d, population = 6, 4
    updates = _updates(d)
    plain = AggregationPipeline(central_dp=DP, noise=CsprngGaussian(KEY)).apply(
        ClientUpdates(np.ones(d), updates, population)
    )
    deltas = np.stack([u.delta for u in updates])
    release = dp_fedavg_release(deltas, DP, population, CsprngGaussian(KEY))
    np.testing.assert_array_equal(plain.new_global, np.ones(d) + release.mean_update)
    assert plain.details["rule"] == Release.DP_FEDAVG.value
    # The secure sum: the silos clipped; the server adds the same noise to the sum.
    clipped_sum = deltas.sum(axis=0)
    secure = AggregationPipeline(central_dp=DP, noise=CsprngGaussian(KEY)).apply(
        SecureSum(np.ones(d), clipped_sum, 3.0, population)
    )
    noise = CsprngGaussian(KEY).sample((d,), std=0.7).numpy().astype(np.float64)
    np.testing.assert_array_equal(secure.new_global, np.ones(d) + (clipped_sum + noise) / 2.0)
    assert secure.details == {"rule": "secagg+dp-fedavg", "noise-std": 0.7, "denominator": 2.0}


def test_the_old_call_forms_are_the_tagged_inputs() -> None:
    pipeline = AggregationPipeline()
    updates = _updates(3)
    assert np.array_equal(
        pipeline.apply(np.zeros(3), list(updates), 3).new_global,
        pipeline.apply(ClientUpdates(np.zeros(3), updates, 3)).new_global,
    )
    groups = [GroupSum(("a",), np.ones(3), 2.0)]
    short = pipeline.apply_groups(np.zeros(3), groups, norm_bound=1.0)
    assert short.details == pipeline.apply(GroupSums(np.zeros(3), tuple(groups), 1.0)).details
