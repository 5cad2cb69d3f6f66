"""A simulated consortium's SecAgg identities: the same roster path as a deployment.

:func:`provision_identities` makes, in a run variant's folder, what a real
consortium makes with ``fedguard node keygen`` and ``fedguard ca sign-roster``:

* ``consortium/consortium.key`` (Ed25519, 0600) and ``consortium/consortium.pub``:
  the consortium's roster key (a deployment signs with its CA key instead);
* ``silos/silo-i/secagg-identity.key`` (0600) and ``.pub``: each silo's identity key,
  in the silo's own state folder;
* ``consortium/secagg-roster.json``: the roster of every silo's public key, signed.

The server gets the signed roster (:func:`load_roster`); each simulated silo gets
its identity key and the consortium public key (:func:`silo_identity`), read from
those files exactly as a deployed silo reads the ones its node config names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedguard.audit.pki import (
    CONSORTIUM_KEY,
    CONSORTIUM_PUB,
    SECAGG_IDENTITY_KEY,
    SECAGG_IDENTITY_PUB,
    consortium_keygen,
    load_private_key,
    secagg_identity_keygen,
)
from fedguard.deploy.roster import ROSTER_FILE
from fedguard.privacy.secagg.roster import (
    SignedRoster,
    SiloIdentity,
    load_consortium_key,
    roster_from_files,
    sign_roster,
)
from fedguard.runs.layout import VariantFolder

__all__ = [
    "CONSORTIUM_DIR",
    "load_roster",
    "provision_identities",
    "silo_identity",
    "silo_state_dir",
]

CONSORTIUM_DIR = "consortium"
SIMULATED_CONSORTIUM = "fedguard simulation"


def silo_state_dir(run_dir: Path, silo_id: str) -> Path:
    return VariantFolder(Path(run_dir)).silo(silo_id)


def provision_identities(run_dir: Path, silo_ids: Sequence[str]) -> SignedRoster:
    """The consortium key, one identity key per silo and the signed roster (made once).

    A run folder that already holds a roster for these silos keeps it (silos
    refuse a second roster with the same serial).
    """
    folder = Path(run_dir) / CONSORTIUM_DIR
    roster_path = folder / ROSTER_FILE
    if roster_path.exists():
        signed = load_roster(run_dir)
        if set(signed.roster.silos) == set(silo_ids):
            return signed
    if not (folder / CONSORTIUM_KEY).exists():
        consortium_keygen(folder)
    for silo in silo_ids:
        if not (silo_state_dir(run_dir, silo) / SECAGG_IDENTITY_KEY).exists():
            secagg_identity_keygen(silo_state_dir(run_dir, silo))
    serial = SignedRoster.load(roster_path).roster.serial + 1 if roster_path.exists() else 1
    roster = roster_from_files(
        SIMULATED_CONSORTIUM,
        serial,
        {s: silo_state_dir(run_dir, s) / SECAGG_IDENTITY_PUB for s in silo_ids},
    )
    signed = sign_roster(roster, load_private_key(folder / CONSORTIUM_KEY))
    signed.save(roster_path)
    return signed


def load_roster(run_dir: Path) -> SignedRoster:
    """The run's signed roster, verified under its consortium key."""
    folder = Path(run_dir) / CONSORTIUM_DIR
    signed = SignedRoster.load(folder / ROSTER_FILE)
    signed.verify(load_consortium_key(folder / CONSORTIUM_PUB))
    return signed


def silo_identity(run_dir: Path, silo_id: str) -> SiloIdentity:
    """A simulated silo's identity key and the consortium key it trusts."""
    return SiloIdentity.load(
        silo_state_dir(run_dir, silo_id) / SECAGG_IDENTITY_KEY,
        Path(run_dir) / CONSORTIUM_DIR / CONSORTIUM_PUB,
    )
