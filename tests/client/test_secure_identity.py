"""A silo's roster check before a SecAgg round: every way a server can cheat is refused."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import ConfigRecord

from fedguard.audit import pki
from fedguard.client.policy import PolicyRefusalError, RefusalReason
from fedguard.client.secure_identity import ROSTER_STATE, RoundIdentity, authenticate_setup
from fedguard.client.silo import SiloSettings, settings_from_node_config
from fedguard.core.errors import ConfigError
from fedguard.privacy.secagg.crypto import ed25519_keypair
from fedguard.privacy.secagg.messages import SetupRequest
from fedguard.privacy.secagg.roster import Roster, SignedRoster, sign_roster
from fedguard.server.secure_round import SecAggIdentities, SecureAggregationSettings
from fedguard.wire.secagg import ROSTER, ROUND_NONCE, SILO_IDS
from tests.factories import consortium_identities, inprocess_node, silo_settings

NODES = [inprocess_node(i) for i in range(3)]


def _setup(
    identities: SecAggIdentities, require_identity: bool = True
) -> tuple[SetupRequest, dict[str, Any]]:
    settings = SecureAggregationSettings(identities=identities, require_identity=require_identity)
    server, options = settings.begin(NODES, 8)
    return server.setup_requests()[NODES[0]], options


def _check(
    settings: SiloSettings, setup: SetupRequest, options: dict[str, Any], node: int = NODES[0]
) -> RoundIdentity:
    return authenticate_setup(setup, ConfigRecord(options), settings, node)


def _refused(reason: RefusalReason, match: str, call: Callable[[], object]) -> None:
    with pytest.raises(PolicyRefusalError, match=match) as refused:
        call()
    assert refused.value.reason is reason


def test_an_honest_setup_gives_the_cohorts_registry(tmp_path: Path) -> None:
    identities = consortium_identities(tmp_path, 3)
    setup, options = _setup(identities)
    silo = silo_settings(tmp_path, 0)
    verified = _check(silo, setup, options)
    roster = identities.roster.roster
    assert dict(verified.registry) == {n: roster.silos[f"silo-{i}"] for i, n in enumerate(NODES)}
    assert silo.identity is not None and verified.key == silo.identity.private_key
    assert (silo.state_dir / ROSTER_STATE).exists()
    _check(silo, setup, options)  # the same roster again: fine


def test_a_silo_without_identity_refuses(tmp_path: Path) -> None:
    setup, options = _setup(consortium_identities(tmp_path, 3))
    silo = silo_settings(tmp_path, 0, identity=False)
    _refused(
        RefusalReason.SECAGG_ROSTER, "no SecAgg identity", lambda: _check(silo, setup, options)
    )


def test_an_unauthenticated_setup_is_refused(tmp_path: Path) -> None:
    setup, options = _setup(consortium_identities(tmp_path, 3), require_identity=False)
    assert not setup.config.require_identity and options == {}
    _refused(
        RefusalReason.SECAGG_UNAUTHENTICATED,
        "unauthenticated",
        lambda: _check(silo_settings(tmp_path, 0), setup, options),
    )


def test_a_forged_or_foreign_roster_is_refused(tmp_path: Path) -> None:
    identities = consortium_identities(tmp_path, 3)
    setup, options = _setup(identities)
    silo = silo_settings(tmp_path, 0)
    # The server signs its own roster (its own key for silo-1): another consortium key.
    keys = dict(identities.roster.roster.silos)
    keys["silo-1"] = ed25519_keypair()[1]
    server_key = ed25519.Ed25519PrivateKey.generate()
    own = sign_roster(Roster("the server", 9, keys), server_key)
    _refused(
        RefusalReason.SECAGG_ROSTER,
        "does not verify",
        lambda: _check(silo, setup, {**options, ROSTER: own.to_bytes()}),
    )
    # The consortium's signature over the honest roster, on the substituted one.
    forged = SignedRoster(own.roster, identities.roster.algorithm, "x", identities.roster.signature)
    _refused(
        RefusalReason.SECAGG_ROSTER,
        "does not verify",
        lambda: _check(silo, setup, {**options, ROSTER: forged.to_bytes()}),
    )
    _refused(
        RefusalReason.SECAGG_ROSTER,
        "not JSON",
        lambda: _check(silo, setup, {**options, ROSTER: b"garbage"}),
    )
    _refused(
        RefusalReason.SECAGG_ROSTER,
        "no 'roster'",
        lambda: _check(silo, setup, {k: v for k, v in options.items() if k != ROSTER}),
    )
    # A silo that trusts another consortium key refuses the genuine roster.
    _, other_pub = pki.consortium_keygen(tmp_path / "other-consortium")
    other = dataclasses.replace(
        silo,
        identity=type(silo.identity).load(  # type: ignore[union-attr]
            silo.state_dir / pki.SECAGG_IDENTITY_KEY, other_pub
        ),
    )
    _refused(RefusalReason.SECAGG_ROSTER, "does not verify", lambda: _check(other, setup, options))


def test_a_roster_that_substitutes_this_silos_own_key_is_refused(tmp_path: Path) -> None:
    identities = consortium_identities(tmp_path, 3)
    keys = dict(identities.roster.roster.silos)
    keys["silo-0"] = ed25519_keypair()[1]  # a key silo-0 does not hold (the server's)
    consortium = pki.load_private_key(tmp_path / "consortium" / pki.CONSORTIUM_KEY)
    substituted = sign_roster(Roster("test consortium", 5, keys), consortium)
    setup, options = _setup(dataclasses.replace(identities, roster=substituted))
    _refused(
        RefusalReason.SECAGG_ROSTER,
        "not this silo's own key",
        lambda: _check(silo_settings(tmp_path, 0), setup, options),
    )


@pytest.mark.parametrize(
    ("silo_ids", "match"),
    [
        (["silo-0", "silo-0", "silo-2"], "assigned to two nodes"),
        (["silo-0", "silo-1", "silo-9"], "not in the consortium's roster"),
        (["silo-0", "silo-1"], "2 silo ids for a round of 3"),
        (["silo-1", "silo-0", "silo-2"], "lists this node as silo 'silo-1'"),
        (["silo-0", "silo-2", "silo-1"], "does not commit"),
    ],
)
def test_a_bad_silo_list_is_refused(tmp_path: Path, silo_ids: list[str], match: str) -> None:
    setup, options = _setup(consortium_identities(tmp_path, 3))
    _refused(
        RefusalReason.SECAGG_ROSTER,
        match,
        lambda: _check(silo_settings(tmp_path, 0), setup, {**options, SILO_IDS: silo_ids}),
    )


def test_a_round_id_that_does_not_commit_to_the_roster_is_refused(tmp_path: Path) -> None:
    setup, options = _setup(consortium_identities(tmp_path, 3))
    _refused(
        RefusalReason.SECAGG_ROSTER,
        "does not commit",
        lambda: _check(silo_settings(tmp_path, 0), setup, {**options, ROUND_NONCE: bytes(16)}),
    )


def test_a_rolled_back_roster_is_refused(tmp_path: Path) -> None:
    identities = consortium_identities(tmp_path, 3)
    consortium = pki.load_private_key(tmp_path / "consortium" / pki.CONSORTIUM_KEY)
    keys = dict(identities.roster.roster.silos)
    newer = sign_roster(Roster("test consortium", 2, keys), consortium)
    silo = silo_settings(tmp_path, 0)
    _check(silo, *_setup(dataclasses.replace(identities, roster=newer)))
    _refused(
        RefusalReason.SECAGG_ROSTER,
        "older than serial 2",
        lambda: _check(silo, *_setup(identities)),
    )
    other_two = sign_roster(Roster("test consortium", 2, keys, "another day"), consortium)
    _refused(
        RefusalReason.SECAGG_ROSTER,
        "two different rosters with one serial",
        lambda: _check(silo, *_setup(dataclasses.replace(identities, roster=other_two))),
    )


def test_node_config_keys_of_the_identity(tmp_path: Path) -> None:
    key, _ = pki.secagg_identity_keygen(tmp_path / "keys")
    ca = pki.init_ca(tmp_path / "ca")
    base = {
        "silo-id": "hospital-a",
        "dataset": "breast-cancer",
        "data-path": str(tmp_path / "a.csv"),
        "state-dir": str(tmp_path / "state"),
        "target-epsilon": "3.0",
        "delta": "1e-5",
    }
    assert settings_from_node_config(base).identity is None
    both = {**base, "secagg-identity-key": str(key), "consortium-key": str(ca.cert)}
    identity = settings_from_node_config(both).identity
    assert identity is not None and len(identity.public_key) == 32
    with pytest.raises(ConfigError, match="not its pair"):
        settings_from_node_config({**base, "secagg-identity-key": str(key)})
    with pytest.raises(ConfigError, match="SecAgg identity"):
        settings_from_node_config({**both, "secagg-identity-key": str(tmp_path / "missing")})
