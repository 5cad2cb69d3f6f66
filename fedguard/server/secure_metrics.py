"""The federated scaler and each round's evaluation, without a per-silo value in clear.

**Federated scaler.** Before round 1 every silo releases the feature moments of
its training rows on public bounds (:mod:`fedguard.core.feature_moments`) as a
DP statistic: noised for ``local_dp.scaler_epsilon`` at its own δ and charged to
its ledger first (:mod:`fedguard.client.statistic_release`). The release is charged
before round 1's training, so the silo's σ calibration finds it among the
ledger's entries and plans training in the budget left. With SecAgg on, the
releases are summed under SecAgg+ (one statistic round, query round 0): the
server learns only the noised sum. With SecAgg off, each silo sends the same
noised release in clear: it is (ε, δ)-DP on its own, the server already sees
each silo's DP-noised update in that mode, and it works with any number of silos
and no key set-up. A non-private run (``--no-dp``) asks for exact sums.

**Evaluation.** With SecAgg on, every silo's evaluation sums on its test split
(``[n, correct, Σ loss / L, score histograms]``, kind ``evaluation``) are summed
under SecAgg+ each round: the server learns the pooled loss, accuracy and ROC
AUC only, and ``per_silo`` stays empty. Whether a silo noises them is its own
policy (``evaluation_epsilon``; exact by default: the split is never trained
on). With SecAgg off, each silo replies with its exact sums (``evaluate``) and
the server keeps them per silo, as the threat model lists.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedguard.core.config import RunConfig
from fedguard.core.datasets import schema_for
from fedguard.core.errors import FedguardError
from fedguard.core.feature_moments import MomentLayout, moment_layout
from fedguard.core.files import atomic_write_json
from fedguard.core.metrics import AUC_BINS, binned_auc
from fedguard.core.preprocessing import FeatureScaler
from fedguard.core.trust_config import TrustNoise
from fedguard.privacy.secagg import SecAggError
from fedguard.runs.scaler_moments import MOMENTS_FILENAME
from fedguard.server.round_records import OutcomeStatus, reply_outcome
from fedguard.server.secure_round import SecAggIdentities, SecureRoundAborted, Send
from fedguard.server.statistic_collection import collect_secure_statistic
from fedguard.wire import protocol
from fedguard.wire.protocol import ReplyStatus
from fedguard.wire.statistics import (
    EVALUATION_LOSS_BOUND,
    REQUEST,
    StatisticKind,
    StatisticRequest,
    evaluation_vector_length,
)

__all__ = [
    "EVALUATION_RESOLUTION",
    "MOMENTS_RESOLUTION",
    "PUBLIC_OUTCOME_METRICS",
    "EvaluationSummary",
    "RunAbortedError",
    "ScalerRelease",
    "evaluate_round",
    "federated_scaler",
    "public_outcome_metrics",
    "write_moments",
]

log = logging.getLogger(__name__)

#: Public quantization units of the two statistics (counts stay exact integers).
MOMENTS_RESOLUTION = 2.0**-6
EVALUATION_RESOLUTION = 2.0**-8
#: Query round of the feature moments in the silos' ledgers (the run's only release).
SCALER_QUERY_ROUND = 0

SiloName = Callable[[int], str]


class RunAbortedError(FedguardError):
    """The run cannot continue (for example, no silo answered the statistics query)."""


@dataclass(frozen=True)
class EvaluationSummary:
    """One round's pooled evaluation; ``per_silo`` is empty when it was a secure sum.

    Coverage: ``covered`` names the silos whose evaluation sums the pooled values
    include (``num_examples`` records in all), ``missing`` every other silo asked,
    with why. ``epsilon_spent``: a silo's lifetime ε after an evaluation it noised
    (its own policy), as it reported it.
    """

    num_examples: int
    loss: float
    accuracy: float
    auc: float | None
    per_silo: dict[str, dict[str, float]]
    secure: bool = False
    contributors: int = 0
    noise_std: float = 0.0  # std of the DP noise in each pooled sum (0: exact)
    failed: str = ""
    covered: tuple[str, ...] = ()
    missing: dict[str, str] = field(default_factory=dict)
    epsilon_spent: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ScalerRelease:
    """The federated scaler and the (noised) moment sum the server built it from."""

    scaler: FeatureScaler
    values: np.ndarray
    noise_std: float
    contributors: int
    secure: bool
    noise: TrustNoise
    epsilon: float | None  # ε each silo spent on it (None: exact sums, nothing charged)

    def to_json(self, dataset: str) -> dict[str, Any]:
        return {
            "version": 1,
            "dataset": dataset,
            "secure": self.secure,
            "noise": self.noise.value,
            "epsilon": self.epsilon,
            "noise_std": self.noise_std,
            "contributors": self.contributors,
            "resolution": MOMENTS_RESOLUTION,
            "values": [float(v) for v in self.values],
        }


#: What a silo's SecAgg setup reply may show per silo in a ``--secagg`` run's records:
#: its plan (examples, steps, q, σ, SecAgg weight) and its own ledger's ε, no metric.
PUBLIC_OUTCOME_METRICS = (
    "num-examples",
    "steps",
    "sample-rate",
    "noise-multiplier",
    "epsilon-budget",
    "delta",
    "epsilon-spent",
    "ledger-resets",
    "epsilon-archived",
    "secagg-weight",
    "replayed",
    "dp",
)


def public_outcome_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Only the plan and ledger values of a silo's reply (:data:`PUBLIC_OUTCOME_METRICS`)."""
    return {k: v for k, v in metrics.items() if k in PUBLIC_OUTCOME_METRICS}


# --------------------------------------------------------------------------- scaler


def _request(
    kind: StatisticKind,
    query_round: int,
    epsilon: float,
    noise: TrustNoise,
    resolution: float,
    length: int,
    options: Mapping[str, Any] | None = None,
) -> StatisticRequest:
    return StatisticRequest(kind, query_round, epsilon, noise, resolution, length, options or {})


def _identity_scaler(num_features: int) -> ArrayRecord:
    arrays = FeatureScaler.identity(num_features).to_arrays()
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def federated_scaler(
    send: Send,
    nodes: list[int],
    config: RunConfig,
    config_record: ConfigRecord,
    silo_name: SiloName,
    identities: SecAggIdentities | None = None,
) -> ScalerRelease:
    """Ask the silos for their feature moments (secure sum or DP releases in clear).

    ``identities`` (the signed roster, each node's silo id) authenticate the secure sum.

    Raises:
        RunAbortedError: no usable moments (no silo answered, or SecAgg aborted).
    """
    schema = schema_for(config.contract)
    layout = moment_layout(schema)
    noise = TrustNoise.GAUSSIAN if config.local_dp.enabled else TrustNoise.NONE
    epsilon = config.local_dp.scaler_epsilon
    if layout.num_features == 0:  # nothing to standardize (pixels): nothing is asked
        return ScalerRelease(
            FeatureScaler.identity(schema.num_features),
            np.zeros(layout.length),
            0.0,
            0,
            config.secagg.enabled,
            noise,
            None,
        )
    instruction = RecordDict(
        {protocol.CONFIG: config_record, protocol.SCALER: _identity_scaler(schema.num_features)}
    )
    if config.secagg.enabled:
        try:
            result = collect_secure_statistic(
                send,
                nodes,
                StatisticKind.FEATURE_MOMENTS,
                instruction=instruction,
                vector_length=layout.length,
                query_round=SCALER_QUERY_ROUND,
                target_epsilon=epsilon,
                noise=noise,
                resolution=MOMENTS_RESOLUTION,
                dropout_rate=config.secagg.dropout_rate,
                identities=identities,
            )
        except SecAggError as abort:
            raise RunAbortedError(
                f"the secure feature-moments round failed: {abort}; cannot preprocess"
            ) from None
        for node, reason in result.dropped.items():
            log.warning("silo %s: no feature moments (%s)", silo_name(node), reason)
        values, noise_std, contributors = result.values, result.noise_std, len(result.contributors)
    else:
        request = _request(
            StatisticKind.FEATURE_MOMENTS,
            SCALER_QUERY_ROUND,
            epsilon,
            noise,
            MOMENTS_RESOLUTION,
            layout.length,
        )
        values, noise_std, contributors = _clear_moments(
            send, nodes, instruction, request, layout, silo_name
        )
    return ScalerRelease(
        layout.scaler(values, noise_std),
        values,
        noise_std,
        contributors,
        config.secagg.enabled,
        noise,
        epsilon if noise is TrustNoise.GAUSSIAN else None,
    )


def _clear_moments(
    send: Send,
    nodes: list[int],
    instruction: RecordDict,
    request: StatisticRequest,
    layout: MomentLayout,
    silo_name: SiloName,
) -> tuple[np.ndarray, float, int]:
    """Plain mode: every silo's DP release in clear; the server adds them up."""
    config, _ = request.to_records()
    content = RecordDict(dict(instruction.items()))
    content[REQUEST] = ConfigRecord(config)
    replies = send(protocol.FEATURE_STATISTICS, dict.fromkeys(nodes, content))
    total = np.zeros(layout.length)
    variance = 0.0
    contributors = 0
    for node in nodes:
        reply = replies.get(node)
        if reply is None:
            log.warning("silo %s sent no feature moments", silo_name(node))
            continue
        status, reason = protocol.reply_status(reply)
        records = reply.content.array_records if status is ReplyStatus.OK else {}
        if protocol.STATISTICS not in records or "moments" not in records[protocol.STATISTICS]:
            log.warning("silo %s: no feature moments (%s)", silo_name(node), reason)
            continue
        moments = records[protocol.STATISTICS]["moments"].numpy().astype(np.float64)
        metrics = protocol.reply_metrics(reply)
        if moments.shape != (layout.length,) or not np.isfinite(moments).all():
            log.warning("silo %s: malformed feature moments rejected", silo_name(node))
            continue
        total += moments
        variance += (metrics.get("noise-multiplier", 0.0) * metrics.get("l2-sensitivity", 0.0)) ** 2
        contributors += 1
    if contributors == 0:
        raise RunAbortedError("no silo sent usable feature moments; cannot preprocess")
    return total, math.sqrt(variance), contributors


def write_moments(run_dir: Path, release: ScalerRelease, dataset: str) -> None:
    atomic_write_json(run_dir / MOMENTS_FILENAME, release.to_json(dataset))


# --------------------------------------------------------------------------- evaluation


def evaluate_round(
    send: Send,
    nodes: list[int],
    config: RunConfig,
    instruction: RecordDict,
    round_number: int,
    silo_name: SiloName,
    identities: SecAggIdentities | None = None,
) -> EvaluationSummary:
    """The round's pooled evaluation: a secure sum with SecAgg on, per-silo replies otherwise."""
    if config.secagg.enabled:
        return _secure_evaluation(
            send, nodes, config, instruction, round_number, silo_name, identities
        )
    return _plain_evaluation(send, nodes, instruction, silo_name)


def _failed(reason: str, missing: dict[str, str]) -> EvaluationSummary:
    nan = float("nan")
    return EvaluationSummary(0, nan, nan, None, {}, secure=True, failed=reason, missing=missing)


def _secure_evaluation(
    send: Send,
    nodes: list[int],
    config: RunConfig,
    instruction: RecordDict,
    round_number: int,
    silo_name: SiloName,
    identities: SecAggIdentities | None = None,
) -> EvaluationSummary:
    num_classes = schema_for(config.contract).num_classes
    try:
        result = collect_secure_statistic(
            send,
            nodes,
            StatisticKind.EVALUATION,
            instruction=instruction,
            vector_length=evaluation_vector_length(num_classes),
            query_round=round_number,
            # Placeholder: each silo's own policy decides an evaluation's noise and ε.
            target_epsilon=1.0,
            noise=TrustNoise.NONE,
            options={"score-bins": AUC_BINS},
            resolution=EVALUATION_RESOLUTION,
            dropout_rate=config.secagg.dropout_rate,
            identities=identities,
        )
    except SecAggError as abort:
        log.error("round %d: secure evaluation failed: %s", round_number, abort)
        report = abort.report if isinstance(abort, SecureRoundAborted) else None
        failures = report.dropped_at if report is not None else {}
        missing = {
            silo_name(n): failures.get(n, f"the secure evaluation aborted: {abort}") for n in nodes
        }
        return _failed(str(abort), missing)
    v = result.values
    examples, correct, loss_sum = float(v[0]), float(v[1]), float(v[2]) * EVALUATION_LOSS_BOUND
    auc = None
    if num_classes == 2:
        # Noise can push a bin below 0: clipped (post-processing) before the AUC.
        positive = np.maximum(v[3 : 3 + AUC_BINS], 0.0)
        negative = np.maximum(v[3 + AUC_BINS :], 0.0)
        auc = binned_auc(positive, negative)
    count = max(examples, 1.0)
    return EvaluationSummary(
        num_examples=round(examples),
        loss=loss_sum / count if examples > 0 else float("nan"),
        accuracy=min(max(correct / count, 0.0), 1.0) if examples > 0 else float("nan"),
        auc=auc,
        per_silo={},
        secure=True,
        contributors=len(result.contributors),
        noise_std=result.noise_std,
        covered=tuple(silo_name(n) for n in result.contributors),
        missing={
            silo_name(n): result.dropped.get(n, "not in the secure sum")
            for n in nodes
            if n not in set(result.contributors)
        },
        epsilon_spent={silo_name(n): e for n, e in result.epsilon_spent.items()},
    )


def _plain_evaluation(
    send: Send, nodes: list[int], instruction: RecordDict, silo_name: SiloName
) -> EvaluationSummary:
    replies = send(protocol.EVALUATE, dict.fromkeys(nodes, instruction))
    total = 0
    loss_sum = 0.0
    correct = 0
    positive: np.ndarray | None = None
    negative: np.ndarray | None = None
    per_silo: dict[str, dict[str, float]] = {}
    missing: dict[str, str] = {}
    for node in nodes:
        status, reason = reply_outcome(replies, node)
        if status is not OutcomeStatus.OK:
            missing[silo_name(node)] = f"{status.value}: {reason}"
            continue
        m = protocol.reply_metrics(replies[node])
        reply = replies[node]
        n = int(m.get("num-examples", 0))
        if n <= 0 or not math.isfinite(m.get("loss-sum", float("nan"))):
            missing[silo_name(node)] = "rejected: no usable evaluation sums (examples, loss)"
            continue
        silo: dict[str, float] = {
            "num-examples": n,
            "loss": m["loss-sum"] / n,
            "accuracy": m["correct"] / n,
        }
        if protocol.HISTOGRAMS in reply.content.array_records:
            pos, neg = _histograms(reply.content.array_records[protocol.HISTOGRAMS])
            if pos is None or neg is None:
                log.warning("silo %s sent malformed score histograms", silo_name(node))
                missing[silo_name(node)] = "rejected: malformed score histograms"
                continue
            silo["auc"] = binned_auc(pos, neg)
            positive = pos if positive is None else positive + pos
            negative = neg if negative is None else negative + neg
        total += n
        loss_sum += m["loss-sum"]
        correct += int(m["correct"])
        per_silo[silo_name(node)] = silo
    auc = binned_auc(positive, negative) if positive is not None and negative is not None else None
    return EvaluationSummary(
        num_examples=total,
        loss=loss_sum / total if total else float("nan"),
        accuracy=correct / total if total else float("nan"),
        auc=auc,
        per_silo=per_silo,
        contributors=len(per_silo),
        covered=tuple(per_silo),
        missing=missing,
    )


def _histograms(record: ArrayRecord) -> tuple[np.ndarray | None, np.ndarray | None]:
    try:
        pos, neg = record["positive"].numpy(), record["negative"].numpy()
    except KeyError:
        return None, None
    for hist in (pos, neg):
        if hist.shape != (AUC_BINS,) or hist.dtype.kind not in "iu" or (hist < 0).any():
            return None, None
    return pos.astype(np.int64), neg.astype(np.int64)
