"""fedguard: federated learning for regulated industries, on Flower.

The public API: what a Flower user takes into their own app. Each name is
imported on first use (``fedguard.RunConfig``), so ``import fedguard`` stays
free of torch, Opacus and Flower; the README's "Using a piece in your own
Flower app" shows them together.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedguard.aggregation.pipeline import AggregationPipeline
    from fedguard.aggregation.registry import build_aggregator
    from fedguard.client.app import make_client_app
    from fedguard.client.flower_dp import DpSgdSilo
    from fedguard.client.silo import SiloSettings, settings_from_node_config
    from fedguard.core.aggregation_config import AggregatorConfig, AggregatorName
    from fedguard.core.config import PrivacyBudget, RunConfig
    from fedguard.core.contract import DataContract, load_contract
    from fedguard.core.errors import ConfigError, FedguardError
    from fedguard.privacy.accountant import PrivacyAccountant
    from fedguard.privacy.ledger import PrivacyLedger
    from fedguard.server.app import make_server_app
    from fedguard.server.flower_strategy import RobustFedAvg
    from fedguard.server.secure_round import run_secure_groups
    from fedguard.simulation.runner import simulate
    from fedguard.trust.phase import trust_phase
    from fedguard.trust.silo_statistics import SILO_AND_TRUST_PRODUCERS

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_HOMES = {
    "AggregationPipeline": "fedguard.aggregation.pipeline",
    "AggregatorConfig": "fedguard.core.aggregation_config",
    "AggregatorName": "fedguard.core.aggregation_config",
    "ConfigError": "fedguard.core.errors",
    "DataContract": "fedguard.core.contract",
    "DpSgdSilo": "fedguard.client.flower_dp",
    "FedguardError": "fedguard.core.errors",
    "PrivacyAccountant": "fedguard.privacy.accountant",
    "PrivacyBudget": "fedguard.core.config",
    "PrivacyLedger": "fedguard.privacy.ledger",
    "RobustFedAvg": "fedguard.server.flower_strategy",
    "RunConfig": "fedguard.core.config",
    "SILO_AND_TRUST_PRODUCERS": "fedguard.trust.silo_statistics",
    "SiloSettings": "fedguard.client.silo",
    "build_aggregator": "fedguard.aggregation.registry",
    "load_contract": "fedguard.core.contract",
    "make_client_app": "fedguard.client.app",
    "make_server_app": "fedguard.server.app",
    "run_secure_groups": "fedguard.server.secure_round",
    "settings_from_node_config": "fedguard.client.silo",
    "simulate": "fedguard.simulation.runner",
    "trust_phase": "fedguard.trust.phase",
}

__all__ = [
    "SILO_AND_TRUST_PRODUCERS",
    "AggregationPipeline",
    "AggregatorConfig",
    "AggregatorName",
    "ConfigError",
    "DataContract",
    "DpSgdSilo",
    "FedguardError",
    "PrivacyAccountant",
    "PrivacyBudget",
    "PrivacyLedger",
    "RobustFedAvg",
    "RunConfig",
    "SiloSettings",
    "build_aggregator",
    "load_contract",
    "make_client_app",
    "make_server_app",
    "run_secure_groups",
    "settings_from_node_config",
    "simulate",
    "trust_phase",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fedguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
