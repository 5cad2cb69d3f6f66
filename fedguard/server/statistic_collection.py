"""The server side of a secure DP statistic: one SecAgg+ round over a query.

:func:`collect_secure_statistic` sends every silo the query (first SecAgg+
stage ``query.secagg_statistic``, then the usual ``train.secagg_*`` stages),
and returns the decoded sum of the silos' noised vectors, who contributed, and
what each silo says the release cost it. The server never sees one silo's
vector. Each silo noised its own vector (see :mod:`fedguard.client.statistic_release`),
so the sum carries the noise of every contributor: its variance is the sum of
theirs, n times one silo's at equal σ and sensitivity; a trusted curator would
add one silo's worth to the pooled sum, but here no one has to be trusted.

Encoding: every silo weighs 1; the encoder's clip range is half its levels L,
so one step is 1 and an integer ``y`` (a count divided by the public
``resolution``) is carried exactly. ``value_bits`` takes the whole overflow
budget of n silos (n · 2^value_bits < 2^32): each silo's ``y`` may lie within
about ±2^(value_bits − 1); values outside are clipped, and counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedguard.core.errors import ConfigError
from fedguard.core.trust_config import TrustNoise
from fedguard.privacy.secagg import SecAggAbort, SecAggConfig
from fedguard.privacy.secagg.config import RING_BITS
from fedguard.server.round_records import send_messages
from fedguard.server.secure_round import (
    SecAggIdentities,
    SecureAggregationSettings,
    Send,
    run_secure_round,
)
from fedguard.wire.statistics import (
    REQUEST,
    REQUEST_ARRAYS,
    SECAGG_STATISTIC,
    StatisticKind,
    StatisticRequest,
)

__all__ = [
    "DEFAULT_RESOLUTION",
    "MIN_SILOS",
    "SecureStatisticResult",
    "collect_secure_statistic",
    "grid_send",
    "statistic_settings",
]

#: Secure aggregation needs three silos: with two, each would learn the other's vector.
MIN_SILOS = 3
#: Public quantization unit per kind: counts are integers (exact with noise off);
#: summed clipped attributions are real (rounded unbiasedly to 2^-12).
DEFAULT_RESOLUTION: dict[StatisticKind, float] = {
    StatisticKind.FAIRNESS: 2.0**-4,
    StatisticKind.DRIFT: 2.0**-4,
    StatisticKind.ATTRIBUTION: 2.0**-12,
}


@dataclass(frozen=True)
class SecureStatisticResult:
    """The decoded sum of the contributors' (noised) vectors and what it cost them."""

    kind: StatisticKind
    values: np.ndarray
    contributors: tuple[int, ...]
    release_epsilon: dict[int, float]  # node -> ε of this release alone (at its δ)
    epsilon_spent: dict[int, float]  # node -> the silo's lifetime ε after the charge
    noise_multiplier: dict[int, float]
    l2_sensitivity: dict[int, float]
    examples: float  # Σ num-examples the silos report (metadata, not private)
    dropped: dict[int, str] = field(default_factory=dict)
    clipped_values: int = 0
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise in each value of the sum."""
        return math.sqrt(
            sum(
                (self.noise_multiplier.get(n, 0.0) * self.l2_sensitivity.get(n, 0.0)) ** 2
                for n in self.contributors
            )
        )


def grid_send(grid: Grid, group_id: str, timeout: float | None = None) -> Send:
    """A ``Send`` over a Flower ``Grid``: each node its own content, replies by node."""

    def send(message_type: str, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
        messages = [
            Message(content, dst_node_id=node, message_type=message_type, group_id=group_id)
            for node, content in contents.items()
        ]
        return send_messages(grid, messages, timeout) if messages else {}

    return send


def statistic_settings(
    num_silos: int, dropout_rate: float = 0.1, identities: SecAggIdentities | None = None
) -> SecureAggregationSettings:
    """Encoder settings of a statistic round: weight 1, step 1, all bits to the values.

    ``identities``: the roster and node → silo ids the round authenticates with.
    """
    value_bits = min(SecAggConfig.max_bits_per_value(num_silos), RING_BITS - 2)
    return SecureAggregationSettings(
        clip_range=(2**value_bits - 1) / 2,
        value_bits=value_bits,
        dropout_rate=dropout_rate,
        weight_unit=0,
        clip_norm=0.0,
        identities=identities,
    )


def collect_secure_statistic(
    send: Send,
    nodes: Sequence[int],
    kind: StatisticKind,
    *,
    instruction: RecordDict,
    vector_length: int,
    query_round: int,
    target_epsilon: float,
    noise: TrustNoise = TrustNoise.GAUSSIAN,
    options: Mapping[str, Any] | None = None,
    resolution: float | None = None,
    dropout_rate: float = 0.1,
    identities: SecAggIdentities | None = None,
) -> SecureStatisticResult:
    """Ask every silo in ``nodes`` for a ``kind`` statistic; return the secure sum.

    ``instruction`` holds the run's ``config`` record (run id, data set, model),
    the ``scaler`` and, for queries about a model, its ``arrays``; ``options``
    (scalars, lists, numpy arrays) go to the silos' producer. ``query_round``
    names the release in the silos' ledgers with the run id and the kind: asking
    again with the same one replays the release, it is not charged twice.
    ``identities`` (the signed roster, each node's silo id) authenticate the round:
    silos refuse a secure aggregation without them.

    Raises:
        SecAggAbort: fewer than :data:`MIN_SILOS` silos, or too few survived (then a
            :class:`~fedguard.server.secure_round.SecureRoundAborted` with what each
            silo did).
    """
    if len(nodes) < MIN_SILOS:
        raise SecAggAbort(
            "setup", f"{len(nodes)} silo(s); a secure statistic needs at least {MIN_SILOS}"
        )
    step = resolution if resolution is not None else DEFAULT_RESOLUTION[kind]
    request = StatisticRequest(
        kind=kind,
        query_round=query_round,
        target_epsilon=target_epsilon,
        noise=noise,
        resolution=step,
        vector_length=vector_length,
        options=dict(options or {}),
    )
    config, arrays = request.to_records()
    content = RecordDict(dict(instruction.items()))
    content[REQUEST] = ConfigRecord(config)
    if arrays:
        content[REQUEST_ARRAYS] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )
    settings = statistic_settings(len(nodes), dropout_rate, identities)
    result = run_secure_round(
        send, list(nodes), content, vector_length, settings, setup_message_type=SECAGG_STATISTIC
    )
    if result.config.clip_range != result.config.levels / 2:  # pragma: no cover - by construction
        raise ConfigError("statistic rounds need the encoder's step at 1")
    # Each contributor sent y − ½ (see fedguard.client.statistic_release): add the halves back.
    values = (result.weighted_sum + 0.5 * result.total_weight) * step
    contributors = tuple(result.contributors)

    def metric(name: str) -> dict[int, float]:
        return {
            n: result.metrics[n][name] for n in contributors if name in result.metrics.get(n, {})
        }

    return SecureStatisticResult(
        kind=kind,
        values=values,
        contributors=contributors,
        release_epsilon=metric("release-epsilon"),
        epsilon_spent=metric("epsilon-spent"),
        noise_multiplier=metric("noise-multiplier"),
        l2_sensitivity=metric("l2-sensitivity"),
        examples=float(sum(metric("num-examples").values())),
        dropped=dict(result.dropped_at),
        clipped_values=sum(int(m.get("secagg-clipped", 0)) for m in result.metrics.values()),
        metrics={n: dict(m) for n, m in result.metrics.items()},
    )
