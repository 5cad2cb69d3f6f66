"""The two SecAgg+ paths of a training round: one secure sum, or robust rules over groups.

Split from :mod:`fedguard.server.orchestrator` (which calls them with itself as
``run``): the server learns one sum per SecAgg+ instance, never one silo's update.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message, RecordDict

from fedguard.aggregation.aggregators import AggregationError
from fedguard.aggregation.pipeline import (
    SECAGG_LABEL,
    AggregationOutcome,
    GroupSum,
    GroupSums,
    SecureSum,
)
from fedguard.privacy.secagg import FixedPointEncoder, SecAggError
from fedguard.server.norm_guard import secure_clip_norm, secure_sum_violation
from fedguard.server.round_records import ChargeState, NodeOutcome, OutcomeStatus
from fedguard.server.secure_round import (
    SecureAggregationSettings,
    SecureRoundAborted,
    SecureRoundResult,
    node_outcomes,
    run_secure_groups,
)

if TYPE_CHECKING:
    from fedguard.server.orchestrator import FederatedRun

__all__ = ["SECAGG_MIN_CLIENTS", "grouped_secure_updates", "secure_updates"]

log = logging.getLogger(__name__)

# SecAggConfig needs n >= 3: with two silos each would learn the other's update.
SECAGG_MIN_CLIENTS = 3


def grouped_secure_updates(
    run: FederatedRun,
    round_number: int,
    sampled: list[int],
    instruction: RecordDict,
    global_vector: np.ndarray,
) -> tuple[list[NodeOutcome], AggregationOutcome, int]:
    """SecAgg+ inside random groups; the robust rule runs over the group means.

    The server learns one sum per group, never one silo's update. Silos clip Δ
    to ``secagg.clip_norm`` before masking (when set); a group whose mean breaks
    the bound is flagged and left out. A group that aborts is left out too; the
    rule's precondition is checked against the groups that remain.
    """
    secagg = run.config.secagg
    groups = run.secure_groups(round_number, sampled)
    names = [[run.silo_name(n) for n in g] for g in groups]
    rule = run.pipeline.aggregator.name
    small = [len(g) for g in groups if len(g) < secagg.min_group_size]
    if small:
        reason = (
            f"{len(sampled)} silos sampled make groups of {small} silos, below the minimum "
            f"group size {secagg.min_group_size}"
        )
        log.error("round %d: %s", round_number, reason)
        aborted = [_not_started(n, run.silo_name(n), reason) for n in sampled]
        return (
            aborted,
            AggregationOutcome(
                global_vector.copy(), {"rule": rule, "groups": names, "aborted": reason}
            ),
            0,
        )
    settings = SecureAggregationSettings(
        clip_range=secagg.clip_range,
        value_bits=secagg.value_bits,
        dropout_rate=secagg.dropout_rate,
        weight_unit=1,
        clip_norm=secure_clip_norm(run.config),
        identities=run.identities_for(round_number, sampled),
    )

    def send(message_type: str, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
        return run.send_each(message_type, round_number, contents)

    results = run_secure_groups(
        send,
        groups,
        instruction,
        global_vector.size,
        settings,
    )
    outcomes, sums, group_log, tolerance = _group_results(
        run, round_number, results, names, global_vector.size
    )
    try:
        aggregated = run.pipeline.apply(
            GroupSums(global_vector, tuple(sums), settings.clip_norm, tolerance)
        )
    except AggregationError as failed:
        log.error("round %d: aggregation over groups failed: %s", round_number, failed)
        aggregated = AggregationOutcome(global_vector.copy(), {"rule": rule, "failed": str(failed)})
    for flagged in aggregated.details.get("flagged-groups", []):
        log.warning(
            "round %d: secure group %s flagged: %s",
            round_number,
            flagged["group"],
            flagged["reason"],
        )
    aggregated.details.update({"groups": group_log, "group-seed": run.config.seed})
    if "failed" in aggregated.details:
        return outcomes, aggregated, 0
    outcomes = _leave_out_flagged(outcomes, aggregated)
    accepted = sum(1 for o in outcomes if o.status is OutcomeStatus.OK)
    return outcomes, aggregated, accepted


def _group_results(
    run: FederatedRun,
    round_number: int,
    results: Sequence[SecureRoundResult | SecureRoundAborted],
    names: list[list[str]],
    dim: int,
) -> tuple[list[NodeOutcome], list[GroupSum], list[dict[str, Any]], float]:
    """Each group's silo outcomes, the sums of those that finished, the group log, and
    the largest fixed-point rounding a group mean may carry."""
    outcomes: list[NodeOutcome] = []
    sums: list[GroupSum] = []
    group_log: list[dict[str, Any]] = []
    tolerance = 0.0
    for index, result in enumerate(results):
        if isinstance(result, SecAggError):
            reason = f"group {index} aborted: {result}"
            log.error("round %d: %s", round_number, reason)
            outcomes += node_outcomes(result.report, (), run.silo_name, aborted=reason)
            group_log.append({"group": index, "members": names[index], "aborted": str(result)})
            continue
        assert result.report is not None
        outcomes += node_outcomes(result.report, result.contributors, run.silo_name)
        members = tuple(run.silo_name(n) for n in result.contributors)
        sums.append(GroupSum(members, result.weighted_sum, float(result.total_weight)))
        group_log.append(
            {
                "group": index,
                "members": names[index],
                "contributors": list(members),
                "total-weight": float(result.total_weight),
            }
        )
        # Stochastic rounding moves each coordinate of the mean by < one step.
        tolerance = max(tolerance, FixedPointEncoder(result.config).step * math.sqrt(dim))
    return outcomes, sums, group_log, tolerance


def _leave_out_flagged(
    outcomes: list[NodeOutcome], aggregated: AggregationOutcome
) -> list[NodeOutcome]:
    """A flagged group is left out of the rule: its members are not in the aggregate."""
    left_out = {
        member: str(flagged["reason"])
        for flagged in aggregated.details.get("flagged-groups", [])
        for member in flagged.get("members", [])
    }
    return [
        dataclasses.replace(
            o,
            status=OutcomeStatus.REJECTED,
            reason=f"its secure group was left out: {left_out[o.silo_id]}",
        )
        if o.status is OutcomeStatus.OK and o.silo_id in left_out
        else o
        for o in outcomes
    ]


def secure_updates(
    run: FederatedRun,
    round_number: int,
    sampled: list[int],
    instruction: RecordDict,
    global_vector: np.ndarray,
    population: int,
) -> tuple[list[NodeOutcome], AggregationOutcome, int]:
    """SecAgg+: the server learns only the sum of the surviving silos' updates.

    Per-silo checks of names, shapes and finite values move to the silo (its
    encoder refuses NaN/Inf and counts clipped values); the server checks the
    masked vectors' length and every protocol message. A SecAgg abort leaves
    the model unchanged and the run goes on with the next round.
    """
    central = run.config.central_dp
    settings = SecureAggregationSettings(
        clip_range=run.config.secagg.clip_range,
        value_bits=run.config.secagg.value_bits,
        dropout_rate=run.config.secagg.dropout_rate,
        # DP-FedAvg needs uniform weights and a per-silo L2 bound before the sum.
        weight_unit=0 if central.enabled else 1,
        clip_norm=secure_clip_norm(run.config),  # update_clip_norm unless set otherwise
        identities=run.identities_for(round_number, sampled),
    )

    def send(message_type: str, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
        return run.send_each(message_type, round_number, contents)

    if len(sampled) < SECAGG_MIN_CLIENTS:
        reason = (
            f"secure aggregation aborted at stage 'setup': {len(sampled)} silo(s) sampled; "
            f"secure aggregation needs at least {SECAGG_MIN_CLIENTS}"
        )
        log.error("round %d: %s", round_number, reason)
        outcomes = [_not_started(node, run.silo_name(node), reason) for node in sampled]
        details = {"rule": SECAGG_LABEL, "aborted": reason}
        return outcomes, AggregationOutcome(global_vector.copy(), details), 0
    (result,) = run_secure_groups(send, [sampled], instruction, global_vector.size, settings)
    if isinstance(result, SecureRoundAborted):
        log.error("round %d: secure aggregation aborted: %s", round_number, result)
        outcomes = node_outcomes(result.report, (), run.silo_name, aborted=str(result))
        details = {"rule": SECAGG_LABEL, "aborted": str(result)}
        return outcomes, AggregationOutcome(global_vector.copy(), details), 0
    assert result.report is not None
    contributors = set(result.contributors)
    outcomes = node_outcomes(result.report, result.contributors, run.silo_name)
    rounding = FixedPointEncoder(result.config).step * math.sqrt(global_vector.size)
    violation = secure_sum_violation(
        result.weighted_sum, result.total_weight, settings.clip_norm, rounding
    )
    if violation is not None:  # the norm guard: a silo in the sum did not clip
        log.error("round %d: %s", round_number, violation)
        rejected = [
            dataclasses.replace(o, status=OutcomeStatus.REJECTED, reason=violation)
            if o.status is OutcomeStatus.OK
            else o
            for o in outcomes
        ]
        details = {"rule": SECAGG_LABEL, "rejected": violation}
        return rejected, AggregationOutcome(global_vector.copy(), details), 0
    aggregated = run.pipeline.apply(
        SecureSum(global_vector, result.weighted_sum, float(result.total_weight), population)
    )
    aggregated.details.update(
        {
            "secagg-degree": result.config.degree,
            "secagg-threshold": result.config.threshold,
        }
    )
    return outcomes, aggregated, len(contributors)


def _not_started(node: int, silo: str, reason: str) -> NodeOutcome:
    """A sampled silo whose secure round never started: asked nothing, released nothing."""
    return NodeOutcome(
        node, silo, OutcomeStatus.ABORTED, reason, released=False, charge=ChargeState.NOTHING
    )
