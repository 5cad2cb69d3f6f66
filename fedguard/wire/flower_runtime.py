"""Tuning of Flower's runtime shared by fedguard's server and client processes."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["FAST_PULL_BACKOFF_S", "REPLY_POLL_S", "PromptGrid", "fast_object_pulls"]

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


#: How often :class:`PromptGrid` asks the SuperLink for replies (Flower's Grid: every 3 s).
REPLY_POLL_S = 0.1


class PromptGrid(Grid):
    """A ServerApp's :class:`~flwr.serverapp.Grid` that asks for replies every 0.1 s.

    Flower's ``Grid.send_and_receive`` pushes the messages, then pulls replies and
    sleeps 3 s between pulls: a reply waits 1.5 s on average, twice a round (train,
    evaluate), before the server sees it. This grid does the same with Flower's own
    ``push_messages`` and ``pull_messages`` and waits ``poll`` s between pulls;
    everything else is the wrapped grid's. With ``timeout`` it returns the replies
    that came in time, as Flower's does.
    """

    def __init__(self, grid: Grid, poll: float = REPLY_POLL_S) -> None:
        if not 0.01 <= poll <= 3.0:
            raise ValueError(f"poll must lie in [0.01, 3] s, got {poll}")
        self._grid = grid
        self._poll = poll

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._poll)
        return replies
