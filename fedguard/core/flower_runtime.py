"""Tuning of Flower's runtime shared by fedguard's server and client processes."""

from __future__ import annotations

__all__ = ["FAST_PULL_BACKOFF_S", "fast_object_pulls"]

#: First retry delay when a message's objects are not there yet (Flower's default: 1 s).
FAST_PULL_BACKOFF_S = 0.05


def fast_object_pulls(initial_backoff: float = FAST_PULL_BACKOFF_S) -> None:
    """Retry Flower's object pulls after ``initial_backoff`` s instead of 1 s.

    A SuperNode creates a ClientApp task *before* it has pulled the message's
    objects from the SuperLink; a task process that starts at once (as a warm one
    does) finds them missing and Flower's ``pull_objects`` waits 1 s (±20 %)
    before trying again: 1.25 s of every task, measured. The same happens to a
    ServerApp pulling replies whose objects are still being pushed. Flower takes
    the delay as a keyword default, bound when the function was defined; this
    sets that default for the calling process. The number of tries (500), the
    backoff cap (10 s) and the time limit (7200 s) stay Flower's: doubling from
    0.05 s reaches the cap after 8 tries instead of 4, so the longest wait for an
    object shrinks by about 3 s in some 4,900 s.
    """
    from flwr.supercore.inflatable import inflatable_utils

    for function in (
        inflatable_utils.pull_objects,
        inflatable_utils.pull_and_inflate_object_from_tree,
    ):
        defaults = function.__kwdefaults__
        if defaults is not None and "initial_backoff" in defaults:
            defaults["initial_backoff"] = initial_backoff
