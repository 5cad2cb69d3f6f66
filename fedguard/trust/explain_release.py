"""Global attributions of the distilled student, at export, as for the global model.

The export rebuilds the run's silos in process (see :mod:`fedguard.edge.export`);
each silo here computes the student's clipped Integrated-Gradients sum on its own
split with the same producer as the trust phase
(:func:`fedguard.trust.explanations.attribution_statistic`) and releases it through
the same silo-side path (:mod:`fedguard.client.statistic_release`): σ calibrated to the
run's ``explain-epsilon`` at the silo's δ, the silo's persistent ledger charged
(purpose ``attribution``, run id ``<teacher run id>/student-<weights hash>``,
query round 0) *before* CSPRNG noise is added, the release stored so that
exporting the same student again replays it instead of charging again (another
student, another run id: a new release). The noised vectors are then summed.

What differs from the trust phase: one process holds every silo (a simulation),
so the sum is taken in memory instead of through SecAgg+; a deployed export
would send the student as a statistic query. A run planned with ``explain``
reserves budget for this release in every silo
(:meth:`fedguard.core.trust_config.TrustConfig.planned_releases`); a silo without budget
for it (a run planned otherwise) refuses it, and the export records why and goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from fedguard.client.silo import SiloSettings, SimulatedSiloSource
from fedguard.client.statistic_release import noised_release
from fedguard.core.datasets import FeatureSchema
from fedguard.core.errors import FedguardError
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.serialization import model_weights, weights_sha256
from fedguard.core.silos import PooledData
from fedguard.core.trust_config import TrustNoise
from fedguard.runs.layout import silo_id as simulated_silo_id
from fedguard.trust.explanations import (
    AttributionSettings,
    DataSplit,
    attribution_statistic,
    output_description,
)
from fedguard.trust.results import (
    AttributionResult,
    ReleaseCost,
    attribution_from_sum,
    attribution_vector_length,
)
from fedguard.wire.statistics import StatisticKind, StatisticRequest

if TYPE_CHECKING:
    from fedguard.runs.saved import SavedRun

__all__ = [
    "STUDENT_RUN_SUFFIX",
    "silo_settings",
    "student_attributions",
    "student_release_run_id",
]

STUDENT_RUN_SUFFIX = "/student-"
# The resolution the trust phase uses for attribution sums (the request needs one;
# in-memory summing does not quantize).
_RESOLUTION = 2.0**-12


def silo_settings(saved: SavedRun, index: int) -> SiloSettings:
    """The settings of simulated silo ``index`` of a saved run (its own state folder)."""
    run = saved.config
    silo_id = simulated_silo_id(index)
    return SiloSettings(
        silo_id=silo_id,
        state_dir=saved.silo_dir(silo_id),
        budget=run.budget,
        data=SimulatedSiloSource(
            data=PooledData.for_run(run),
            num_silos=run.num_clients,
            partition=run.partition,
            index=index,
            test_fraction=run.test_fraction,
            seed=run.seed,
        ),
    )


def student_release_run_id(saved: SavedRun, student: nn.Module) -> str:
    """The run id a student's attribution release is charged under."""
    return saved.run_id + STUDENT_RUN_SUFFIX + weights_sha256(model_weights(student))[:16]


def student_attributions(
    saved: SavedRun,
    student: nn.Module,
    scaler: FeatureScaler,
    schema: FeatureSchema,
) -> tuple[AttributionResult | None, str | None]:
    """(the student's mean attributions, why not) — ``(None, None)`` when the run asked none.

    Runs only when the teacher run asked for explanations (``explain``), with its
    ε, steps, clip norm and noise setting.
    """
    trust = saved.config.trust
    if not trust.explain:
        return None, None
    settings = AttributionSettings(
        clip_norm=trust.explain_clip_norm, steps=trust.explain_steps, split=DataSplit.TRAIN
    )
    options: Mapping[str, Any] = settings.to_options()
    request = StatisticRequest(
        kind=StatisticKind.ATTRIBUTION,
        query_round=0,
        target_epsilon=trust.explain_epsilon,
        noise=trust.noise,
        resolution=_RESOLUTION,
        vector_length=attribution_vector_length(schema.num_features),
        options=options,
    )
    # The student's own weights name the release: the same student replays it.
    run_id = student_release_run_id(saved, student)
    total = np.zeros(attribution_vector_length(schema.num_features))
    epsilons: dict[str, float] = {}
    spent: dict[str, float] = {}
    sigmas: list[float] = []
    deltas: list[float] = []
    for index in range(saved.config.num_clients):
        silo = silo_settings(saved, index)
        statistic = attribution_statistic(silo.data.load(), student, scaler, options)
        if trust.noise is TrustNoise.NONE:
            total += statistic.values
            continue
        try:
            noised, metrics = noised_release(silo, run_id, request, statistic)
        except FedguardError as refused:
            return None, f"{silo.silo_id} refused the student's attribution release: {refused}"
        total += noised
        epsilons[silo.silo_id] = float(metrics["release-epsilon"])
        spent[silo.silo_id] = float(metrics["epsilon-spent"])
        sigmas.append(float(metrics["noise-multiplier"]))
        deltas.append(float(metrics["delta"]))
    cost = ReleaseCost(
        epsilon=max(epsilons.values(), default=math.inf)
        if trust.noise is TrustNoise.GAUSSIAN
        else math.inf,
        delta=max(deltas, default=0.0),
        noise_multiplier=max(sigmas, default=0.0),
        contributors=saved.config.num_clients,
        epsilon_by_silo=spent,
    )
    return (
        attribution_from_sum(
            total,
            schema.feature_names,
            model="student",
            clip_norm=settings.clip_norm,
            steps=settings.steps,
            output=output_description(schema),
            cost=cost,
        ),
        None,
    )
