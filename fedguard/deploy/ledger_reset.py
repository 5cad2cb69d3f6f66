"""``fedguard client reset-ledger``: the one deliberate way to start a silo's budget afresh.

Deleting or replacing ``privacy-ledger.sqlite`` is refused by the silo itself
(:mod:`fedguard.client.ledger_guard`). A consortium that agrees a silo may start
over (new data under a new agreement, a decision its data-protection officer
signs off) runs this command on the stopped silo: the old ledger is archived,
a new one is created, and the silo's signed log records a ``reset`` naming the
old ledger, its head and lifetime ε, and the reason. The silo log is the silo's
own tamper-evident record, which the consortium verifies with the node's public
key (``fedguard audit verify --public-key node.pub``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from fedguard.core.errors import ConfigError
from fedguard.deploy.layouts import SiloLayout

__all__ = ["reset_silo_ledger"]


def reset_silo_ledger(state_dir: Path, reason: str, confirmed: bool) -> int:
    """Archive a stopped silo's ledger and start a new one, recorded in its signed log."""
    # Imported here: building the CLI's parser must not load the accountant (scipy).
    from fedguard.client.ledger_guard import reset_ledger
    from fedguard.client.silo import settings_from_node_config
    from fedguard.core.process_lock import ProcessLock

    layout = SiloLayout(state_dir.resolve())
    node_config = layout.node_config  # written by ``fedguard client start``
    if not node_config.is_file():
        raise ConfigError(
            f"{node_config} does not exist: reset-ledger works on a state folder that "
            "`fedguard client start` set up"
        )
    if not confirmed:
        raise ConfigError(
            "a ledger reset gives the silo a fresh privacy budget; it is recorded in the "
            "silo's signed log. Pass --yes to confirm"
        )
    try:
        values = tomllib.loads(node_config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as bad:
        raise ConfigError(f"cannot read {node_config}: {bad}") from None
    settings = settings_from_node_config(values)
    # Only while the silo is stopped: its SuperNode holds this lock for its life.
    with ProcessLock.acquire(layout.lock_file, "the silo's SuperNode"):
        archived = reset_ledger(settings, reason)
    print(f"silo {settings.silo_id}: ledger reset ({reason.strip()!r}), logged in its log")
    if archived is not None:
        print(f"  the old ledger is kept at {archived}")
    return 0
