"""The one table of run options: every field once, exact round trips, the simulate flags."""

from __future__ import annotations

import argparse
import json
import tomllib
from collections import Counter
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

from fedguard.aggregation.registry import OPTION_KEYS
from fedguard.cli import build_parser
from fedguard.cli.simulate import config_from_args
from fedguard.core.aggregation_config import (
    AggregatorConfig,
    AggregatorName,
    CenterReference,
    PreAggregationName,
)
from fedguard.core.config import (
    CentralDPConfig,
    Engine,
    GradSampleMode,
    LocalDPConfig,
    LocalTrainingConfig,
    ModelSpec,
    NoiseSource,
    OptimizerKind,
    ParticipationPolicy,
    PartitionKind,
    PartitionSpec,
    PrivacyBudget,
    RunConfig,
    SecureAggregationConfig,
)
from fedguard.core.errors import ConfigError
from fedguard.core.run_options import AGGREGATION_OPTION_KEYS, RUN_OPTIONS
from fedguard.core.trust_config import TrustConfig, TrustNoise
from fedguard.deploy.bundles import toml_table

#: ``fedguard simulate`` flags that are not RunConfig options.
_NOT_CONFIG_FLAGS = {
    "-h", "--help", "--config", "--baseline", "--no-baseline", "--quiet", "--export",
    "--attack", "--byzantine", "--collusion", "--no-collusion", "--attack-strength",
    "--backdoor-target", "--poison-fraction",
}  # fmt: skip


def _leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for f in fields(value):
        current = getattr(value, f.name)
        if is_dataclass(current):
            yield from _leaves(current, (*path, f.name))
        else:
            yield (*path, f.name)


def _configs() -> list[RunConfig]:
    return [
        RunConfig(),
        RunConfig(num_clients=3, seed=9, out=Path("x"), engine=Engine.INPROCESS),
        RunConfig(
            num_clients=9,
            num_rounds=4,
            seed=2**40,
            out=Path("a/b"),
            engine=Engine.INPROCESS,
            run_name="named.run-1",
            partition=PartitionSpec(PartitionKind.COLUMN, column="sex", min_silo_size=7),
            budget=PrivacyBudget(1.5, 1e-6),
            training=LocalTrainingConfig(2, 32, 0.1, OptimizerKind.ADAM, 0.5),
            local_dp=LocalDPConfig(False, 2.0, GradSampleMode.EW, NoiseSource.SEEDED, 12.0, 0.3),
            secagg=SecureAggregationConfig(True, 0.25, 12, 0.2, 3, 3, 1.5, True),
            aggregation=AggregatorConfig(
                AggregatorName.CENTERED_CLIPPING,
                f=1,
                cc_tau=2.0,
                cc_iterations=3,
                cc_reference=CenterReference.PREVIOUS,
                pre_aggregation=(PreAggregationName.NNM, PreAggregationName.BUCKETING),
                bucket_size=2,
                seed=4,
            ),
            trust=TrustConfig(
                fairness_attribute="age",
                fairness_bands=(0.123456789, 60.0, 70.5),
                fairness_epsilon=0.5,
                drift=True,
                drift_bins=12,
                drift_threshold=0.1,
                drift_epsilon=0.7,
                monitor_rounds=2,
                explain=True,
                explain_epsilon=0.3,
                explain_steps=16,
                explain_clip_norm=2.0,
                noise=TrustNoise.NONE,
            ),
            model=ModelSpec((32, 16, 8)),
            participation=ParticipationPolicy(3, 0),
            test_fraction=0.3,
            update_clip_norm=0.0,
        ),
        RunConfig(
            partition=PartitionSpec(PartitionKind.IID, min_silo_size=1),
            central_dp=CentralDPConfig(True, 2.0, 1.5, 0.5, 1e-4, 3.0),
            budget=PrivacyBudget(0.1 + 0.2, 1e-5),  # a float without a short form
        ),
        RunConfig(
            num_clients=20,
            aggregation=AggregatorConfig(
                AggregatorName.GEOMETRIC_MEDIAN,
                f=2,
                geomed_iterations=5,
                geomed_nu=1e-5,
                geomed_tolerance=1e-7,
            ),
        ),
        RunConfig(aggregation=AggregatorConfig(AggregatorName.NORM_BOUNDING, norm_bound=3.0)),
        RunConfig(
            num_clients=20,
            aggregation=AggregatorConfig(AggregatorName.MULTI_KRUM, f=2, multi_krum_m=5),
        ),
        RunConfig(
            num_clients=20,
            aggregation=AggregatorConfig(AggregatorName.TRIMMED_MEAN, f=1, trim_fraction=0.2),
        ),
    ]


def test_every_leaf_field_is_set_by_exactly_one_option() -> None:
    leaves = Counter(_leaves(RunConfig()))
    set_by = Counter((*o.owner, name) for o in RUN_OPTIONS for name in o.field_names)
    assert set_by == leaves
    assert set(leaves.values()) == {1}
    assert len({o.name for o in RUN_OPTIONS}) == len(RUN_OPTIONS)


@pytest.mark.parametrize("config", _configs())
def test_options_round_trip_exactly(config: RunConfig) -> None:
    options = config.to_options()
    assert list(options) == [o.name for o in RUN_OPTIONS]
    assert RunConfig.from_options(options) == config
    # As a checkpoint (JSON) and a run file (TOML, unset parameters left out) store it.
    assert RunConfig.from_options(json.loads(json.dumps(options))) == config
    assert RunConfig.from_options(tomllib.loads(toml_table(options))) == config
    aggregation = config.aggregation.to_options()
    assert aggregation == {k: options[k] for k in AGGREGATION_OPTION_KEYS}
    assert AggregatorConfig.from_options(aggregation) == config.aggregation


def test_options_render_todays_types() -> None:
    options = RunConfig().to_options()
    assert options["partition"] == "dirichlet:1" and options["hidden"] == "64,64"
    assert options["no-dp"] is False and options["run-name"] == ""
    assert options["out"] == "runs" and options["dataset"] == "flchain"
    assert options["fairness-attribute"] == "" and options["fairness-bands"] == ""
    assert options["trim-fraction"] is None and options["pre-aggregation"] == ""
    assert OPTION_KEYS == AGGREGATION_OPTION_KEYS == tuple(AggregatorConfig().to_options())


def test_missing_none_and_blank_values() -> None:
    assert RunConfig.from_options({}) == RunConfig()
    assert RunConfig.from_options(dict.fromkeys(RunConfig().to_options())) == RunConfig()
    # Only the aggregation options read "" as unset (TOML cannot spell null).
    assert RunConfig.from_options(dict.fromkeys(AGGREGATION_OPTION_KEYS, "")) == RunConfig()
    assert RunConfig.from_options({"run-name": "", "fairness-attribute": " "}) == RunConfig()
    # A given key keeps the defaults of its neighbours (delta stays 1e-5).
    assert RunConfig.from_options({"target-epsilon": "2"}).budget == PrivacyBudget(2.0, 1e-5)
    parsed = RunConfig.from_options({"partition": "iid", "hidden": "8, 4", "no-dp": "yes"})
    assert parsed.partition == PartitionSpec(PartitionKind.IID, min_silo_size=50)
    assert parsed.model.hidden == (8, 4) and not parsed.local_dp.enabled


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target-epsilom": 3}, "unknown option"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of sgd, adam"),
        ({"aggregator": "kroom"}, "unknown aggregator 'kroom'"),
        ({"aggregator": "median", "cc-reference": "x"}, "unknown cc-reference"),
        ({"partition": "dirichlet:1", "min-silo-size": 0}, "min_silo_size"),
        ({"secagg-groups": 2}, "secure aggregation, which is off"),  # a constructor's check
        ({"fairness-bands": "2,1"}, "strictly increasing"),
        ({"learning-rate": [1]}, "learning-rate must be a number"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_options(options)


def test_aggregation_options_alone() -> None:
    with pytest.raises(ConfigError, match="unknown aggregation option"):
        AggregatorConfig.from_options({"clients": 3})
    parsed = AggregatorConfig.from_options({"aggregator": "krum", "aggregator-f": "1"})
    assert parsed == AggregatorConfig(AggregatorName.KRUM, f=1)


def _simulate_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    simulate: argparse.ArgumentParser = sub.choices["simulate"]
    return simulate


def test_simulate_flags_are_the_table() -> None:
    actions = _simulate_parser()._actions
    flags = {flag for action in actions for flag in action.option_strings}
    table = {f"--{name}" for o in RUN_OPTIONS for name in (o.name, *o.aliases)}
    assert flags - _NOT_CONFIG_FLAGS == table
    by_dest = {a.dest: a for a in actions}
    for o in RUN_OPTIONS:
        action = by_dest[o.dest]
        assert action.default is None, o.name
        assert action.option_strings[0] == f"--{o.name}"
        if o.codec.choices is not None:
            assert list(action.choices or ()) == [m.value for m in o.codec.choices]


def test_flags_map_back_to_options() -> None:
    argv = "simulate --secagg --groups 2 --min-group-size 3 --clip-norm 1.5 --clients 6"
    args = build_parser().parse_args([*argv.split(), "--aggregator", "median", "--hidden", "16"])
    config = config_from_args(args)
    assert config.secagg == SecureAggregationConfig(True, groups=2, min_group_size=3, clip_norm=1.5)
    assert config.aggregation.rule is AggregatorName.MEDIAN and config.model.hidden == (16,)
    assert not config_from_args(build_parser().parse_args(["simulate", "--no-dp"])).local_dp.enabled
    assert config_from_args(build_parser().parse_args(["simulate"])) == RunConfig()


def test_one_entry_defines_an_option_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """``scaler-epsilon`` is one table entry: TOML key, run_config key, flag and help."""
    (entry,) = (o for o in RUN_OPTIONS if o.name == "scaler-epsilon")
    assert entry.path == ("local_dp", "scaler_epsilon")
    assert RunConfig().to_options()["scaler-epsilon"] == 0.2
    assert RunConfig.from_options({"scaler-epsilon": "0.5"}).local_dp.scaler_epsilon == 0.5
    args = build_parser().parse_args(["simulate", "--scaler-epsilon", "0.7"])
    assert config_from_args(args).local_dp.scaler_epsilon == 0.7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--scaler-epsilon SCALER_EPSILON ε each silo spends" in help_text
    assert "(released once, before round 1) [default: 0.2]" in help_text
