from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedguard.core.errors import NonFiniteUpdateError, ShapeMismatchError
from fedguard.core.serialization import (
    flatten_weights,
    load_weights,
    model_weights,
    record_to_weights,
    unflatten_weights,
    validate_weights,
    weights_to_record,
)


def _reference() -> OrderedDict[str, np.ndarray]:
    return OrderedDict(w=np.ones((2, 3), np.float32), b=np.zeros(3, np.float32))


def test_record_round_trip() -> None:
    weights = _reference()
    back = record_to_weights(weights_to_record(weights))
    assert list(back) == list(weights)
    for k in weights:
        np.testing.assert_array_equal(back[k], weights[k])


@pytest.mark.parametrize(
    ("candidate", "error", "match"),
    [
        ({"w": np.ones((2, 3), np.float32)}, ShapeMismatchError, "missing"),
        ({**_reference(), "x": np.ones(1, np.float32)}, ShapeMismatchError, "unexpected"),
        (
            {"w": np.ones((3, 2), np.float32), "b": np.zeros(3, np.float32)},
            ShapeMismatchError,
            "shape",
        ),
        (
            {"w": np.ones((2, 3), np.float64), "b": np.zeros(3, np.float32)},
            ShapeMismatchError,
            "dtype",
        ),
        (
            {"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)},
            NonFiniteUpdateError,
            "NaN",
        ),
        (
            {"w": np.ones((2, 3), np.float32), "b": np.array([0, np.inf, 0], np.float32)},
            NonFiniteUpdateError,
            "1 NaN or Inf",
        ),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(
    candidate: dict[str, np.ndarray], error: type, match: str
) -> None:
    with pytest.raises(error, match=match) as caught:
        validate_weights(_reference(), candidate)
    assert caught.value.reason


@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=4))
def test_flatten_unflatten_inverse(shapes: list[tuple[int, int]]) -> None:
    rng = np.random.default_rng(0)
    weights = OrderedDict(
        (f"t{i}", rng.normal(size=s).astype(np.float32)) for i, s in enumerate(shapes)
    )
    back = unflatten_weights(flatten_weights(weights), weights)
    for k in weights:
        np.testing.assert_array_equal(back[k], weights[k])
    with pytest.raises(ShapeMismatchError):
        unflatten_weights(np.zeros(flatten_weights(weights).size + 1), weights)


def test_model_weights_load_back() -> None:
    model = torch.nn.Linear(3, 2)
    weights = model_weights(model)
    other = torch.nn.Linear(3, 2)
    load_weights(other, weights)
    torch.testing.assert_close(other.weight, model.weight)
    with pytest.raises(ShapeMismatchError):
        load_weights(torch.nn.Linear(4, 2), weights)
