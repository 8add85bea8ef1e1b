"""Inputs of the detectors: signal columns and the conductance detector's optional class one-hot."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import ConfigError
from models.signals import COND_INPUTS, conductance_inputs


def test_conductance_alone_is_passed_through() -> None:
    cond = np.arange(12, dtype=np.float32).reshape(3, 4)
    x = conductance_inputs(cond, np.array([0, 1, 2]))
    assert x.dtype == np.float64
    np.testing.assert_array_equal(x, cond)


def test_class_inputs_append_the_predicted_class_one_hot() -> None:
    cond = np.random.default_rng(0).normal(size=(5, 3))
    prediction = np.array([2, 0, 3, 3, 1])
    x = conductance_inputs(cond, prediction, "conductance+class", num_classes=4)
    assert x.shape == (5, 7)
    np.testing.assert_array_equal(x[:, :3], cond)
    np.testing.assert_array_equal(x[:, 3:].argmax(1), prediction)
    np.testing.assert_array_equal(x[:, 3:].sum(1), np.ones(5))


@pytest.mark.parametrize(
    ("prediction", "num_classes", "match"),
    [
        (np.array([0, 1]), 4, "2 predictions"),
        (np.array([0, 1, 4]), 4, "0..3"),
        (np.array([0, 1, -1]), 4, "0..3"),
        (np.array([0, 1, 2]), None, "number of classes"),
    ],
)
def test_bad_class_inputs_are_refused(prediction: np.ndarray, num_classes: int | None, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        conductance_inputs(np.zeros((3, 2)), prediction, "conductance+class", num_classes)


def test_unknown_inputs_name_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="conductance\\+class"):
        conductance_inputs(np.zeros((1, 2)), np.zeros(1), "logits")
    assert COND_INPUTS[0] == "conductance"
