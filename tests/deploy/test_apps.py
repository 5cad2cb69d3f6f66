"""The deployed ServerApp: its composition root and the grid it drives."""

from typing import Any

from flwr.serverapp import ServerApp

from fedguard.deploy.bundles import SERVERAPP_REF


def test_the_app_bundles_name_the_composition_roots_server_app() -> None:
    import importlib

    module, _, name = SERVERAPP_REF.partition(":")
    assert module == "fedguard.apps.server"
    assert isinstance(getattr(importlib.import_module(module), name), ServerApp)


def test_prompt_grid_pulls_replies_every_poll_and_keeps_flower_timeout_semantics() -> None:
    import time as clock

    from flwr.app import Message, RecordDict

    from fedguard.wire.flower_runtime import PromptGrid

    class Replies:
        """Stands in for Flower's grid: message ``i`` gets its reply at pull ``i + 1``."""

        def __init__(self) -> None:
            self.pulls = 0

        def push_messages(self, messages: Any) -> list[str]:
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids: Any) -> list[Message]:
            self.pulls += 1
            out = []
            for message_id in sorted(ids):
                if int(message_id[1:]) < self.pulls:
                    reply = Message(RecordDict(), dst_node_id=1, message_type="train")
                    reply.metadata.__dict__["_reply_to_message_id"] = message_id
                    out.append(reply)
            return out

    fake = Replies()
    grid = PromptGrid(fake, poll=0.01)  # type: ignore[arg-type]
    started = clock.monotonic()
    replies = list(grid.send_and_receive([object(), object(), object()]))  # type: ignore[list-item]
    assert len(replies) == 3 and fake.pulls == 3
    assert clock.monotonic() - started < 1.0  # Flower's own grid would sleep 6 s here
    never = Replies()
    never.pulls = -100  # replies only after 100 pulls
    partial = PromptGrid(never, poll=0.01)  # type: ignore[arg-type]
    assert list(partial.send_and_receive([object()], timeout=0.05)) == []  # type: ignore[list-item]
