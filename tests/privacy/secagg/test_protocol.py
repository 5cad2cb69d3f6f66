"""SecAgg+ end to end: exact sums under any dropouts, aborts, server-state hygiene."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedguard.privacy.secagg.client_round import ClientRound
from fedguard.privacy.secagg.config import SecAggConfig
from fedguard.privacy.secagg.crypto import ed25519_keypair
from fedguard.privacy.secagg.driver import run_round
from fedguard.privacy.secagg.encoding import FixedPointEncoder, StochasticRounder
from fedguard.privacy.secagg.errors import (
    BelowThresholdError,
    SecAggAbort,
    StageOrderError,
)
from fedguard.privacy.secagg.graph import NeighbourGraph
from fedguard.privacy.secagg.server_round import ServerRound
from fedguard.privacy.secagg.transcript import Stage
from tests.privacy.secagg.helpers import ManualRound

DROP_STAGES = [
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY_CHECK,
    Stage.UNMASK,
]

# Dropouts between sharing keys and masking are the ones that need mask keys recovered.
WEIGHTED_STAGES = [*DROP_STAGES, Stage.MASKED_INPUT, Stage.MASKED_INPUT]


def reference_outcome(
    graph: NeighbourGraph, t: int, drop_at: dict[int, Stage | None]
) -> tuple[Stage | None, set[int]]:
    """The first stage that must abort (None: success) and the survivors U3.

    Written from the protocol's definition, independently of ServerRound: U_s is
    who is still answering at stage s; every client still in the round needs t
    live neighbours, and after the masked input every secret the server needs
    (survivors' seeds, dropped neighbours' keys) needs t live holders.
    """
    order = {stage: i for i, stage in enumerate(DROP_STAGES)}

    def alive_at(stage: Stage) -> set[int]:
        return {n for n, s in drop_at.items() if s is None or order[s] > order[stage]}

    def nb(node: int) -> set[int]:
        return set(graph.neighbours(node))

    u = {stage: alive_at(stage) for stage in DROP_STAGES}
    for stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS):
        if len(u[stage]) < t + 1 or any(len(nb(i) & u[stage]) < t for i in u[stage]):
            return stage, set()
    u2, u3 = u[Stage.SHARE_KEYS], u[Stage.MASKED_INPUT]
    needed = set(u3)
    for i in u3:
        needed |= nb(i) & u2
    for stage in (Stage.MASKED_INPUT, Stage.CONSISTENCY_CHECK, Stage.UNMASK):
        if len(u[stage]) < t + 1 or any(len(nb(j) & u[stage]) < t for j in needed):
            return stage, set()
    return None, u3


@st.composite
def rounds(draw: st.DrawFn) -> tuple[SecAggConfig, dict[int, Stage | None], int, int, bool]:
    n = draw(st.integers(3, 12))
    degrees = [k for k in range(2, n - 1, 2)] + [n - 1]
    k = draw(st.sampled_from(degrees))
    lowest = max(2, k // 2 + 1)
    t = draw(st.sampled_from([lowest, lowest, draw(st.integers(lowest, k))]))
    ids = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    drops: list[Stage | None] = [None] * n
    for index, stage in draw(
        st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(WEIGHTED_STAGES)), max_size=n)
    ):
        drops[index] = drops[index] or stage
    m = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**32 - 1))
    wire = draw(st.booleans())
    return SecAggConfig(n, k, t), dict(zip(ids, drops, strict=True)), m, seed, wire


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(rounds())
def test_exact_sum_under_any_dropout_pattern(
    case: tuple[SecAggConfig, dict[int, Stage | None], int, int, bool],
) -> None:
    cfg, drop_at, m, seed, wire = case
    rng = np.random.default_rng(seed)
    inputs = {node: rng.integers(0, 2**32, m + 1, dtype=np.uint32) for node in drop_at}
    schedule: dict[Stage, set[int]] = {}
    for node, stage in drop_at.items():
        if stage is not None:
            schedule.setdefault(stage, set()).add(node)
    graphs: list[NeighbourGraph] = []

    def grab(stage: Stage, server: ServerRound) -> None:
        if not graphs:
            graphs.append(server.graph)

    abort: BelowThresholdError | None = None
    try:
        outcome = run_round(cfg, inputs, dropouts=schedule, wire=wire, observer=grab)
    except BelowThresholdError as caught:
        abort = caught
    expected_stage, survivors = reference_outcome(graphs[0], cfg.threshold, drop_at)
    if abort is not None:
        assert abort.stage == (expected_stage.value if expected_stage else None)
        event(f"abort at {abort.stage}")
        return
    assert expected_stage is None
    result = outcome.result
    event("exact sum" + (" with dropped masks" if result.dropped else ""))
    assert set(result.contributors) == survivors
    expected = np.zeros(m + 1, dtype=np.uint32)
    for node in survivors:
        expected += inputs[node]
    np.testing.assert_array_equal(result.total, expected)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(5, 12),
    data=st.data(),
    m=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_sum_when_masks_of_dropped_nodes_must_be_removed(
    n: int, data: st.DataObject, m: int, seed: int
) -> None:
    # At most k − t dropouts in all: every node keeps t live neighbours, so the round
    # must succeed, and at least one node drops after sharing keys.
    k = data.draw(st.sampled_from([d for d in range(4, n - 1, 2)] + [n - 1]))
    t = max(2, k // 2 + 1)
    budget = k - t
    ids = list(range(n))
    gone = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=budget, unique=True))
    late = data.draw(st.sampled_from([Stage.MASKED_INPUT, Stage.CONSISTENCY_CHECK, Stage.UNMASK]))
    schedule: dict[Stage, set[int]] = {Stage.MASKED_INPUT: {gone[0]}}
    for node in gone[1:]:
        schedule.setdefault(data.draw(st.sampled_from([*DROP_STAGES, late])), set()).add(node)
    rng = np.random.default_rng(seed)
    inputs = {node: rng.integers(0, 2**32, m, dtype=np.uint32) for node in ids}
    result = run_round(SecAggConfig(n, k, t), inputs, dropouts=schedule).result
    assert gone[0] in result.dropped
    before_mask = schedule.get(Stage.ADVERTISE_KEYS, set()) | schedule.get(Stage.SHARE_KEYS, set())
    expected_survivors = set(ids) - before_mask - schedule[Stage.MASKED_INPUT]
    assert set(result.contributors) == expected_survivors
    expected = np.zeros(m, dtype=np.uint32)
    for node in expected_survivors:
        expected += inputs[node]
    np.testing.assert_array_equal(result.total, expected)


def test_sparse_graph_round_with_dropouts_at_every_stage() -> None:
    n = 12
    cfg = SecAggConfig(n, 6, 4)
    inputs = {i: np.full(5, i + 1, dtype=np.uint32) for i in range(n)}
    outcome = run_round(cfg, inputs, dropouts={Stage.SHARE_KEYS: {0}, Stage.MASKED_INPUT: {5}})
    assert outcome.result.dropped == (5,)
    assert 0 not in outcome.result.contributors
    survivors = set(range(n)) - {0, 5}
    np.testing.assert_array_equal(outcome.result.total, np.full(5, sum(i + 1 for i in survivors)))


def test_encode_aggregate_decode_equals_sum_of_quantised_survivor_inputs() -> None:
    n, m = 8, 40
    cfg = SecAggConfig(n, n - 1, 5, clip_range=2.0, value_bits=12, weight_bits=6)
    encoder = FixedPointEncoder(cfg)
    rng = np.random.default_rng(3)
    rounder = StochasticRounder(b"k" * 32)
    encoded = {
        node: encoder.encode(rng.normal(scale=1.5, size=m), weight=node + 1, rounder=rounder)
        for node in range(n)
    }
    outcome = run_round(
        cfg,
        {node: e.values for node, e in encoded.items()},
        dropouts={Stage.MASKED_INPUT: {2}, Stage.UNMASK: {6}},
    )
    decoded = encoder.decode(outcome.result.total)
    survivors = outcome.result.contributors
    assert 2 not in survivors and 6 in survivors
    expected = sum(encoder.dequantise(encoded[node]) for node in survivors)
    np.testing.assert_allclose(decoded.weighted_sum, expected, rtol=0, atol=1e-9)
    assert decoded.total_weight == sum(node + 1 for node in survivors)


def test_identity_round_succeeds() -> None:
    n = 6
    keys = {node: ed25519_keypair()[0] for node in range(n)}
    inputs = {node: np.arange(4, dtype=np.uint32) * node for node in range(n)}
    outcome = run_round(
        SecAggConfig(n, n - 1, 3, require_identity=True),
        inputs,
        identity_keys=keys,
        dropouts={Stage.MASKED_INPUT: {1}},
    )
    np.testing.assert_array_equal(outcome.result.total, np.arange(4) * (15 - 1))


# ------------------------------------------------------------- server state hygiene


def _arrays_in(value: object, seen: set[int] | None = None) -> Iterator[np.ndarray]:
    """Every numpy array reachable from ``value`` (fields, dicts, sequences, objects)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _arrays_in(key, seen)
            yield from _arrays_in(item, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _arrays_in(item, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        # vars(), not dataclasses.fields(): private and ad-hoc attributes count too.
        for item in vars(value).values():
            yield from _arrays_in(item, seen)


def _holds_an_input(server: object, inputs: dict[int, np.ndarray]) -> bool:
    for array in _arrays_in(server):
        flat = np.asarray(array).ravel()
        for vector in inputs.values():
            if flat.size != vector.size:
                continue
            same_bytes = flat.nbytes == vector.nbytes and flat.tobytes() == vector.tobytes()
            if same_bytes or np.array_equal(flat, vector):
                return True
    return False


def test_state_checker_can_fail() -> None:
    inputs = {1: np.arange(6, dtype=np.uint32)}
    round_ = ManualRound(SecAggConfig(3, 2, 2))
    assert not _holds_an_input(round_.server, inputs)
    round_.server.rejected[99] = "x"  # a harmless field
    round_.server.masked_with[1] = ()
    round_.server.__dict__["leak"] = {"v": [inputs[1].copy()]}
    assert _holds_an_input(round_.server, inputs)


@pytest.mark.parametrize(
    "dropouts",
    [
        {},
        {Stage.MASKED_INPUT: {3}},
        {Stage.SHARE_KEYS: {0}, Stage.CONSISTENCY_CHECK: {4}, Stage.UNMASK: {7}},
    ],
)
def test_server_state_never_holds_an_individual_input(dropouts: dict[Stage, set[int]]) -> None:
    n, m = 9, 32
    rng = np.random.default_rng(11)
    inputs = {node: rng.integers(0, 2**32, m, dtype=np.uint32) for node in range(n)}
    inspected: list[Stage] = []

    def inspect(stage: Stage, server: ServerRound) -> None:
        inspected.append(stage)
        assert not _holds_an_input(server, inputs), f"server holds an input after {stage}"

    outcome = run_round(SecAggConfig(n, 8, 5), inputs, dropouts=dropouts, observer=inspect)
    assert inspected == [Stage.ADVERTISE_KEYS, *DROP_STAGES]
    assert len(outcome.result.contributors) >= 5


# ------------------------------------------------------------- aborts


def test_below_threshold_aborts_with_a_clear_error_and_the_next_round_runs() -> None:
    n = 6
    cfg = SecAggConfig(n, n - 1, 4)
    inputs = {node: np.full(3, node, dtype=np.uint32) for node in range(n)}
    servers: list[ServerRound] = []

    def keep(stage: Stage, server: ServerRound) -> None:
        servers.append(server)

    with pytest.raises(SecAggAbort, match=r"masked-input.*t\+1=5") as caught:
        run_round(cfg, inputs, dropouts={Stage.MASKED_INPUT: {0, 1, 2}}, observer=keep)
    assert isinstance(caught.value, BelowThresholdError)
    assert caught.value.stage == Stage.MASKED_INPUT.value
    server = servers[-1]
    assert server.aborted is not None and server.masked_sum is None and server.total is None
    assert server.stage is Stage.MASKED_INPUT  # no consistency or unmask request was made
    with pytest.raises(StageOrderError, match="aborted"):
        server.receive_masked_inputs({})
    # The next round, with the same clients, runs.
    outcome = run_round(cfg, inputs, dropouts={Stage.MASKED_INPUT: {0}})
    np.testing.assert_array_equal(outcome.result.total, np.full(3, 1 + 2 + 3 + 4 + 5))


def test_abort_at_unmask_when_too_few_holders_answer() -> None:
    cfg = SecAggConfig(5, 4, 3)
    inputs = {node: np.zeros(2, dtype=np.uint32) for node in range(5)}
    with pytest.raises(BelowThresholdError, match="unmask"):
        run_round(cfg, inputs, dropouts={Stage.UNMASK: {0, 1}})


def test_client_refuses_consistency_with_too_few_surviving_holders() -> None:
    round_ = ManualRound(SecAggConfig(5, 4, 3))
    requests = round_.mask(round_.share(round_.advertise()))
    node = next(iter(requests))
    others = [n for n in round_.node_ids if n != node]
    short = type(requests[node])(requests[node].round_id, tuple(sorted([node, *others[:1]])))
    with pytest.raises(BelowThresholdError, match="surviving share holders"):
        round_.clients[node].sign_survivors(short)


# ------------------------------------------------------------- client state


def test_client_state_round_trips_at_every_stage_and_hides_secrets() -> None:
    round_ = ManualRound(SecAggConfig(4, 3, 2))
    node = round_.node_ids[0]

    def check(state: ClientRound) -> None:
        again = ClientRound.from_bytes(state.to_bytes())
        assert again.to_bytes() == state.to_bytes()
        assert again.stage is state.stage
        text = repr(state)
        for secret in (state.mask_private, state.share_private, state.self_seed):
            if secret:
                assert secret.hex() not in text and repr(secret) not in text

    share_requests = round_.advertise()
    check(round_.clients[node])
    mask_requests = round_.share(share_requests)
    check(round_.clients[node])
    consistency_requests = round_.mask(mask_requests)
    state = round_.clients[node]
    assert state.self_seed == b"" and state.mask_private == b"" and state.share_private == b""
    check(state)
    unmask_requests = round_.sign(consistency_requests)
    check(round_.clients[node])
    result = round_.finish(round_.reveal(unmask_requests))
    assert round_.clients[node].held_shares == {}
    check(round_.clients[node])
    np.testing.assert_array_equal(result.total, round_.expected_sum(round_.node_ids))
