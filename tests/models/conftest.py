"""Shared fixtures for the model tests."""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np
import pytest


@pytest.fixture
def images() -> np.ndarray:
    """A (2, 32, 32, 3) float32 batch in [0, 1)."""
    return np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)


@pytest.fixture
def mixed_float16() -> Iterator[None]:
    """Runs the test under the mixed_float16 policy, restoring the previous one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
