"""The composition root of a silo: the ClientApp a fedguard SuperNode runs.

``fedguard.apps.silo:client_app`` is the deployed silo agent
(:func:`fedguard.client.app.make_client_app`): its settings come from the
SuperNode's ``--node-config`` (:func:`~fedguard.client.silo.settings_from_node_config`),
non-private training is refused, and it answers the trust layer's statistics
(:data:`~fedguard.trust.silo_statistics.SILO_AND_TRUST_PRODUCERS`) besides its own.
This module imports no server, aggregation or deployment code.
"""

from __future__ import annotations

from flwr.app import Context

from fedguard.client.app import make_client_app
from fedguard.client.silo import SiloSettings, settings_from_node_config
from fedguard.trust.silo_statistics import SILO_AND_TRUST_PRODUCERS

__all__ = ["client_app"]


def _deployed_settings(context: Context) -> SiloSettings:
    return settings_from_node_config(context.node_config)


client_app = make_client_app(_deployed_settings, producers=SILO_AND_TRUST_PRODUCERS)
