"""Central DP on the server: CSPRNG sampling, no amplification, the ε budget, the report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedguard.cli import build_parser
from fedguard.cli.simulate import config_from_args
from fedguard.client.app import make_client_app
from fedguard.core.config import CentralDPConfig, RunConfig
from fedguard.core.errors import ConfigError
from fedguard.edge.distill import central_round_event
from fedguard.privacy.accountant import PrivacyAccountant
from fedguard.privacy.central_accounting import (
    STATE_FILE,
    CentralPrivacy,
    accounted_round,
    read_central_dp,
)
from fedguard.privacy.events import DpFedAvgRound
from fedguard.server.app import make_server_app
from fedguard.server.orchestrator import RoundRecord
from fedguard.simulation.inprocess import run_inprocess
from fedguard.simulation.report import summary_table, write_report
from fedguard.simulation.runner import SiloPlan, VariantResult
from tests.factories import silo_settings, small_config

pytestmark = pytest.mark.slow  # whole runs, engines or processes: the slow tier

CENTRAL = CentralDPConfig(
    enabled=True, clip_norm=0.5, noise_multiplier=1.0, client_sampling_rate=0.6, delta=1e-3
)


def _opacus_epsilon(accountant: RDPAccountant | PRVAccountant, rounds: int) -> float:
    for _ in range(rounds):
        accountant.step(noise_multiplier=CENTRAL.noise_multiplier, sample_rate=1.0)
    with warnings.catch_warnings():  # PRV at q = 1 takes log(1 - q) = log(0) on the way
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(accountant.get_epsilon(CENTRAL.delta))


def test_a_round_is_accounted_without_amplification_and_matches_opacus() -> None:
    # The cohort is published, so q = 0.6 buys nothing: every round is Gaussian(z = 1).
    assert accounted_round(CENTRAL) == DpFedAvgRound(1.0, 1.0)
    central = CentralPrivacy(CENTRAL)
    eps = [central.charge_round() for _ in range(3)]
    # 3 rounds at z = 1, δ = 1e-3: dp_accounting PLD 6.284 (the amplified figure would
    # be 4.431). Opacus's PRV accountant (an upper estimate, ε error 0.01) gives 6.294,
    # its RDP accountant (looser) 6.999.
    assert eps[-1] == pytest.approx(6.284, abs=2e-3)
    prv = _opacus_epsilon(PRVAccountant(), 3)
    rdp = _opacus_epsilon(RDPAccountant(), 3)
    assert eps[-1] <= prv <= eps[-1] + 0.02
    assert prv < rdp
    amplified = PrivacyAccountant()
    amplified.compose(DpFedAvgRound(0.6, 1.0), 3)
    assert amplified.epsilon(1e-3) == pytest.approx(4.431, abs=2e-3)
    assert eps[0] < eps[1] < eps[2]


def test_the_budget_stops_before_the_round_that_would_overspend() -> None:
    central = CentralPrivacy(CentralDPConfig(enabled=True, delta=1e-3, epsilon_budget=6.0))
    assert central.check_round(1) is None
    central.charge_round()  # ε 3.14
    assert central.check_round(2) is None
    spent = central.charge_round()  # ε 4.85; a third round would bring 6.28
    stop = central.check_round(3)
    assert stop is not None and central.stop == stop
    assert stop.before_round == 3
    assert stop.epsilon_spent == pytest.approx(spent)
    assert stop.epsilon_spent <= 6.0 < stop.epsilon_with_round
    assert "round 3" in stop.reason and "budget 6" in stop.reason and "not run" in stop.reason
    assert central.epsilon() == spent  # asking changed nothing


def test_the_default_budget_lets_six_rounds_at_z_1_run() -> None:
    central = CentralPrivacy(CentralDPConfig(enabled=True))
    assert central.config.epsilon_budget == 10.0
    rounds = 0
    while central.check_round(rounds + 1) is None:
        central.charge_round()
        rounds += 1
    assert rounds == 6  # ε 9.93 after six rounds; a seventh would bring 11.02


def test_sampling_comes_from_the_os_not_the_seed() -> None:
    nodes = list(range(2000))
    config = CentralDPConfig(enabled=True, client_sampling_rate=0.3)
    first, second = CentralPrivacy(config).sample(nodes), CentralPrivacy(config).sample(nodes)
    assert first != second  # the same config (and seed) gives another cohort
    for cohort in (first, second):
        assert set(cohort) <= set(nodes)
        assert abs(len(cohort) - 600) < 5 * (2000 * 0.3 * 0.7) ** 0.5
    assert CentralPrivacy(CentralDPConfig(enabled=True)).sample(nodes) == nodes


def test_budget_option_round_trips_and_is_validated() -> None:
    config = RunConfig.from_options({"central-dp": True, "central-epsilon-budget": 3.5})
    assert config.central_dp.epsilon_budget == 3.5
    assert config.to_options()["central-epsilon-budget"] == 3.5
    with pytest.raises(ConfigError, match="central epsilon budget"):
        RunConfig.from_options({"central-dp": True, "central-epsilon-budget": 0})
    with pytest.raises(ConfigError, match="nothing to account"):
        CentralPrivacy(CentralDPConfig())
    args = ["simulate", "--central-dp", "--central-epsilon-budget", "2.5"]
    args += ["--update-clip-norm", "3"]
    parsed = config_from_args(build_parser().parse_args(args))
    assert parsed.central_dp.epsilon_budget == 2.5 and parsed.update_clip_norm == 3.0


def test_edge_distillation_accounts_its_rounds_the_same_way() -> None:
    assert central_round_event(CENTRAL) == accounted_round(CENTRAL) == DpFedAvgRound(1.0, 1.0)


def test_a_run_stops_at_the_central_budget_and_the_report_says_so(tmp_path: Path) -> None:
    config = RunConfig.from_options(
        {
            **small_config(tmp_path, num_rounds=3).to_options(),
            "central-dp": True,
            "central-noise-multiplier": 1.0,
            "central-clip-norm": 0.5,
            "client-sampling-rate": 0.6,
            "central-epsilon-budget": 6.0,
        }
    )
    records: list[RoundRecord] = []
    run_dir = tmp_path / "run" / "dp"
    server = make_server_app(config, "test-run", run_dir, records.append)
    client = make_client_app(
        lambda c: silo_settings(tmp_path, int(c.node_config["partition-id"])),
        allow_non_private=True,
    )
    run_inprocess(server, client, config.num_clients)
    # Two rounds fit (ε 4.85 at q = 1); the third would bring 6.28 > 6: it never ran.
    assert [r.round for r in records] == [0, 1, 2]
    assert records[-1].central_epsilon == pytest.approx(4.845, abs=2e-3)
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]
    state = read_central_dp(run_dir)
    assert state is not None and (run_dir / STATE_FILE).exists()
    assert state["rounds_accounted"] == 2
    assert state["amplification_by_sampling"] is False
    assert state["accounted_sampling_rate"] == 1.0 and state["client_sampling_rate"] == 0.6
    assert state["stopped"]["before_round"] == 3
    assert "central ε budget reached" in state["stopped"]["reason"]

    result = VariantResult("dp", config, run_dir, [r.to_dict() for r in records], {}, 1.0)
    plans = [SiloPlan(f"silo-{i}", 100, 25, 0.6, None, None, None) for i in range(3)]
    paths = write_report(tmp_path / "run", config, [result], plans)
    report = json.loads(paths["json"].read_text())
    central = report["privacy"]["central"]
    assert "outsiders" in central["covers"] and "released models" in central["covers"]
    assert "the server that adds the noise" in central["does_not_cover"]
    assert central["amplification_by_sampling"] is False
    assert "cohort" in central["amplification"]
    assert report["variants"]["dp"]["central_dp"]["stopped"]["before_round"] == 3
    table = summary_table(config, report)
    assert "central ε (one silo, δ=0.001): 4.85 of budget 6" in table
    assert "round 3 would take the central ε" in table
    assert "not the server that adds the noise" in table
    markdown = paths["markdown"].read_text()
    assert "Amplification by client sampling not taken" in markdown
    assert "central ε budget reached" in markdown
