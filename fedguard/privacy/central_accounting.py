"""Central (silo-level) DP accounting: who takes part, what is accounted, when to stop.

What the guarantee covers
-------------------------
DP-FedAvg (:mod:`fedguard.privacy.central`) adds Gaussian noise to the sum of the
clipped updates *on the server*. The (ε, δ) it reports therefore protects one
silo's whole contribution in **the released models** (every round's global model
and the final one, and whatever is computed from them) against **outsiders**:
anyone who reads the models, ``report.json``, ``history.json`` or the audit log.
It says nothing against **the server that adds the noise**: in plain mode the
server sees every silo's update before the noise, under secure aggregation it
sees their sum. Nor does it cover the evaluation sums and feature statistics the
silos send (see the report's "not protected" list).

Sampling and amplification
--------------------------
Silos are Poisson-sampled at rate q from the server's OS CSPRNG
(:class:`secrets.SystemRandom`, i.e. ``os.urandom``), never from the run seed,
which ``report.json`` publishes (anyone could recompute a seeded cohort).
Amplification by sampling (the PoissonSampled event, e.g. ε = 4.43 instead of
6.28 for 3 rounds at q = 0.6, z = 1, δ = 1e-3) would only hold if nobody who
reads the release learned who was sampled. fedguard records each round's cohort
(the silos that took part and their outcomes) in the round log, ``history.json``
and the deployed audit log, so it does **not** take it: every round is accounted
as the Gaussian mechanism with the configured noise multiplier, as if every silo
took part (q = 1). Sampling then only spares silos work; it buys no privacy.

Budget
------
Before each round the server asks what ε the round's release would bring; if it
exceeds ``CentralDPConfig.epsilon_budget`` the round is not run and training
stops, with the reason logged, written to ``central-dp.json`` in the run folder
and shown in the report.

Every ε comes from :class:`~fedguard.privacy.accountant.PrivacyAccountant` and
:mod:`fedguard.privacy.analysis.dp_sgd` (dp_accounting); nothing here derives one.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedguard.core.config import CentralDPConfig
from fedguard.core.errors import ConfigError
from fedguard.core.files import atomic_write_json
from fedguard.privacy.accountant import AccountantKind, PrivacyAccountant
from fedguard.privacy.analysis import dp_sgd
from fedguard.privacy.events import DpFedAvgRound

__all__ = [
    "ADVERSARY",
    "AMPLIFICATION_REASON",
    "AMPLIFICATION_TAKEN",
    "NOT_COVERED",
    "STATE_FILE",
    "BudgetStop",
    "CentralPrivacy",
    "accounted_round",
    "central_dp_statement",
    "read_central_dp",
]

STATE_FILE = "central-dp.json"

ADVERSARY = (
    "outsiders who read the released models (every round's global model and the final "
    "one) and the run's reports, history and audit log: adding or removing one silo "
    "changes what they see by at most (ε, δ)"
)
NOT_COVERED = (
    "the server that adds the noise: it sees each silo's update (under secure aggregation, "
    "the sum of the updates) before noising; also not the evaluation sums and feature "
    "statistics silos send"
)
AMPLIFICATION_TAKEN = False
AMPLIFICATION_REASON = (
    "not taken: each round's cohort (the silos that took part) is recorded in the round "
    "log, history.json and the audit log, so readers know who was sampled; every round is "
    "accounted as the Gaussian mechanism with the same noise multiplier, as if every silo "
    "took part (q = 1). Silos are sampled from the server's OS CSPRNG "
    "(secrets.SystemRandom), never from the published run seed"
)


def accounted_round(config: CentralDPConfig) -> DpFedAvgRound:
    """What one round adds to the central guarantee: DP-FedAvg at q = 1 (no amplification).

    The cohort is published (module doc), so the sampling rate is not credited.
    """
    return DpFedAvgRound(1.0, config.noise_multiplier)


def _epsilon_with(accountant: PrivacyAccountant, event: DpFedAvgRound, delta: float) -> float:
    """ε of everything ``accountant`` holds plus ``event`` (the accountant is unchanged)."""
    combined = dp_sgd.compose_grouped([(accountant.composed_event(), 1), (event.to_dp_event(), 1)])
    if accountant.kind is AccountantKind.PLD:
        return dp_sgd.epsilon_pld(
            combined, delta, value_discretization_interval=accountant.value_discretization_interval
        )
    return dp_sgd.epsilon_rdp(combined, delta)


@dataclass(frozen=True)
class BudgetStop:
    """Why training stopped before ``before_round``: its release would overspend."""

    before_round: int
    epsilon_spent: float
    epsilon_with_round: float
    epsilon_budget: float
    delta: float

    @property
    def reason(self) -> str:
        return (
            f"central ε budget reached: round {self.before_round} would take the central ε "
            f"from {self.epsilon_spent:.4g} to {self.epsilon_with_round:.4g} > budget "
            f"{self.epsilon_budget:g} (δ = {self.delta:g}); the round was not run and "
            "training stopped"
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "reason": self.reason}


def central_dp_statement(config: CentralDPConfig) -> dict[str, Any]:
    """What the central guarantee is, covers and assumes (for report.json and the console)."""
    return {
        "unit": "one silo (user-level DP-FedAvg, add or remove one silo's whole contribution)",
        "covers": ADVERSARY,
        "does_not_cover": NOT_COVERED,
        "amplification_by_sampling": AMPLIFICATION_TAKEN,
        "amplification": AMPLIFICATION_REASON,
        "accountant": "dp_accounting PLD, pessimistic, value discretization 1e-4",
        "client_sampling_rate": config.client_sampling_rate,
        "accounted_sampling_rate": accounted_round(config).client_sampling_rate,
        "sampling_randomness": "OS CSPRNG on the server (secrets.SystemRandom)",
        "noise_multiplier": config.noise_multiplier,
        "clip_norm": config.clip_norm,
        "delta": config.delta,
        "epsilon_budget": config.epsilon_budget,
    }


class CentralPrivacy:
    """The server's central-DP state: its accountant, its sampler, its budget decisions."""

    def __init__(self, config: CentralDPConfig) -> None:
        if not config.enabled:
            raise ConfigError("central DP is off; there is nothing to account")
        self.config = config
        self.accountant = PrivacyAccountant()
        self._random = secrets.SystemRandom()
        self.stop: BudgetStop | None = None

    def sample(self, nodes: Sequence[int]) -> list[int]:
        """Poisson sampling at the configured rate from the OS CSPRNG (all at rate 1)."""
        rate = self.config.client_sampling_rate
        if rate >= 1.0:
            return list(nodes)
        return [n for n in nodes if self._random.random() < rate]

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.config.delta)

    def check_round(self, round_number: int) -> BudgetStop | None:
        """``None`` if round ``round_number``'s release fits the budget; else why not."""
        event = accounted_round(self.config)
        after = _epsilon_with(self.accountant, event, self.config.delta)
        if after <= self.config.epsilon_budget:
            return None
        self.stop = BudgetStop(
            round_number, self.epsilon(), after, self.config.epsilon_budget, self.config.delta
        )
        return self.stop

    def charge_round(self) -> float:
        """Compose one round's release; return the central ε after it."""
        self.accountant.compose(accounted_round(self.config))
        return self.epsilon()

    def write(self, run_dir: Path) -> None:
        """``central-dp.json``: the statement, the ε spent and any budget stop."""
        atomic_write_json(
            run_dir / STATE_FILE,
            {
                **central_dp_statement(self.config),
                "rounds_accounted": sum(count for _, count in self.accountant.events),
                "epsilon": self.epsilon(),
                "stopped": self.stop.to_json() if self.stop is not None else None,
            },
        )


def read_central_dp(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``central-dp.json``, or ``None`` when it has none (central DP off)."""
    path = run_dir / STATE_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else None
