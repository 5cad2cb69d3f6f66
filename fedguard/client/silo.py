"""A silo's own settings: where its data and state live, and its privacy budget.

These are chosen by the silo (Flower's ``node_config``), never by the server: a
server cannot raise a hospital's ε budget or point it at another file.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from fedguard.client.policy import (
    PolicyRefusalError,
    RefusalReason,
    SiloPolicy,
    policy_from_node_config,
)
from fedguard.core.config import DatasetName, PartitionSpec, PrivacyBudget
from fedguard.core.contract import DataContract, load_contract
from fedguard.core.contract_validation import ContractViolationError, ValidationReport
from fedguard.core.data_sources import DataSource, SourceKind, source_from_node_config
from fedguard.core.datasets import (
    SiloData,
    builtin_contract,
    check_frame,
    load_silo_frame,
    schema_for,
)
from fedguard.core.errors import ConfigError, DataError
from fedguard.core.files import atomic_write_bytes
from fedguard.core.seeding import derive_seed
from fedguard.core.silos import PooledData, silo_from_frame, simulation_silos
from fedguard.privacy.secagg.roster import RosterError, SiloIdentity


class SiloDataSource(Protocol):
    """Where a silo's records come from, and the data contract they must meet."""

    @property
    def contract(self) -> DataContract: ...

    def load(self) -> SiloData: ...


@dataclass(frozen=True)
class TableSiloSource:
    """A silo's own table (CSV, Parquet or a SQL query) under its own copy of the contract."""

    table: DataSource
    contract: DataContract
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.contract, DataContract):
            # A built-in data set by name (DatasetName or its text).
            object.__setattr__(self, "contract", builtin_contract(self.contract))

    def load(self) -> SiloData:
        return self.load_validated()[0]

    def load_validated(self) -> tuple[SiloData, ValidationReport]:
        """The silo's data and the report of its validation against the contract."""
        table = self.table
        stamp: tuple[int, int] | None = None
        if table.kind is not SourceKind.SQL:
            table = replace(table, location=str(table.path.resolve()))
            # The file's size and time are in the cache key: a corrected file is reread.
            try:
                info = table.path.stat()
                stamp = (info.st_mtime_ns, info.st_size)
            except OSError:
                stamp = None  # read_table says why
        return _load_table_silo(table, self.contract, self.test_fraction, self.seed, stamp)


@dataclass(frozen=True)
class SimulatedSiloSource:
    """Silo ``index`` of a seeded partition of pooled rows (simulation)."""

    data: PooledData
    num_silos: int
    partition: PartitionSpec
    index: int
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        # A built-in data set by name is its packaged rows under its own contract.
        object.__setattr__(self, "data", PooledData.of(self.data))
        if not 0 <= self.index < self.num_silos:
            raise ConfigError(f"silo index {self.index} outside 0..{self.num_silos - 1}")

    @property
    def contract(self) -> DataContract:
        return self.data.contract

    def load(self) -> SiloData:
        silos = _simulated_silos(
            self.data, self.num_silos, self.partition, self.test_fraction, self.seed
        )
        return silos[self.index]


# One load per process: a simulated ClientApp is rebuilt for every message, but the
# Ray actor (or process) running it lives on, and reloading data every round is waste.
@functools.lru_cache(maxsize=8)
def _simulated_silos(
    data: PooledData, num_silos: int, partition: PartitionSpec, test_fraction: float, seed: int
) -> tuple[SiloData, ...]:
    return tuple(simulation_silos(data, num_silos, partition, test_fraction, seed))


@functools.lru_cache(maxsize=8)
def _load_table_silo(
    table: DataSource,
    contract: DataContract,
    test_fraction: float,
    seed: int,
    stamp: tuple[int, int] | None,
) -> tuple[SiloData, ValidationReport]:
    schema = schema_for(contract)
    frame = load_silo_frame(table, schema)
    report = check_frame(contract, frame)
    split_seed = derive_seed(seed, "split", table.location)
    return silo_from_frame(schema, frame, test_fraction, split_seed), report


def check_contract(settings: SiloSettings, name: str, content_hash: str) -> None:
    """Refuse a request made under another data contract than the silo's own."""
    own = settings.data.contract
    if content_hash != own.content_hash():
        raise PolicyRefusalError(
            RefusalReason.DATA_CONTRACT,
            f"the server works under data contract {name!r} ({content_hash[:12]}), but silo "
            f"{settings.silo_id} holds data under {own.name!r} ({own.content_hash()[:12]}); "
            "the consortium must agree on one contract file",
        )


#: The silo's data-validation report, beside its ledger (it never leaves the silo).
VALIDATION_REPORT = "data-validation.json"


def load_silo_data(settings: SiloSettings) -> SiloData:
    """The silo's data, validated against the contract before anything uses it.

    The validation report is written to ``state_dir/data-validation.json`` either
    way; data that break the contract raise ContractViolationError (the caller
    refuses, having trained, charged and released nothing).
    """
    if not isinstance(settings.data, TableSiloSource):
        return settings.data.load()  # simulated silos: public data, validated when split
    try:
        data, report = settings.data.load_validated()
    except ContractViolationError as broken:
        _write_report(settings.state_dir, broken.report.to_json())
        raise
    _write_report(settings.state_dir, report.to_json())
    return data


def _write_report(state_dir: Path, text: str) -> None:
    path = state_dir / VALIDATION_REPORT
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as failed:
        raise DataError(f"cannot write the data-validation report {path}: {failed}") from None


@dataclass(frozen=True)
class SiloSettings:
    silo_id: str
    state_dir: Path
    budget: PrivacyBudget
    data: SiloDataSource
    # Everything else the silo's privacy depends on (fedguard.client.policy).
    policy: SiloPolicy = field(default_factory=SiloPolicy)
    # The silo's SecAgg identity key and the consortium key its roster must verify
    # under (fedguard.privacy.secagg.roster); None: it refuses every secure aggregation.
    identity: SiloIdentity | None = None
    # The node key the silo signs its log with (node config ``signing-key``); None:
    # the log is only chained (simulation).
    signing_key: Path | None = None
    # The consortium's own model, ``package.module:function`` from this silo's own
    # installation (node config ``model-factory``); the server's name is never imported.
    model_factory: str = ""

    def __post_init__(self) -> None:
        if not self.silo_id or "/" in self.silo_id:
            raise ConfigError(f"silo id must be a non-empty name without '/', got {self.silo_id!r}")


def settings_from_node_config(node_config: Mapping[str, object]) -> SiloSettings:
    """Parse a deployed SuperNode's ``--node-config`` once, at the boundary.

    Keys: ``silo-id``, the data contract (``contract``: the path of the silo's own copy
    of the consortium's TOML file, or ``dataset``: a built-in data set), ``state-dir``,
    ``target-epsilon``, ``delta``, the
    data source (``data-path`` for a CSV or Parquet file, or ``data-url`` and
    ``data-query`` for a SQL database: :mod:`fedguard.core.data_sources`) and
    optionally ``test-fraction``, ``seed``, the policy keys of
    :data:`fedguard.client.policy.POLICY_KEYS` and the SecAgg identity keys of
    :func:`identity_from_node_config`.
    """
    required = ("silo-id", "state-dir", "target-epsilon", "delta")
    missing = [k for k in required if k not in node_config]
    if missing:
        raise ConfigError(f"node config lacks {missing}; a silo needs all of {list(required)}")
    try:
        budget = PrivacyBudget(
            epsilon=float(str(node_config["target-epsilon"])),
            delta=float(str(node_config["delta"])),
        )
        test_fraction = float(str(node_config.get("test-fraction", 0.2)))
        seed = int(str(node_config.get("seed", 0)))
    except ValueError as bad:
        raise ConfigError(f"node config has a malformed number: {bad}") from None
    return SiloSettings(
        silo_id=str(node_config["silo-id"]),
        state_dir=Path(str(node_config["state-dir"])),
        budget=budget,
        data=TableSiloSource(
            table=source_from_node_config(node_config),
            contract=contract_from_node_config(node_config),
            test_fraction=test_fraction,
            seed=seed,
        ),
        policy=policy_from_node_config(node_config),
        identity=identity_from_node_config(node_config),
        signing_key=(
            Path(str(node_config["signing-key"]))
            if node_config.get("signing-key") not in (None, "")
            else None
        ),
        model_factory=str(node_config.get("model-factory", "")).strip(),
    )


def contract_from_node_config(node_config: Mapping[str, object]) -> DataContract:
    """The silo's own contract: its copy of the consortium's file, or a built-in's."""
    path, name = node_config.get("contract"), node_config.get("dataset")
    if path not in (None, "") and name not in (None, ""):
        raise ConfigError("node config names both 'contract' and 'dataset'; give one")
    if path not in (None, ""):
        return load_contract(Path(str(path)))
    if name in (None, ""):
        raise ConfigError(
            "node config names no data contract: give 'contract' (a TOML file) or "
            "'dataset' (a built-in data set)"
        )
    return builtin_contract(DatasetName.parse(str(name)))


#: Node-config keys of a silo's SecAgg identity (both or neither).
IDENTITY_KEY = "secagg-identity-key"  # path of the silo's Ed25519 identity private key
CONSORTIUM_KEY = "consortium-key"  # path of the trusted roster key (ca.crt, or a public key)


def identity_from_node_config(node_config: Mapping[str, object]) -> SiloIdentity | None:
    """The silo's SecAgg identity from ``secagg-identity-key`` and ``consortium-key``.

    Neither key: no identity (the silo refuses secure aggregation). One without the
    other, or files that do not load, is a configuration error.
    """
    given = [k for k in (IDENTITY_KEY, CONSORTIUM_KEY) if k in node_config]
    if not given:
        return None
    if len(given) == 1:
        raise ConfigError(
            f"node config has {given[0]!r} but not its pair: a SecAgg identity needs both "
            f"{IDENTITY_KEY!r} and {CONSORTIUM_KEY!r}"
        )
    try:
        return SiloIdentity.load(
            Path(str(node_config[IDENTITY_KEY])), Path(str(node_config[CONSORTIUM_KEY]))
        )
    except RosterError as bad:
        raise ConfigError(f"node config's SecAgg identity: {bad}") from None
