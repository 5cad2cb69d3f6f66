"""The command line: documented options, TOML configs, one-line errors, one handler each."""

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedguard.cli import build_parser, main
from fedguard.cli.simulate import attack_from_args, config_from_args
from fedguard.core.config import RunConfig
from fedguard.core.errors import ConfigError


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in RunConfig().to_options():
        assert f"--{option}" in text, option
    for option in ("--config", "--baseline", "--no-baseline"):
        assert option in text


def test_toml_file_and_flags_combine_flags_winning(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('dataset = "digits"\nclients = 4\nrounds = 7\npartition = "dirichlet:0.5"\n')
    args = build_parser().parse_args(["simulate", "--config", str(toml), "--rounds", "3"])
    config = config_from_args(args)
    assert (config.dataset.value, config.num_clients, config.num_rounds) == ("digits", 4, 3)
    assert str(config.partition) == "dirichlet:0.5"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target-epsilon", "0"], "epsilon"),
        (["--target-epsilon", "-2"], "epsilon"),
        (["--partition", "dirichlet:abc"], "dirichlet"),
        (["--config", "/nonexistent/run.toml"], "does not exist"),
        (["--dataset", "breast-cancer", "--clients", "60", "--min-silo-size", "10"], "silo"),
        (["--dataset", "breast-cancer", "--target-epsilon", "0.00001"], "one round"),
    ],
)
def test_bad_input_gives_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["simulate", "--out", str(tmp_path), "--engine", "inprocess", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedguard: error:") and message in err
    assert "Traceback" not in err


def test_unknown_dataset_is_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--dataset", "mnist"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_unknown_key_in_toml_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("epsilon = 3\n")
    assert main(["simulate", "--config", str(toml)]) == 2
    assert "unknown option" in capsys.readouterr().err


@pytest.mark.slow
def test_simulate_in_process_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "simulate",
            "--dataset",
            "breast-cancer",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--partition",
            "iid",
            "--min-silo-size",
            "20",
            "--engine",
            "inprocess",
            "--out",
            str(tmp_path),
            "--run-name",
            "cli",
            "--noise-source",
            "seeded",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "[dp] round   2" in out and "[no-dp] round   2" in out
    assert "DP keeps" in out
    assert (tmp_path / "cli" / "report.md").exists()


def test_attack_options_need_an_attack_and_default_f_to_the_byzantine_silos() -> None:
    args = build_parser().parse_args(
        [
            "simulate",
            "--clients",
            "20",
            "--attack",
            "alie",
            "--byzantine",
            "0.2",
            "--aggregator",
            "median",
            "--pre-aggregation",
            "nnm",
        ]
    )
    config = config_from_args(args)
    assert config.aggregation.f == 4 and config.aggregation.label == "nnm+median"
    assert attack_from_args(args).byzantine_indices(20, 0) == attack_from_args(
        args
    ).byzantine_indices(20, 0)
    grouped = build_parser().parse_args(
        [
            "simulate",
            "--clients",
            "20",
            "--attack",
            "sign-flip",
            "--aggregator",
            "median",
            "--secagg",
            "--groups",
            "3",
        ]
    )
    assert config_from_args(grouped).aggregation.f == 3  # at most one group per attacker
    with pytest.raises(ConfigError, match="need --attack"):
        attack_from_args(build_parser().parse_args(["simulate", "--attack-strength", "2"]))


def test_a_robust_rule_over_one_secure_sum_is_refused() -> None:
    args = build_parser().parse_args(["simulate", "--secagg", "--aggregator", "krum"])
    with pytest.raises(ConfigError, match="single sum"):
        config_from_args(args)


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple]:
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
    for action in subparsers:
        for name, child in action.choices.items():
            yield from _leaves(child, (*path, name))


def test_every_command_sets_one_handler() -> None:
    leaves = dict(_leaves(build_parser()))
    assert {path[0] for path in leaves} == {
        "simulate", "export", "predict", "explain", "monitor", "contract",
        "ca", "node", "server", "client", "run", "audit", "models",
    }  # fmt: skip
    assert ("client", "reset-ledger") in leaves and ("ca", "sign-roster") in leaves
    assert {("contract", "infer"), ("contract", "check"), ("contract", "show")} <= set(leaves)
    for path, parser in leaves.items():
        defaults = {k: v for k, v in parser._defaults.items() if k.endswith("handler")}
        assert list(defaults) == ["handler"], path
        assert callable(defaults["handler"]), path


def test_python_dash_m_runs_the_one_main() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedguard.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "simulate" in done.stdout and "models" in done.stdout


def test_an_attack_defaults_f_only_for_rules_that_declare_one() -> None:
    from fedguard.core.aggregation_config import AggregatorName
    from fedguard.simulation.attack_config import AttackConfig, AttackName, declares_f

    assert not declares_f(AggregatorName.WEIGHTED_MEAN)
    assert not declares_f(AggregatorName.NORM_BOUNDING.value)
    assert declares_f(AggregatorName.MEDIAN) and declares_f("krum")
    attack = AttackConfig(AttackName.SIGN_FLIP, 0.2)
    assert attack.default_f(20, 0, 1) == 4  # its silos
    assert attack.default_f(20, 0, 3) == 3  # at most one group each
    mean = build_parser().parse_args(["simulate", "--clients", "20", "--attack", "sign-flip"])
    assert config_from_args(mean).aggregation.f == 0  # the mean declares none
