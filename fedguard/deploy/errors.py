"""The errors every deployment step shares."""

from __future__ import annotations

from fedguard.core.errors import FedguardError

__all__ = ["AlreadyRunningError", "DeploymentError"]


class DeploymentError(FedguardError):
    """A deployment command failed (a process did not start, a Flower command failed)."""


class AlreadyRunningError(DeploymentError):
    """Another process holds the folder's lock (a second ``start`` on one folder)."""
