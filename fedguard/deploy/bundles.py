"""The TOML files fedguard hands to Flower: a silo's node config and a run's app bundle."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from fedguard.core.config import DatasetName, PrivacyBudget
from fedguard.core.errors import ConfigError

__all__ = [
    "CLIENTAPP_REF",
    "SERVERAPP_REF",
    "node_config_toml",
    "toml_table",
    "toml_value",
    "write_app",
]

#: The deployed ServerApp (its composition root, :mod:`fedguard.apps`).
SERVERAPP_REF = "fedguard.apps.server:server_app"
#: The deployed ClientApp: a silo never imports server code.
CLIENTAPP_REF = "fedguard.apps.silo:client_app"


def toml_value(value: object) -> str:
    """``value`` as a TOML value (a bool, an int, a finite float or a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"cannot write the non-finite number {value} to TOML")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise ConfigError(f"cannot write a {type(value).__name__} to a Flower config: {value!r}")


def toml_table(values: Mapping[str, object]) -> str:
    """TOML ``key = value`` lines; a ``None`` (an option left at its default) is left out,
    as TOML has no null and ``RunConfig.from_options`` reads a missing key as its default."""
    return "".join(
        f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in values.items() if v is not None
    )


def node_config_toml(
    silo_id: str,
    data: DatasetName | Path,
    data_path: Path,
    state_dir: Path,
    budget: PrivacyBudget,
    signing_key: Path | None = None,
    secagg_identity: Path | None = None,
    consortium_key: Path | None = None,
    model_factory: str | None = None,
) -> str:
    """The ``--node-config`` file of a silo (the keys ``fedguard.client.app`` reads).

    ``signing-key`` (the node key) lets the silo sign its log of what it sent;
    ``secagg-identity-key`` and ``consortium-key`` (its Ed25519 SecAgg identity key,
    and ``ca.crt`` or another key the roster must verify under) let it take part in
    authenticated secure aggregation.
    """
    values: dict[str, object] = {
        "silo-id": silo_id,
        # A built-in data set by name, or the silo's copy of the consortium's contract.
        **({"dataset": data.value} if isinstance(data, DatasetName) else {"contract": str(data)}),
        "data-path": str(data_path),
        "state-dir": str(state_dir),
        "target-epsilon": float(budget.epsilon),
        "delta": float(budget.delta),
    }
    if signing_key is not None:
        values["signing-key"] = str(signing_key)
    if model_factory:
        values["model-factory"] = model_factory
    if (secagg_identity is None) != (consortium_key is None):
        raise ConfigError("a SecAgg identity needs both the identity key and the consortium key")
    if secagg_identity is not None and consortium_key is not None:
        values["secagg-identity-key"] = str(secagg_identity)
        values["consortium-key"] = str(consortium_key)
    return toml_table(values)


def write_app(app_dir: Path, options: Mapping[str, object], name: str = "fedguard-run") -> Path:
    """Write the Flower app ``flwr run`` submits: the fedguard apps and ``options``.

    The app holds a ``pyproject.toml`` only (no code): the SuperNodes run the
    ``fedguard.apps.silo:client_app`` they installed, the SuperLink the installed
    ``fedguard.apps.server:server_app``, and the run config is ``options``.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    text = (
        "# Written by `fedguard run`; Flower builds the run's app bundle from this file.\n"
        "[project]\n"
        f"name = {toml_value(name)}\n"
        'version = "1.0.0"\n'
        'description = "A fedguard federated run"\n'
        'license = "Apache-2.0"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "fedguard"\n\n'
        "[tool.flwr.app.components]\n"
        f"serverapp = {toml_value(SERVERAPP_REF)}\n"
        f"clientapp = {toml_value(CLIENTAPP_REF)}\n\n"
        "[tool.flwr.app.config]\n" + toml_table(options)
    )
    path = app_dir / "pyproject.toml"
    path.write_text(text, encoding="utf-8")
    return path
