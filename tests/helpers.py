"""Assertion helpers shared by the tests."""

import keras
import numpy as np


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def assert_close(actual, expected, atol=1e-4, rtol=0.0):
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), atol=atol, rtol=rtol)


def assert_config_round_trip(obj):
    """`from_config(get_config())` rebuilds an equal config."""
    config = obj.get_config()
    clone = type(obj).from_config(config)
    assert clone.get_config() == config
    return clone
