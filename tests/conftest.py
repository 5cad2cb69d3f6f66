import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _server_task_identity() -> None:
    """Flower stamps new Messages with the running task's identity; tests act as the server."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
