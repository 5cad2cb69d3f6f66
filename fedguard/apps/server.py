"""The composition root of the server: ``fedguard.apps.server:server_app``.

The ServerApp a fedguard SuperLink runs, with the trust layer's post-training
phase (:func:`fedguard.trust.phase.trust_phase`) wired in.

:func:`fedguard.server.app.make_server_app` builds a ServerApp for a known
:class:`~fedguard.core.config.RunConfig` (the simulator does this) and knows
nothing of deployment. The deployed one here parses Flower's ``run_config`` once,
at the boundary, and wires the server's run into the deployment around it: one
ServerApp per run (the run folder's lock, :mod:`fedguard.deploy.run_lock`) and,
under a fedguard SuperLink (``fedguard server start`` sets ``FEDGUARD_SERVER_DIR``),
every round written to the server's signed audit log and its model registry
(:class:`~fedguard.deploy.recorder.DeploymentRecorder`), the run ended with its
outcome (``run-end``: completed, degraded, failed, stopped), and secure
aggregation authenticated with the server folder's signed roster
(``secagg-roster.json``, from ``fedguard ca sign-roster``).

The app bundles ``fedguard run`` writes name it (:mod:`fedguard.deploy.bundles`);
the silos run ``fedguard.apps.silo:client_app``, which imports no server code.
"""

from __future__ import annotations

import uuid

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedguard.core.config import RunConfig
from fedguard.deploy.layouts import ServerLayout
from fedguard.deploy.recorder import DeploymentRecorder
from fedguard.deploy.run_lock import hold_run_lock
from fedguard.server.orchestrator import FederatedRun
from fedguard.trust.phase import trust_phase
from fedguard.wire.flower_runtime import PromptGrid, fast_object_pulls

__all__ = ["server_app"]

server_app = ServerApp()


@server_app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_options(dict(context.run_config))
    run_id = config.run_name or f"run-{uuid.uuid4().hex[:12]}"
    run_dir = config.out / run_id
    fast_object_pulls()  # replies are pulled as soon as they are announced
    grid = PromptGrid(grid)  # and asked for every 0.1 s, not every 3 s
    # One ServerApp per run, whatever Flower launches (run_lock.RUN_LOCK says why).
    with hold_run_lock(run_dir, run_id, context.run_id):
        layout = ServerLayout.from_env()
        if layout is None:  # a SuperLink fedguard did not start: no audit log, no registry
            FederatedRun(grid, config, run_id, run_dir, post_training=trust_phase).run()
            return
        roster = layout.load_roster()  # the signed SecAgg roster, if the consortium made one
        with DeploymentRecorder.open(
            layout,
            run_id,
            config.to_options(),
            run_dir,
            flower_run_id=context.run_id,
            # The agreed data contract, by content: every silo checks it each round.
            data_contract={
                "name": config.contract.name,
                "version": config.contract.version,
                "sha256": config.contract.content_hash(),
            },
        ) as recorder:
            run = FederatedRun(
                grid,
                config,
                run_id,
                run_dir,
                on_round=recorder.on_round,
                roster=roster,
                post_training=trust_phase,  # the trust layer, when the run asks for it
            )
            run.run()
            recorder.finish(run.outcome)  # run-end: completed, degraded, failed or stopped
