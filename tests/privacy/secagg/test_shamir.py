"""Shamir t-of-k sharing of 32-byte secrets over GF(2^31 − 1)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.privacy.secagg.errors import MalformedMessageError, ReconstructionError
from fedguard.privacy.secagg.shamir import (
    CHUNKS_PER_SECRET,
    PRIME,
    combine,
    elements_to_secret,
    secret_to_elements,
    split,
)


def naive_combine(xs: list[int], ys: list[list[int]]) -> list[int]:
    """Textbook Lagrange interpolation at 0 with Python integers, element by element."""
    out = []
    for column in range(len(ys[0])):
        total = 0
        for j, xj in enumerate(xs):
            term = ys[j][column]
            for m, xm in enumerate(xs):
                if m != j:
                    term = term * xm * pow(xm - xj, -1, PRIME) % PRIME
            total = (total + term) % PRIME
        out.append(total)
    return out


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 12), data=st.data())
def test_any_t_shares_reconstruct(k: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, k))
    secrets = [os.urandom(32), os.urandom(32)]
    shares = split(secrets, t, k)
    assert shares.shape == (k, 2 * CHUNKS_PER_SECRET)
    chosen = data.draw(st.lists(st.integers(1, k), min_size=t, max_size=t, unique=True))
    values = combine(chosen, shares[np.array(chosen) - 1])
    assert elements_to_secret(values[:CHUNKS_PER_SECRET]) == secrets[0]
    assert elements_to_secret(values[CHUNKS_PER_SECRET:]) == secrets[1]


def test_every_subset_of_size_t_reconstructs() -> None:
    secret = os.urandom(32)
    t, k = 3, 6
    shares = split([secret], t, k)
    for subset in itertools.combinations(range(1, k + 1), t):
        values = combine(list(subset), shares[np.array(subset) - 1])
        assert elements_to_secret(values) == secret


def test_t_minus_one_shares_do_not_reconstruct() -> None:
    secret = os.urandom(32)
    t, k = 4, 7
    shares = split([secret], t, k)
    fewer = [1, 3, 6]
    wrong = combine(fewer, shares[np.array(fewer) - 1])
    assert not np.array_equal(wrong, secret_to_elements(secret))


def naive_combine_at(xs: list[int], ys: list[int], at: int) -> int:
    total = 0
    for j, xj in enumerate(xs):
        term = ys[j]
        for m, xm in enumerate(xs):
            if m != j:
                term = term * (at - xm) * pow(xj - xm, -1, PRIME) % PRIME
        total = (total + term) % PRIME
    return total


@pytest.mark.parametrize("t", [2, 3])
def test_t_minus_one_shares_are_uniform_whatever_the_secret(t: int) -> None:
    # Any t − 1 shares are uniformly distributed, independent of the secret (perfect
    # secrecy): for two very different secrets, each share and the difference of two
    # shares have mean ≈ p/2; 4800 draws give a std of the normalised mean ≈ 0.004.
    for secret in (bytes(32), b"\xff" * 32):
        draws = np.stack([split([secret], t, 3)[: t - 1] for _ in range(300)])
        for column in range(t - 1):
            assert abs(draws[:, column].mean() / PRIME - 0.5) < 0.03
        if t == 3:
            difference = (draws[:, 0] - draws[:, 1]) % PRIME
            assert abs(difference.mean() / PRIME - 0.5) < 0.03


def test_vectorised_combine_matches_naive_reference() -> None:
    rng = np.random.default_rng(7)
    for t in (1, 2, 5, 9):
        xs = sorted(rng.choice(np.arange(1, 40), size=t, replace=False).tolist())
        ys = rng.integers(0, PRIME, size=(t, 6)).tolist()
        assert combine(xs, np.array(ys)).tolist() == naive_combine(xs, ys)


def test_vectorised_split_matches_naive_polynomial_evaluation() -> None:
    # Reconstruct the polynomial from t shares, evaluate it naively at the others.
    secret = os.urandom(32)
    t, k = 3, 8
    shares = split([secret], t, k)
    for column in (0, 7, 15):
        # Lagrange through x = 1..t gives the values at every other x.
        xs = list(range(1, t + 1))
        for x in range(t + 1, k + 1):
            value = naive_combine_at(xs, [int(shares[i - 1, column]) for i in xs], x)
            assert value == int(shares[x - 1, column])
        assert naive_combine_at(xs, [int(shares[i - 1, column]) for i in xs], 0) == int(
            secret_to_elements(secret)[column]
        )


def test_out_of_range_reconstruction_is_detected() -> None:
    with pytest.raises(ReconstructionError):
        elements_to_secret(np.full(CHUNKS_PER_SECRET, 70_000))


@pytest.mark.parametrize(
    ("xs", "shape"),
    [([1, 1], (2, 4)), ([0, 2], (2, 4)), ([1, 2], (3, 4)), ([1], (1, 4, 1))],
)
def test_combine_rejects_malformed_input(xs: list[int], shape: tuple[int, ...]) -> None:
    with pytest.raises(MalformedMessageError):
        combine(xs, np.zeros(shape, dtype=np.int64))


def test_split_rejects_bad_parameters() -> None:
    with pytest.raises(MalformedMessageError):
        split([os.urandom(32)], 4, 3)
    with pytest.raises(MalformedMessageError):
        split([b"short"], 1, 3)
