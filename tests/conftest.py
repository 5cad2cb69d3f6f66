import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A Ray engine run is slow by nature (its cold start alone is 15-50 s).
    for item in items:
        if item.get_closest_marker("engine") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _server_task_identity() -> None:
    """Flower stamps new Messages with the running task's identity; tests act as the server."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
