"""The consortium's Flower ``ServerApp`` (Message API).

``make_server_app(config, ...)`` builds one for a known :class:`RunConfig` (the
simulator does this). The deployed one, which parses Flower's ``run_config`` and
writes the audit log and the model registry around the run, is wired in the
composition root :mod:`fedguard.apps` (``fedguard.apps.server:server_app``): the server
room knows nothing of deployment.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedguard.aggregation.aggregators import Aggregator
from fedguard.core.config import RunConfig
from fedguard.core.errors import ConfigError
from fedguard.privacy.secagg.roster import SignedRoster
from fedguard.server.orchestrator import FederatedRun, RoundCallback
from fedguard.server.post_training import PostTrainingPhase


def make_server_app(
    config: RunConfig,
    run_id: str,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    aggregator: Aggregator | None = None,
    roster: SignedRoster | None = None,
    post_training: PostTrainingPhase | None = None,
) -> ServerApp:
    """A ServerApp running one :class:`FederatedRun`; ``aggregator`` replaces the configured
    rule (any :class:`~fedguard.strategies.aggregators.Aggregator`, e.g. a user's own);
    ``roster`` is the consortium's signed SecAgg roster (needed for secure aggregation);
    ``post_training`` runs after the last round (a run with the trust layer on needs
    :func:`fedguard.trust.phase.trust_phase`)."""
    if config.trust.enabled and post_training is None:
        raise ConfigError(
            "the run asks for the trust layer: pass post_training=fedguard.trust.phase.trust_phase"
        )
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        FederatedRun(
            grid,
            config,
            run_id,
            run_dir,
            on_round,
            aggregator=aggregator,
            roster=roster,
            post_training=post_training,
        ).run()

    return app
