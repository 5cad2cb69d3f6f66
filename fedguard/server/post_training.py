"""What the round loop hands a phase that runs after training: the final model and its silos.

The server room runs no trust code itself: the composition root gives
:class:`~fedguard.server.orchestrator.FederatedRun` a :data:`PostTrainingPhase`
(the trust layer's, :func:`fedguard.trust.phase.trust_phase`), called once on a
run that did not fail, with the final model's instruction and the means to query
the silos securely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import RecordDict

from fedguard.core.config import RunConfig
from fedguard.server.secure_metrics import SiloName
from fedguard.server.secure_round import SecAggIdentities, Send

__all__ = ["FinalModel", "PostTrainingPhase"]


@dataclass(frozen=True)
class FinalModel:
    """The run's final model and how to reach its silos, for a post-training phase.

    ``send`` queries the silos in the round after the last (``num_rounds + 1``);
    ``instruction`` carries the final weights and the federated scaler;
    ``identities`` (the signed roster, each node's silo id) authenticate every
    secure statistic.
    """

    send: Send
    nodes: Sequence[int]
    config: RunConfig
    run_dir: Path
    instruction: RecordDict
    silo_name: SiloName
    identities: SecAggIdentities | None


#: A phase run once after a run's last round (never after a failed run); what it
#: returns is its own (the round loop ignores it).
PostTrainingPhase = Callable[[FinalModel], object]
