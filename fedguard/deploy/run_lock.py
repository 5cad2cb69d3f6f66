"""One ServerApp per run: the run folder's lock (:data:`RUN_LOCK`)."""

from __future__ import annotations

from pathlib import Path

from fedguard.core.process_lock import FolderLockedError, ProcessLock, lock_holder, lock_is_held
from fedguard.deploy.errors import AlreadyRunningError

__all__ = ["RUN_LOCK", "RunActiveError", "hold_run_lock", "refuse_active_run"]

#: In each run folder: locked by the ServerApp running the run, for its life. Flower
#: launches again a ServerApp whose task token expired (one killed while starting, or
#: one whose SuperLink was killed: ``flwr/supercore/corestate/sql_corestate.py``,
#: ``_cleanup_expired_task_tokens``) beside the attempt ``fedguard run`` started
#: afresh; two would write one run's checkpoints and audit records at once.
RUN_LOCK = "serverapp.lock"


class RunActiveError(AlreadyRunningError):
    """A ServerApp already runs this run (it holds the run folder's lock)."""


def hold_run_lock(run_dir: Path, run_id: str, flower_run: object) -> ProcessLock:
    """The run folder's lock for this ServerApp's life, or :class:`RunActiveError`.

    Taken before anything is read or written (before ``run-start``): a second
    ServerApp for one run stops here, and the one already running goes on alone.
    """
    try:
        return ProcessLock.acquire(run_dir / RUN_LOCK, f"a ServerApp of run {run_id}")
    except FolderLockedError as busy:
        raise RunActiveError(
            f"{busy}; this ServerApp (Flower run {flower_run}) stops without starting"
        ) from None


def refuse_active_run(run_dir: Path, run_name: str) -> None:
    """:class:`RunActiveError` if a ServerApp of ``run_name`` holds ``run_dir``'s lock."""
    if lock_is_held(run_dir / RUN_LOCK):
        holder = lock_holder(run_dir / RUN_LOCK)
        raise RunActiveError(
            f"run {run_name} is running (its ServerApp, PID {holder}, holds "
            f"{run_dir / RUN_LOCK}); wait for it, or stop it with `flwr stop`, before "
            "starting it again"
        )
