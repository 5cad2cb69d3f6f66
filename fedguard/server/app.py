"""The consortium's Flower ``ServerApp`` (Message API).

``make_server_app(config, ...)`` builds one for a known :class:`RunConfig` (the
simulator does this); the module-level ``app`` (``fedguard.server.app:app``) is
the deployed one and parses Flower's ``run_config`` once, at the boundary.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedguard.core.config import RunConfig
from fedguard.server.orchestrator import FederatedRun, RoundCallback


def make_server_app(
    config: RunConfig,
    run_id: str,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    reply_timeout: float | None = 900.0,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        FederatedRun(grid, config, run_id, run_dir, on_round, reply_timeout).run()

    return app


app = ServerApp()


@app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_options(dict(context.run_config))
    run_id = config.run_name or f"run-{uuid.uuid4().hex[:12]}"
    FederatedRun(grid, config, run_id, config.out / run_id).run()
