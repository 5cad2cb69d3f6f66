"""The consortium's Flower ``ServerApp`` (Message API).

``make_server_app(config, ...)`` builds one for a known :class:`RunConfig` (the
simulator does this); the module-level ``app`` (``fedguard.server.app:app``) is
the deployed one and parses Flower's ``run_config`` once, at the boundary.

Under a fedguard SuperLink (``fedguard server start`` sets ``FEDGUARD_SERVER_DIR``)
the deployed one also writes every round to the server's signed audit log and
its model registry (:class:`~fedguard.server.commands.DeploymentRecorder`), ends it
with the run's outcome (``run-end``: completed, degraded, failed, stopped), and
authenticates secure aggregation with the server folder's signed roster
(``secagg-roster.json``, from ``fedguard ca sign-roster``).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedguard.core.config import RunConfig
from fedguard.core.flower_runtime import PromptGrid, fast_object_pulls
from fedguard.privacy.secagg.roster import SignedRoster
from fedguard.server.commands import DeploymentRecorder, ServerLayout, hold_run_lock
from fedguard.server.orchestrator import FederatedRun, RoundCallback
from fedguard.strategies.aggregators import Aggregator


def make_server_app(
    config: RunConfig,
    run_id: str,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    reply_timeout: float | None = 900.0,
    aggregator: Aggregator | None = None,
    roster: SignedRoster | None = None,
) -> ServerApp:
    """A ServerApp running one :class:`FederatedRun`; ``aggregator`` replaces the configured
    rule (any :class:`~fedguard.strategies.aggregators.Aggregator`, e.g. a user's own);
    ``roster`` is the consortium's signed SecAgg roster (needed for secure aggregation)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        FederatedRun(
            grid,
            config,
            run_id,
            run_dir,
            on_round,
            reply_timeout,
            aggregator=aggregator,
            roster=roster,
        ).run()

    return app


app = ServerApp()


@app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_options(dict(context.run_config))
    run_id = config.run_name or f"run-{uuid.uuid4().hex[:12]}"
    run_dir = config.out / run_id
    fast_object_pulls()  # replies are pulled as soon as they are announced
    grid = PromptGrid(grid)  # and asked for every 0.1 s, not every 3 s
    # One ServerApp per run, whatever Flower launches (commands.RUN_LOCK says why).
    with hold_run_lock(run_dir, run_id, context.run_id):
        layout = ServerLayout.from_env()
        if layout is None:  # a SuperLink fedguard did not start: no audit log, no registry
            FederatedRun(grid, config, run_id, run_dir).run()
            return
        roster = layout.load_roster()  # the signed SecAgg roster, if the consortium made one
        with DeploymentRecorder.open(
            layout, run_id, config.to_options(), run_dir, flower_run_id=context.run_id
        ) as recorder:
            run = FederatedRun(
                grid, config, run_id, run_dir, on_round=recorder.on_round, roster=roster
            )
            run.run()
            recorder.finish(run.outcome)  # run-end: completed, degraded, failed or stopped
