"""fedguard's robust aggregation rules as a Flower Message-API strategy.

:class:`RobustFedAvg` is Flower's :class:`~flwr.serverapp.strategy.FedAvg` (same
sampling, messages, evaluation and metric aggregation) with one change: the train
replies' ``ArrayRecord`` s are combined by a fedguard rule
(:func:`~fedguard.aggregation.registry.build_aggregator`: median, trimmed mean, Krum,
Multi-Krum, geometric median, centered clipping, norm bounding, with NNM or bucketing
before them) instead of the weighted mean. A plain Flower ServerApp uses it on its own
model, and the clients stay plain Flower ClientApps (nothing of fedguard runs there)::

    strategy = RobustFedAvg(AggregatorConfig(AggregatorName.MEDIAN, f=1))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()))

**Deltas, not models.** The rule runs over the updates ``Δ_i = x_i − g``, with ``g``
the arrays this strategy sent in :meth:`RobustFedAvg.configure_train` (it keeps a
flat copy), and the new model is ``g + rule(Δ)``. For the coordinate-wise median,
the trimmed mean, Krum, Multi-Krum, NNM and bucketing the choice changes nothing
(they commute with a shift of all inputs); it matters for the rules whose
parameters are update norms: norm bounding and centered clipping clip ``‖Δ_i‖`` to
``τ`` (clipping a model's own norm would shrink the model), centered clipping's
``previous`` reference is the previous aggregated *update* (Karimireddy et al.), and
the geometric median starts its Weiszfeld steps from the zero update. fedguard's own
round loop (:class:`~fedguard.aggregation.pipeline.AggregationPipeline`) aggregates
the same deltas, so one :class:`AggregatorConfig` means the same thing in both.

**Replies.** Error replies are dropped and logged as FedAvg does. Every other reply
must hold one ``ArrayRecord`` with exactly the sent model's keys, shapes and dtypes
and finite values, and one ``MetricRecord`` with a finite weight ``≥ 0`` under
``weighted_by_key``. A reply that does not is a typed error
(:class:`~fedguard.core.errors.ShapeMismatchError`,
:class:`~fedguard.core.errors.NonFiniteUpdateError`,
:class:`~fedguard.core.errors.ProtocolError`, naming the node) that fails the round
with :attr:`MalformedReplyPolicy.RAISE` (the default); with
:attr:`MalformedReplyPolicy.EXCLUDE` it is left out, logged at WARNING and listed in
:attr:`RobustFedAvg.reports` (so one Byzantine client cannot stop training by
sending NaN). Either way the rule then checks its paper's precondition on the
replies it gets (median: ``n ≥ 2f + 1``) and raises
:class:`~fedguard.aggregation.aggregators.PreconditionError`; nothing is clamped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from fedguard.aggregation.aggregators import AggregationError, Aggregator
from fedguard.aggregation.registry import AggregatorConfig, build_aggregator
from fedguard.core.errors import (
    ConfigError,
    NonFiniteUpdateError,
    ProtocolError,
    ShapeMismatchError,
    UpdateRejectedError,
)

__all__ = ["MalformedReplyPolicy", "RejectedReply", "RobustFedAvg", "RoundReport"]

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


class MalformedReplyPolicy(StrEnum):
    """What a malformed train reply (layout, NaN/Inf, weight) does to the round."""

    RAISE = "raise"  # the round fails with the reply's typed error
    EXCLUDE = "exclude"  # the reply is left out, logged and listed in the round report


@dataclass(frozen=True)
class RejectedReply:
    """A train reply left out under :attr:`MalformedReplyPolicy.EXCLUDE`, and why."""

    node_id: int
    reason: str


@dataclass(frozen=True)
class RoundReport:
    """What one :meth:`RobustFedAvg.aggregate_train` call did with the round's replies.

    ``accepted``: the nodes whose update entered the rule; ``rejected``: malformed
    replies left out (EXCLUDE only); ``failed``: nodes that sent an error reply.
    """

    server_round: int
    rule: str
    accepted: tuple[int, ...]
    rejected: tuple[RejectedReply, ...]
    failed: tuple[int, ...]


@dataclass(frozen=True)
class _Layout:
    """The sent model's arrays: their keys (flattening order), shapes and dtypes."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype[Any], ...]

    @classmethod
    def of(cls, record: ArrayRecord) -> tuple[_Layout, np.ndarray]:
        """The layout of the global model and the model as one float64 vector."""
        arrays = {key: record[key].numpy() for key in record}
        for key, value in arrays.items():
            if not (
                np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)
            ):
                raise ShapeMismatchError(
                    f"global array {key!r} has dtype {value.dtype}: only real numeric arrays "
                    "can be aggregated"
                )
            if not np.isfinite(value).all():
                raise NonFiniteUpdateError(f"global array {key!r} holds NaN or Inf")
        layout = cls(
            tuple(arrays),
            tuple(tuple(int(s) for s in v.shape) for v in arrays.values()),
            tuple(v.dtype for v in arrays.values()),
        )
        return layout, _flat([arrays[key] for key in layout.keys])

    def flatten(self, node: int, record: ArrayRecord) -> np.ndarray:
        """A reply's arrays as one float64 vector in this layout's key order, checked."""
        keys = set(record.keys())
        missing = sorted(set(self.keys) - keys)
        extra = sorted(keys - set(self.keys))
        if missing or extra:
            raise ShapeMismatchError(
                f"node {node}: array keys differ from the sent model's: missing {missing}, "
                f"unexpected {extra}"
            )
        values = []
        for key, shape, dtype in zip(self.keys, self.shapes, self.dtypes, strict=True):
            value = record[key].numpy()
            if value.shape != shape or value.dtype != dtype:
                raise ShapeMismatchError(
                    f"node {node}: array {key!r} is {value.dtype}{list(value.shape)}, "
                    f"the sent model's is {dtype}{list(shape)}"
                )
            if not np.isfinite(value).all():
                bad = int((~np.isfinite(value)).sum())
                raise NonFiniteUpdateError(f"node {node}: array {key!r} holds {bad} NaN or Inf")
            values.append(value)
        return _flat(values)

    def rebuild(self, vector: np.ndarray) -> ArrayRecord:
        """The vector cut back into the layout's arrays, each cast to its own dtype.

        Integer arrays (a BatchNorm's ``num_batches_tracked``) are rounded. A value
        the dtype cannot hold is an error, not a silent overflow to Inf.
        """
        out: dict[str, Array] = {}
        offset = 0
        for key, shape, dtype in zip(self.keys, self.shapes, self.dtypes, strict=True):
            size = int(np.prod(shape, dtype=np.int64))
            part = vector[offset : offset + size].reshape(shape)
            offset += size
            limits = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
            if part.size and (part.min() < limits.min or part.max() > limits.max):
                raise AggregationError(f"the aggregated array {key!r} does not fit in {dtype}")
            if np.issubdtype(dtype, np.integer):
                part = np.rint(part)
            # np.array, not ascontiguousarray (it turns a 0-d array 1-d) nor astype (np.rint
            # of a 0-d array is a scalar): a 0-d buffer stays a 0-d array.
            out[key] = Array(np.array(part, dtype=dtype, order="C"))
        return ArrayRecord(out)


def _flat(values: Sequence[np.ndarray]) -> np.ndarray:
    if not values:
        return np.zeros(0)
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])


@dataclass(frozen=True)
class _Sent:
    """What configure_train sent in one round: the reference the deltas are taken from."""

    server_round: int
    layout: _Layout
    vector: np.ndarray


class RobustFedAvg(FedAvg):
    """FedAvg whose train aggregation is a fedguard rule over the clients' model deltas.

    ``aggregator``: an :class:`AggregatorConfig` (built once here, so a stateful rule
    such as centered clipping from the previous aggregate keeps its state across
    rounds) or an already built :class:`Aggregator`. ``on_malformed``: see
    :class:`MalformedReplyPolicy`. The other arguments are FedAvg's, except that
    ``min_train_nodes`` defaults to the rule's ``min_inputs`` (at least 2) and a
    smaller value is refused: sampling fewer nodes than the rule needs is a round
    that can never be robust. ``min_available_nodes`` defaults to ``min_train_nodes``.

    Weights are the replies' ``weighted_by_key`` values; the rules that use them
    (Multi-Krum, geometric median, norm bounding, the weighted mean) trust them, so a
    client that lies about its example count tilts such a rule within its bound;
    the median, trimmed mean, Krum and centered clipping ignore them.
    """

    def __init__(
        self,
        aggregator: AggregatorConfig | Aggregator,
        *,
        on_malformed: MalformedReplyPolicy = MalformedReplyPolicy.RAISE,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int | None = None,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
    ) -> None:
        rule = (
            build_aggregator(aggregator) if isinstance(aggregator, AggregatorConfig) else aggregator
        )
        if not callable(getattr(rule, "aggregate", None)):
            raise ConfigError(
                f"aggregator must be an AggregatorConfig or an Aggregator, got {aggregator!r}"
            )
        if not isinstance(on_malformed, MalformedReplyPolicy):
            raise ConfigError(f"on_malformed must be a MalformedReplyPolicy, got {on_malformed!r}")
        needed = max(2, rule.min_inputs)
        if min_train_nodes is None:
            min_train_nodes = needed
        elif fraction_train != 0.0 and min_train_nodes < rule.min_inputs:
            raise ConfigError(
                f"{rule.name} needs at least {rule.min_inputs} updates per round, but "
                f"min_train_nodes = {min_train_nodes} lets a round sample fewer"
            )
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=(
                min_train_nodes if min_available_nodes is None else min_available_nodes
            ),
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.aggregator: Aggregator = rule
        self.on_malformed = on_malformed
        #: One report per aggregated round, by round number.
        self.reports: dict[int, RoundReport] = {}
        self._sent: _Sent | None = None

    def summary(self) -> None:
        """FedAvg's summary, then the rule and the malformed-reply policy."""
        super().summary()
        log(
            INFO,
            "\t└──> fedguard rule: %s (min inputs %d) over model deltas; malformed replies: %s",
            self.aggregator.name,
            self.aggregator.min_inputs,
            self.on_malformed.value,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages; keeps the sent arrays as the reference for the deltas."""
        layout, vector = _Layout.of(arrays)
        self._sent = _Sent(server_round, layout, vector)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``g + rule(Δ)`` over the round's valid replies, and FedAvg's aggregated metrics.

        Returns ``(None, None)`` (the model stays as it was, as FedAvg does) when no
        reply is usable. Raises the reply's typed error (RAISE policy), a
        :class:`ProtocolError` when this round's model was not sent by
        :meth:`configure_train`, and whatever the rule raises.
        """
        valid, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        failed = tuple(msg.metadata.src_node_id for msg in errors)
        if not valid:
            self.reports[server_round] = RoundReport(
                server_round, self.aggregator.name, (), (), failed
            )
            return None, None
        sent = self._reference(server_round)
        accepted: list[Message] = []
        vectors: list[np.ndarray] = []
        weights: list[float] = []
        rejected: list[RejectedReply] = []
        for msg in valid:
            node = msg.metadata.src_node_id
            try:
                vector = sent.layout.flatten(node, _only_array_record(node, msg.content))
                weight = self._weight(node, msg.content)
            except (UpdateRejectedError, ProtocolError) as bad:
                if self.on_malformed is MalformedReplyPolicy.RAISE:
                    raise
                log(WARNING, "aggregate_train: reply from node %d left out: %s", node, bad)
                rejected.append(RejectedReply(node, str(bad)))
                continue
            accepted.append(msg)
            vectors.append(vector)
            weights.append(weight)
        self.reports[server_round] = RoundReport(
            server_round,
            self.aggregator.name,
            tuple(msg.metadata.src_node_id for msg in accepted),
            tuple(rejected),
            failed,
        )
        if not accepted:
            return None, None
        deltas = np.stack(vectors) - sent.vector
        update = self.aggregator.aggregate(deltas, np.asarray(weights, dtype=np.float64))
        arrays = sent.layout.rebuild(sent.vector + update)
        return arrays, self._metrics(accepted)

    def _reference(self, server_round: int) -> _Sent:
        """The arrays sent for ``server_round``: deltas from any other model are meaningless."""
        if self._sent is None or self._sent.server_round != server_round:
            known = None if self._sent is None else self._sent.server_round
            raise ProtocolError(
                f"aggregate_train for round {server_round}, but configure_train last sent "
                f"round {known}: the deltas need the model that round was sent"
            )
        return self._sent

    def _weight(self, node: int, content: RecordDict) -> float:
        """The reply's ``weighted_by_key`` value: one MetricRecord, one finite number ≥ 0."""
        records = list(content.metric_records.values())
        if len(records) != 1:
            raise ProtocolError(
                f"node {node}: expected exactly one MetricRecord, got {len(records)}"
            )
        value = records[0].get(self.weighted_by_key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(
                f"node {node}: MetricRecord needs a number under {self.weighted_by_key!r}, "
                f"got {value!r}"
            )
        if not (np.isfinite(value) and value >= 0):
            raise ProtocolError(
                f"node {node}: {self.weighted_by_key!r} must be finite and >= 0, got {value}"
            )
        return float(value)

    def _metrics(self, accepted: list[Message]) -> MetricRecord:
        """FedAvg's metric aggregation over the accepted replies (same keys in each)."""
        contents = [msg.content for msg in accepted]
        if sum(self._weight(msg.metadata.src_node_id, msg.content) for msg in accepted) <= 0:
            raise ProtocolError(
                f"every accepted reply weighs 0 under {self.weighted_by_key!r}: "
                "the metrics cannot be averaged"
            )
        try:
            validate_message_reply_consistency(
                contents, self.weighted_by_key, check_arrayrecord=False
            )
        except InconsistentMessageReplies as bad:
            raise ProtocolError(f"train replies' metrics differ: {bad}") from bad
        return self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def _only_array_record(node: int, content: RecordDict) -> ArrayRecord:
    """The reply's one ArrayRecord, whatever its name (as FedAvg accepts)."""
    records = list(content.array_records.values())
    if len(records) != 1:
        raise ProtocolError(f"node {node}: expected exactly one ArrayRecord, got {len(records)}")
    return records[0]
