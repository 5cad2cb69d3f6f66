"""Config validation, parameter choice, the neighbour graph, primitives and wire format."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from fedguard.core.errors import ConfigError, FedguardError
from fedguard.privacy.secagg.analysis import (
    binomial_cdf_below,
    choose_parameters,
    hypergeometric_sf,
    log2_correctness_failure,
    log2_equivocation_failure,
)
from fedguard.privacy.secagg.config import SecAggConfig
from fedguard.privacy.secagg.crypto import (
    MaskExpander,
    aead_open,
    aead_seal,
    prg_uint32,
    x25519_agree,
    x25519_keypair,
)
from fedguard.privacy.secagg.errors import (
    AdvertisementError,
    MalformedMessageError,
    SecAggConfigError,
    ShareDecryptionError,
)
from fedguard.privacy.secagg.graph import NeighbourGraph
from fedguard.privacy.secagg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    KeyAdvertisement,
    MaskedInput,
    MaskedInputRequest,
    RevealedShare,
    SetupRequest,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
)

# ------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 2, "degree": 1, "threshold": 1}, "num_clients"),
        ({"num_clients": 10, "degree": 5, "threshold": 3}, "degree"),
        ({"num_clients": 10, "degree": 10, "threshold": 6}, "degree"),
        ({"num_clients": 10, "degree": 6, "threshold": 3}, "exceed degree/2"),
        ({"num_clients": 10, "degree": 6, "threshold": 7}, "threshold"),
        ({"num_clients": 3, "degree": 2, "threshold": 1}, "threshold"),
        ({"num_clients": 10, "degree": 9, "threshold": 5, "clip_range": 0.0}, "clip_range"),
        ({"num_clients": 10, "degree": 9, "threshold": 5, "clip_range": math.inf}, "clip_range"),
        ({"num_clients": 10, "degree": 9, "threshold": 5, "value_bits": 0}, "value_bits"),
        ({"num_clients": True, "degree": 9, "threshold": 5}, "num_clients"),
        ({"num_clients": 10, "degree": 9, "threshold": 5, "require_identity": 1}, "identity"),
    ],
)
def test_config_rejects_unsafe_or_invalid_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(SecAggConfigError, match=match) as caught:
        SecAggConfig(**kwargs)  # type: ignore[arg-type]
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, FedguardError)


def test_config_round_trips_through_flower_fields() -> None:
    cfg = SecAggConfig(12, 6, 4, clip_range=0.25, value_bits=14, require_identity=True)
    assert SecAggConfig.from_fields(cfg.to_fields()) == cfg
    with pytest.raises(SecAggConfigError, match="exactly"):
        SecAggConfig.from_fields({**cfg.to_fields(), "extra": 1})


def test_recommended_parameters() -> None:
    small = SecAggConfig.recommended(10)
    assert small.degree == 9 and small.threshold > 9 / 2
    big = SecAggConfig.recommended(100, dropout_rate=0.1, corrupt_fraction=0.05)
    assert big.degree < 99 and big.degree % 2 == 0 and 2 * big.threshold > big.degree
    chosen = choose_parameters(100)
    assert chosen.log2_privacy_failure <= -40 and chosen.log2_correctness_failure <= -20
    assert not chosen.complete_graph
    # Degree grows like log n.
    assert choose_parameters(1000).degree < 2 * choose_parameters(100).degree


def test_analysis_formulas_against_direct_computation() -> None:
    # Hypergeometric: 10 of 99 corrupt, 42 drawn, P[X >= 6].
    direct = sum(math.comb(10, i) * math.comb(89, 42 - i) for i in range(6, 11)) / math.comb(99, 42)
    assert hypergeometric_sf(99, 10, 42, 6) == pytest.approx(direct, rel=1e-12)
    assert hypergeometric_sf(99, 3, 42, 4) == 0.0
    assert binomial_cdf_below(3, 0.5, 2) == pytest.approx(0.5)
    assert log2_equivocation_failure(100, 42, 24, 5) == -math.inf
    assert log2_correctness_failure(100, 42, 24, 0.0) == -math.inf


def test_choose_parameters_rejects_impossible_requests() -> None:
    with pytest.raises(SecAggConfigError):
        choose_parameters(2)
    with pytest.raises(SecAggConfigError):
        choose_parameters(10, dropout_rate=1.5)
    with pytest.raises(SecAggConfigError, match="no threshold"):
        choose_parameters(10, corrupt_fraction=0.9, security_bits=40)


# ------------------------------------------------------------- graph


@pytest.mark.parametrize(("n", "k"), [(3, 2), (10, 4), (11, 6), (12, 11), (50, 36)])
def test_graph_is_k_regular_symmetric_and_deterministic(n: int, k: int) -> None:
    ids = [7 * i + 1000 for i in range(n)]
    seed = os.urandom(32)
    graph = NeighbourGraph.build(ids, k, seed)
    for node in ids:
        around = graph.neighbours(node)
        assert len(around) == k and node not in around
        assert all(graph.are_neighbours(other, node) for other in around)
        assert sorted(graph.share_x(node, other) for other in around) == list(range(1, k + 1))
    again = NeighbourGraph.build(list(reversed(ids)), k, seed)
    assert all(again.neighbours(node) == graph.neighbours(node) for node in ids)


def test_graph_depends_on_the_public_seed() -> None:
    ids = list(range(40))
    a = NeighbourGraph.build(ids, 6, b"a" * 32)
    b = NeighbourGraph.build(ids, 6, b"b" * 32)
    assert any(a.neighbours(i) != b.neighbours(i) for i in ids)


def test_graph_rejects_bad_degrees_and_ids() -> None:
    with pytest.raises(SecAggConfigError):
        NeighbourGraph.build(range(10), 5, bytes(32))
    with pytest.raises(MalformedMessageError):
        NeighbourGraph.build([1, 1, 2], 2, bytes(32))
    with pytest.raises(MalformedMessageError):
        NeighbourGraph.build([1, 2, 3], 2, b"short")
    graph = NeighbourGraph.build(range(10), 4, bytes(32))
    with pytest.raises(MalformedMessageError):
        graph.share_x(0, next(i for i in range(1, 10) if not graph.are_neighbours(0, i)))


# ------------------------------------------------------------- primitives


def test_prg_is_deterministic_per_seed_and_uniform() -> None:
    seed = os.urandom(32)
    a = prg_uint32(seed, 100_000)
    assert a.dtype == np.uint32 and np.array_equal(a, prg_uint32(seed, 100_000))
    assert not np.array_equal(a, prg_uint32(os.urandom(32), 100_000))
    assert abs(a.astype(np.float64).mean() / 2**32 - 0.5) < 0.01


def test_mask_expander_matches_prg() -> None:
    seed = os.urandom(32)
    accumulator = np.arange(1000, dtype=np.uint32)
    expander = MaskExpander(1000)
    expander.add(accumulator, seed)
    np.testing.assert_array_equal(
        accumulator, np.arange(1000, dtype=np.uint32) + prg_uint32(seed, 1000)
    )
    expander.subtract(accumulator, seed)
    np.testing.assert_array_equal(accumulator, np.arange(1000, dtype=np.uint32))


def test_aes_gcm_binds_associated_data() -> None:
    key = os.urandom(32)
    blob = aead_seal(key, b"share", b"round-1|a|b")
    assert aead_open(key, blob, b"round-1|a|b") == b"share"
    with pytest.raises(ShareDecryptionError):
        aead_open(key, blob, b"round-2|a|b")
    with pytest.raises(ShareDecryptionError):
        aead_open(key, blob[:-1] + bytes([blob[-1] ^ 1]), b"round-1|a|b")


def test_x25519_agreement_and_low_order_key() -> None:
    a_private, a_public = x25519_keypair()
    b_private, b_public = x25519_keypair()
    assert x25519_agree(a_private, b_public) == x25519_agree(b_private, a_public)
    with pytest.raises(AdvertisementError, match="low order"):
        x25519_agree(a_private, bytes(32))


# ------------------------------------------------------------- wire format


def _messages() -> list[object]:
    rid = b"round-id-1"
    cfg = SecAggConfig(4, 3, 2, clip_range=0.1)
    keys = [os.urandom(32) for _ in range(4)]
    ad = KeyAdvertisement(rid, 5, keys[0], keys[1], keys[2], keys[3], os.urandom(64))
    share = EncryptedShare(5, 6, os.urandom(100))
    revealed = RevealedShare(5, 2, os.urandom(64))
    signature = ConsistencySignature(rid, 5, os.urandom(64))
    return [
        SetupRequest(rid, cfg, (1, 5, 6, 2**64 - 1), 17),
        ad,
        ShareKeysRequest(rid, (ad, ad)),
        ShareKeysResponse(rid, 5, (share,)),
        MaskedInputRequest(rid, (share, share)),
        ConsistencyRequest(rid, (1, 5, 6)),
        signature,
        UnmaskRequest(rid, (1, 5), (6,), (signature,)),
        UnmaskResponse(rid, 5, (revealed,), (revealed, revealed)),
    ]


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_messages_round_trip_and_reject_corruption(message: object) -> None:
    data = message.to_bytes()  # type: ignore[attr-defined]
    kind = type(message)
    assert kind.from_bytes(data) == message  # type: ignore[attr-defined]
    with pytest.raises(FedguardError):
        kind.from_bytes(data[:-1])  # type: ignore[attr-defined]
    with pytest.raises(MalformedMessageError):
        kind.from_bytes(data + b"\x00")  # type: ignore[attr-defined]
    with pytest.raises(MalformedMessageError):
        kind.from_bytes(b"XXXX" + data[4:])  # type: ignore[attr-defined]


def test_masked_input_round_trips_and_is_about_float32_size() -> None:
    masked = np.arange(10_000, dtype=np.uint32)
    message = MaskedInput(b"round-id-1", 5, masked)
    data = message.to_bytes()
    again = MaskedInput.from_bytes(data)
    assert again.node_id == 5 and np.array_equal(again.masked, masked)
    assert len(data) < 4 * 10_000 + 64
    with pytest.raises(MalformedMessageError):
        MaskedInput.from_bytes(data[:-4])
    with pytest.raises(MalformedMessageError):
        MaskedInput(b"round-id-1", 5, masked.astype(np.int64))


@pytest.mark.parametrize(
    "build",
    [
        lambda: ConsistencyRequest(b"short", (1,)),
        lambda: ConsistencyRequest(b"round-id-1", (2, 1)),
        lambda: ConsistencyRequest(b"round-id-1", (1, 1)),
        lambda: UnmaskRequest(b"round-id-1", (1,), (-1,), ()),
        lambda: SetupRequest(b"round-id-1", SecAggConfig(4, 3, 2), (1, 2, 3), 5),
        lambda: SetupRequest(b"round-id-1", SecAggConfig(4, 3, 2), (1, 2, 3, 4), 0),
        lambda: RevealedShare(1, 0, bytes(64)),
        lambda: KeyAdvertisement(b"round-id-1", 1, bytes(31), bytes(32), bytes(32), bytes(32)),
    ],
)
def test_invalid_payloads_are_refused_at_construction(build: object) -> None:
    with pytest.raises(MalformedMessageError):
        build()  # type: ignore[operator]
