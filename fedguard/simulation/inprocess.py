"""fedguard's in-process engine: a Flower ``Grid`` that calls ClientApps directly.

Flower's Ray engine costs 15–50 s of cold start a run; for tests and quick
research loops this engine runs the same ``ServerApp`` logic and the same
``ClientApp`` handlers in one process, one message at a time. Each message is
copied on the way in and out (as the wire would), each virtual node keeps its own
``Context`` (``node_config`` with ``partition-id`` / ``num-partitions`` like
Flower's simulation, and a persistent ``state``), and a ClientApp that raises is
answered with a Flower error reply, as the real engines do.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

# Flower's SUPERLINK_NODE_ID: the node id the server side sends from.
SUPERLINK_NODE_ID = 1

# Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
CLIENT_APP_RAISED_EXCEPTION = 2


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self._client_app = client_app
        # Node ids are not 0..n-1 on purpose: code must not confuse ids with partitions.
        self._nodes = {1000 + 7 * i: i for i in range(num_nodes)}
        self._contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config={"partition-id": part, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node, part in self._nodes.items()
        }
        self._replies: dict[str, Message] = {}
        self._run: Run | None = None

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        if self._run is None:
            raise RuntimeError("no run set")
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n) for n in self._nodes]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for message in messages:
            message_id = str(uuid.uuid4())
            message.metadata.__dict__["_message_id"] = message_id
            node = message.metadata.dst_node_id
            if node not in self._contexts:
                continue  # like a SuperLink: a message to an unknown node gets no reply
            delivered = Message(
                copy.deepcopy(message.content),
                dst_node_id=node,
                message_type=message.metadata.message_type,
                group_id=message.metadata.group_id,
            )
            delivered.metadata.__dict__["_message_id"] = message_id
            try:
                reply = self._client_app(delivered, self._contexts[node])
                reply = (
                    Message(copy.deepcopy(reply.content), reply_to=delivered)
                    if (reply.has_content())
                    else Message(reply.error, reply_to=delivered)
                )
            except Exception as raised:
                reply = Message(
                    Error(
                        code=CLIENT_APP_RAISED_EXCEPTION,
                        reason=f"{type(raised).__name__}: {raised}",
                    ),
                    reply_to=delivered,
                )
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(
    server_app: ServerApp, client_app: ClientApp, num_nodes: int, run_id: int = 1
) -> None:
    """Run ``server_app`` against ``num_nodes`` virtual silos in this process."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    grid = InProcessGrid(client_app, num_nodes, run_id)
    context = Context(
        run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={}
    )
    server_app(grid, context)
