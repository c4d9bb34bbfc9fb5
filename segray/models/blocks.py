"""Functional building blocks shared by the model families.

Each function takes a Keras tensor and returns one, adding plain Keras layers
named after ``name`` so that summaries and weight files read clearly
(``enc2_conv1``, ``enc2_bn1``, ``enc2_relu1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras


# PyTorch's 0.1 in Keras terms. Keras' default 0.99 leaves the moving statistics
# near their initial values for the first few hundred steps, so validation in
# inference mode of a short run is far worse than the training batches show.
BN_MOMENTUM = 0.9

def conv_bn_relu(
    x: Any,
    filters: int,
    name: str,
    kernel_size: int = 3,
    strides: int = 1,
    dilation_rate: int = 1,
    activation: bool = True,
) -> Any:
    """Conv (no bias: batch norm's beta replaces it) -> BatchNorm -> ReLU."""
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        dilation_rate=dilation_rate,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    if activation:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def double_conv(x: Any, filters: int, name: str) -> Any:
    """Two 3x3 conv-BN-ReLU, the plain U-Net / VGG stage body."""
    x = conv_bn_relu(x, filters, f"{name}_1")
    return conv_bn_relu(x, filters, f"{name}_2")


def residual_block(x: Any, filters: int, name: str, strides: int = 1, dilation_rate: int = 1) -> Any:
    """ResNet basic block: two 3x3 convs plus a shortcut, ReLU after the sum.

    The shortcut is a 1x1 conv + BN when the stride or width changes,
    otherwise the identity.
    """
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_bn_relu(x, filters, f"{name}_proj", kernel_size=1, strides=strides, activation=False)
    y = conv_bn_relu(x, filters, f"{name}_1", strides=strides, dilation_rate=dilation_rate)
    y = conv_bn_relu(y, filters, f"{name}_2", dilation_rate=dilation_rate, activation=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def logits_head(x: Any, num_classes: int, kernel_size: int = 1, name: str = "classifier") -> Any:
    """Per-pixel class scores, then a float32 identity so logits stay float32.

    Under the ``mixed_float16`` policy every layer computes in float16; the
    final ``Activation('linear', dtype='float32')`` casts once, so the loss is
    computed in float32 as the Keras mixed-precision guide prescribes.
    """
    x = keras.layers.Conv2D(num_classes, kernel_size, padding="same", name=name)(x)
    return keras.layers.Activation("linear", dtype="float32", name="logits")(x)


def check_common(num_classes: int, input_shape: Sequence[int | None], model: str) -> tuple[int | None, ...]:
    """Validates the arguments every builder takes; returns ``input_shape`` as a tuple."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{model}: num_classes must be a positive integer, got {num_classes!r}")
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[2] is None:
        raise ValueError(f"{model}: input_shape must be (height, width, channels) with channels known, got {shape!r}")
    for n in shape:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{model}: input_shape sides must be positive integers or None, got {shape!r}")
    return shape


def check_positive(model: str, **values: int) -> None:
    """Raises ValueError naming the first option that is not a positive integer."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{model}: {key} must be a positive integer, got {value!r}")


def check_bool(model: str, **values: bool) -> None:
    """Raises ValueError naming the first option that is not a bool."""
    for key, value in values.items():
        if not isinstance(value, bool):
            raise ValueError(f"{model}: {key} must be true or false, got {value!r}")


def check_rate(model: str, key: str, value: float) -> None:
    """Raises ValueError unless ``0 <= value < 1`` (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{model}: {key} must be in [0, 1), got {value!r}")
