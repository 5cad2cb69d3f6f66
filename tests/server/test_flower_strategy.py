"""RobustFedAvg: fedguard's rules behind Flower's Message-API strategy, called in process.

Replies are built by hand as a plain Flower ClientApp would send them (one
ArrayRecord, one MetricRecord with ``num-examples``) in answer to the messages the
strategy's own ``configure_train`` made, so no Ray and no Grid is involved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedguard.aggregation.aggregators import PreconditionError
from fedguard.aggregation.registry import (
    AggregatorConfig,
    AggregatorName,
    PreAggregationName,
    build_aggregator,
)
from fedguard.core.errors import (
    ConfigError,
    FedguardError,
    NonFiniteUpdateError,
    ProtocolError,
    ShapeMismatchError,
)
from fedguard.server.flower_strategy import MalformedReplyPolicy, RobustFedAvg

Arrays = dict[str, np.ndarray]
MEDIAN_F1 = AggregatorConfig(AggregatorName.MEDIAN, f=1)


class _Grid:
    """Just what FedAvg's configure_train asks of a Grid: the connected node ids."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> Iterable[int]:
        return self.nodes


def _global() -> Arrays:
    rng = np.random.default_rng(0)
    return {
        "fc.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "fc.bias": rng.normal(size=(3,)).astype(np.float32),
    }


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in arrays.items()})


def _sent(
    strategy: RobustFedAvg, arrays: Arrays, nodes: int, server_round: int = 1
) -> list[Message]:
    messages = list(
        strategy.configure_train(
            server_round, _record(arrays), ConfigRecord(), cast(Grid, _Grid(nodes))
        )
    )
    for index, message in enumerate(messages):
        message.metadata.__dict__["_message_id"] = f"m-{server_round}-{index}"
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def _reply(
    instruction: Message, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float]
) -> Message:
    content = RecordDict(
        {"arrays": _record(arrays), "metrics": MetricRecord(dict(metrics))}  # type: ignore[arg-type]
    )
    return Message(content, reply_to=instruction)


def _replies(
    instructions: list[Message], models: list[Arrays], examples: list[int] | None = None
) -> list[Message]:
    counts = examples or [10] * len(models)
    return [
        _reply(m, arrays, {"num-examples": n, "loss": float(i)})
        for i, (m, arrays, n) in enumerate(zip(instructions, models, counts, strict=True))
    ]


def _honest(global_arrays: Arrays, count: int, seed: int = 1) -> list[Arrays]:
    rng = np.random.default_rng(seed)
    return [
        {
            k: (v + rng.normal(0.1, 0.01, size=v.shape)).astype(v.dtype)
            for k, v in global_arrays.items()
        }
        for _ in range(count)
    ]


def _numpy(record: ArrayRecord | None) -> Arrays:
    assert record is not None
    return {k: record[k].numpy() for k in record}


def test_median_holds_off_one_huge_outlier_where_fedavg_moves() -> None:
    g = _global()
    strategy = RobustFedAvg(MEDIAN_F1)
    sent = _sent(strategy, g, 5)
    honest = _honest(g, 4)
    outlier = {k: v + np.float32(1e6) for k, v in g.items()}
    replies = _replies(sent, [*honest, outlier])

    robust = _numpy(strategy.aggregate_train(1, replies)[0])
    plain = _numpy(FedAvg().aggregate_train(1, replies)[0])

    for key in g:
        stacked = np.stack([h[key] for h in honest])
        assert (robust[key] >= stacked.min(axis=0) - 1e-6).all()
        assert (robust[key] <= stacked.max(axis=0) + 1e-6).all()
        assert (np.abs(plain[key] - g[key]) > 1e5).all()  # the mean follows the outlier


def _naive(config: AggregatorConfig, g: Arrays, models: list[Arrays], weights: list[int]) -> Arrays:
    """The rule's own aggregate over the stacked deltas, cut back by hand."""
    keys = list(g)
    flat = np.stack(
        [np.concatenate([m[k].astype(np.float64).ravel() for k in keys]) for m in models]
    )
    base = np.concatenate([g[k].astype(np.float64).ravel() for k in keys])
    update = build_aggregator(config).aggregate(flat - base, np.asarray(weights, dtype=np.float64))
    out, offset = {}, 0
    for k in keys:
        size = g[k].size
        out[k] = (base + update)[offset : offset + size].reshape(g[k].shape).astype(g[k].dtype)
        offset += size
    return out


@pytest.mark.parametrize(
    "config",
    [
        MEDIAN_F1,
        AggregatorConfig(AggregatorName.TRIMMED_MEAN, f=1),
        AggregatorConfig(AggregatorName.KRUM, f=1),
        AggregatorConfig(AggregatorName.MULTI_KRUM, f=1),
        AggregatorConfig(AggregatorName.GEOMETRIC_MEDIAN, f=1),
        AggregatorConfig(AggregatorName.CENTERED_CLIPPING, f=1, cc_tau=0.05),
        AggregatorConfig(AggregatorName.NORM_BOUNDING, norm_bound=0.2),
        AggregatorConfig(AggregatorName.WEIGHTED_MEAN),
        AggregatorConfig(AggregatorName.MEDIAN, f=1, pre_aggregation=(PreAggregationName.NNM,)),
    ],
    ids=lambda c: c.label,
)
def test_matches_the_rules_own_aggregate_on_the_same_matrix(config: AggregatorConfig) -> None:
    g = _global()
    strategy = RobustFedAvg(config)
    sent = _sent(strategy, g, 6)
    models = [*_honest(g, 5), {k: -3 * v for k, v in g.items()}]
    examples = [5, 10, 20, 40, 80, 160]  # unequal: a rule that uses weights must get these
    arrays, _ = strategy.aggregate_train(1, _replies(sent, models, examples))
    expected = _naive(config, g, models, examples)
    got = _numpy(arrays)
    for key in g:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-6)


def test_weights_come_from_the_weighted_by_key_metric() -> None:
    g = {"w": np.zeros(2, dtype=np.float32)}
    strategy = RobustFedAvg(AggregatorConfig(), weighted_by_key="n")
    sent = _sent(strategy, g, 2)
    ones, threes = {"w": np.ones(2, np.float32)}, {"w": np.full(2, 3.0, np.float32)}
    replies = [_reply(sent[0], ones, {"n": 3}), _reply(sent[1], threes, {"n": 1})]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(_numpy(arrays)["w"], [1.5, 1.5])  # (3·1 + 1·3) / 4
    assert metrics is not None
    assert "n" not in metrics  # FedAvg leaves the weight key out of the metrics


def test_the_rule_runs_on_deltas_from_the_sent_model_not_on_models() -> None:
    """Norm bounding clips ‖x_i − g‖; applied to the models it would shrink a big model."""
    g = {"w": np.full(4, 100.0, dtype=np.float32)}
    strategy = RobustFedAvg(AggregatorConfig(AggregatorName.NORM_BOUNDING, norm_bound=1.0))
    sent = _sent(strategy, g, 3)
    models = [{"w": g["w"] + np.float32(0.1)} for _ in range(3)]
    arrays, _ = strategy.aggregate_train(1, _replies(sent, models))
    np.testing.assert_allclose(_numpy(arrays)["w"], np.full(4, 100.1), rtol=1e-6)


def test_result_keeps_keys_order_shapes_and_dtypes_and_metrics_as_fedavg() -> None:
    g: Arrays = {
        "conv.weight": np.zeros((2, 1, 3, 3), dtype=np.float32),
        "bn.running_mean": np.zeros(2, dtype=np.float64),
        "bn.num_batches_tracked": np.array(10, dtype=np.int64),
    }
    strategy = RobustFedAvg(MEDIAN_F1)
    sent = _sent(strategy, g, 3)
    models = [
        {
            "conv.weight": np.full((2, 1, 3, 3), i, dtype=np.float32),
            "bn.running_mean": np.full(2, 0.5 * i),
            "bn.num_batches_tracked": np.array(10 + i, dtype=np.int64),
        }
        for i in (1, 2, 7)
    ]
    replies = _replies(sent, models, [1, 2, 3])
    arrays, metrics = strategy.aggregate_train(1, replies)
    got = _numpy(arrays)
    assert list(got) == list(g)
    for key, value in g.items():
        assert got[key].shape == value.shape
        assert got[key].dtype == value.dtype
    assert got["bn.num_batches_tracked"] == 12
    np.testing.assert_array_equal(got["conv.weight"], np.full((2, 1, 3, 3), 2.0, np.float32))
    assert metrics == FedAvg().aggregate_train(1, replies)[1]
    assert all("arrays" in r.content.array_records for r in replies)  # replies left intact


def _bad_models(g: Arrays) -> dict[str, Arrays]:
    w, b = g["fc.weight"], g["fc.bias"]
    return {
        "missing-key": {"fc.weight": w},
        "extra-key": {**g, "fc.extra": b},
        "shape": {"fc.weight": w.T.copy(), "fc.bias": b},
        "dtype": {"fc.weight": w.astype(np.float64), "fc.bias": b},
    }


@pytest.mark.parametrize("kind", ["missing-key", "extra-key", "shape", "dtype"])
def test_a_reply_with_another_layout_is_a_shape_mismatch(kind: str) -> None:
    g = _global()
    strategy = RobustFedAvg(MEDIAN_F1)
    sent = _sent(strategy, g, 3)
    models = [*_honest(g, 2), _bad_models(g)[kind]]
    with pytest.raises(ShapeMismatchError, match=f"node {sent[2].metadata.dst_node_id}"):
        strategy.aggregate_train(1, _replies(sent, models))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_reply_is_a_typed_error(value: float) -> None:
    g = _global()
    strategy = RobustFedAvg(MEDIAN_F1)
    sent = _sent(strategy, g, 3)
    bad = {k: v.copy() for k, v in g.items()}
    bad["fc.bias"][1] = value
    with pytest.raises(NonFiniteUpdateError, match="NaN or Inf"):
        strategy.aggregate_train(1, _replies(sent, [*_honest(g, 2), bad]))


@pytest.mark.parametrize(
    "metrics",
    [{"loss": 1.0}, {"num-examples": -1}, {"num-examples": float("nan")}],
    ids=["no-weight", "negative", "nan"],
)
def test_a_reply_without_a_usable_weight_is_a_protocol_error(metrics: dict[str, float]) -> None:
    g = _global()
    strategy = RobustFedAvg(MEDIAN_F1)
    sent = _sent(strategy, g, 3)
    replies = [*_replies(sent[:2], _honest(g, 2)), _reply(sent[2], g, metrics)]
    with pytest.raises(ProtocolError, match="num-examples"):
        strategy.aggregate_train(1, replies)


def test_too_few_replies_for_the_rules_precondition_raise() -> None:
    """Median with f = 2 needs 5 updates; one of five nodes fails, four are left."""
    g = _global()
    strategy = RobustFedAvg(AggregatorConfig(AggregatorName.MEDIAN, f=2))
    assert strategy.min_train_nodes == 5  # sampling asks for what the rule needs
    sent = _sent(strategy, g, 5)
    replies = _replies(sent[:4], _honest(g, 4))
    replies.append(Message(Error(code=0, reason="offline"), reply_to=sent[4]))
    with pytest.raises(PreconditionError, match=r"n >= 2f \+ 1") as raised:
        strategy.aggregate_train(1, replies)
    assert (raised.value.n, raised.value.f) == (4, 2)
    assert strategy.reports[1].failed == (sent[4].metadata.dst_node_id,)


def test_exclude_policy_leaves_a_malformed_reply_out_and_reports_it() -> None:
    g = _global()
    strategy = RobustFedAvg(MEDIAN_F1, on_malformed=MalformedReplyPolicy.EXCLUDE)
    sent = _sent(strategy, g, 4)
    honest = _honest(g, 3)
    bad = {k: np.full_like(v, np.nan) for k, v in g.items()}
    arrays, _ = strategy.aggregate_train(1, _replies(sent, [*honest, bad]))
    expected = _naive(MEDIAN_F1, g, honest, [10, 10, 10])
    for key in g:
        np.testing.assert_allclose(_numpy(arrays)[key], expected[key], rtol=1e-6)
    report = strategy.reports[1]
    assert report.accepted == tuple(m.metadata.dst_node_id for m in sent[:3])
    assert [r.node_id for r in report.rejected] == [sent[3].metadata.dst_node_id]
    assert "NaN" in report.rejected[0].reason


def test_exclusions_that_break_the_precondition_still_raise() -> None:
    g = _global()
    strategy = RobustFedAvg(MEDIAN_F1, on_malformed=MalformedReplyPolicy.EXCLUDE)
    sent = _sent(strategy, g, 3)
    bad = {"fc.weight": g["fc.weight"]}
    with pytest.raises(PreconditionError):
        strategy.aggregate_train(1, _replies(sent, [*_honest(g, 2), bad]))


def test_aggregating_a_round_that_was_not_sent_is_refused() -> None:
    g = _global()
    strategy = RobustFedAvg(MEDIAN_F1)
    with pytest.raises(ProtocolError, match="configure_train"):
        strategy.aggregate_train(1, _replies(_sent(RobustFedAvg(MEDIAN_F1), g, 3), _honest(g, 3)))
    sent = _sent(strategy, g, 3, server_round=1)
    with pytest.raises(ProtocolError, match="round 2"):
        strategy.aggregate_train(2, _replies(sent, _honest(g, 3)))


def test_two_array_records_in_a_reply_are_refused() -> None:
    g = _global()
    strategy = RobustFedAvg(MEDIAN_F1)
    sent = _sent(strategy, g, 3)
    replies = _replies(sent, _honest(g, 3))
    replies[0].content["more"] = _record(g)
    with pytest.raises(ProtocolError, match="exactly one ArrayRecord"):
        strategy.aggregate_train(1, replies)


def test_only_error_replies_leave_the_model_unchanged() -> None:
    g = _global()
    strategy = RobustFedAvg(MEDIAN_F1)
    sent = _sent(strategy, g, 3)
    replies = [Message(Error(code=0, reason="x"), reply_to=m) for m in sent]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert len(strategy.reports[1].failed) == 3


def test_min_train_nodes_below_the_rules_need_is_refused() -> None:
    with pytest.raises(ConfigError, match="min_train_nodes"):
        RobustFedAvg(AggregatorConfig(AggregatorName.KRUM, f=1), min_train_nodes=4)
    assert RobustFedAvg(AggregatorConfig(AggregatorName.KRUM, f=1)).min_train_nodes == 5


def test_a_non_numeric_global_array_is_refused_when_sent() -> None:
    strategy = RobustFedAvg(MEDIAN_F1)
    with pytest.raises(FedguardError, match="numeric"):
        _sent(strategy, {"mask": np.array([True, False])}, 3)
