"""A model added the way a user adds one: this file and its ``register`` call, no change to segray.

Ray Train's workers import this module by the name ``register`` returns
(``tests.models.toy_model:toy``), which the run's config carries.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from segray.models.registry import ModelSpec, register


def build_toy(num_classes: int, input_shape: Sequence[int | None] = (None, None, 3), *, width: int = 8) -> keras.Model:
    """Two convolutions: a 3x3 of ``width`` filters, then 1x1 logits (float32 under any dtype policy)."""
    inputs = keras.Input(tuple(input_shape), name="image")
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="conv")(inputs)
    outputs = keras.layers.Conv2D(num_classes, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name="toy")


NAME = register(ModelSpec("toy", build_toy, tiny_options={"width": 4}))
