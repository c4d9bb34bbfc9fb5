"""The custom layers in segray.models.layers, on hand-made tensors."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from segray.models.layers import (
    DivisibleSizeCheck,
    MaxPoolingWithArgmax2D,
    MaxUnpooling2D,
    ResizeLike,
    size_error,
    valid_sizes,
)


def test_unpooling_puts_values_at_the_recorded_argmax_positions() -> None:
    # Image 0, one channel; the 2x2 window maxima are 3, 5, 4 and 7:
    #   1 2 | 0 0
    #   3 0 | 0 5
    #   ----+----
    #   0 0 | 7 0
    #   4 0 | 0 6
    # Image 1 is image 0 flipped left-right, so its maxima move with the flip.
    image0 = np.array([[1, 2, 0, 0], [3, 0, 0, 5], [0, 0, 7, 0], [4, 0, 0, 6]], np.float32)
    inputs = np.stack([image0, image0[:, ::-1]])[..., None]
    pooled, argmax = MaxPoolingWithArgmax2D(2)(inputs)
    np.testing.assert_array_equal(pooled.numpy()[0, ..., 0], [[3, 5], [4, 7]])
    np.testing.assert_array_equal(pooled.numpy()[1, ..., 0], [[5, 3], [7, 4]])

    values = np.array([[[10, 20], [30, 40]], [[50, 60], [70, 80]]], np.float32)[..., None]
    unpooled = MaxUnpooling2D()([values, argmax, inputs]).numpy()[..., 0]
    expected0 = [[0, 0, 0, 0], [10, 0, 0, 20], [0, 0, 40, 0], [30, 0, 0, 0]]
    expected1 = [[0, 0, 0, 0], [50, 0, 0, 60], [0, 70, 0, 0], [0, 0, 0, 80]]
    np.testing.assert_array_equal(unpooled[0], expected0)
    np.testing.assert_array_equal(unpooled[1], expected1)


def test_unpooling_a_pool_keeps_only_the_maxima_with_odd_sizes_and_dynamic_batch() -> None:
    rng = np.random.default_rng(1)
    inputs = rng.random((3, 5, 7, 2), dtype=np.float32)
    pool, unpool = MaxPoolingWithArgmax2D(2), MaxUnpooling2D()

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 2], tf.float32)])
    def round_trip(x: tf.Tensor) -> tf.Tensor:
        pooled, argmax = pool(x)
        return unpool([pooled, argmax, x])

    result = round_trip(inputs).numpy()
    assert result.shape == inputs.shape
    # Oracle: a pixel survives iff it is the max of its 2x2 window (SAME padding
    # gives the last row/column windows of their own).
    expected = np.zeros_like(inputs)
    for b in range(3):
        for c in range(2):
            for y in range(0, 5, 2):
                for x in range(0, 7, 2):
                    window = inputs[b, y : y + 2, x : x + 2, c]
                    dy, dx = np.unravel_index(np.argmax(window), window.shape)
                    expected[b, y + dy, x + dx, c] = window[dy, dx]
    np.testing.assert_array_equal(result, expected)


def test_unpooling_passes_gradients_to_the_pooled_values() -> None:
    inputs = tf.constant(np.random.default_rng(2).random((1, 4, 4, 1), dtype=np.float32))
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        pooled, argmax = MaxPoolingWithArgmax2D(2)(inputs)
        out = MaxUnpooling2D()([pooled, argmax, inputs])
        loss = tf.reduce_sum(out)
    grad = tape.gradient(loss, inputs).numpy()
    # One unit of gradient per window, at its maximum.
    np.testing.assert_array_equal(grad, (out.numpy() != 0).astype(np.float32))


def test_pool_output_spec_has_int64_argmax() -> None:
    x = keras.Input((None, None, 4))
    pooled, argmax = MaxPoolingWithArgmax2D(2)(x)
    assert argmax.dtype == "int64"
    assert tuple(pooled.shape) == (None, None, None, 4)
    pooled, argmax = MaxPoolingWithArgmax2D(2)(keras.Input((5, 8, 4)))
    assert tuple(argmax.shape) == (None, 3, 4, 4)


def test_resize_like_matches_the_reference_size_and_dtype() -> None:
    x = tf.reshape(tf.range(4, dtype=tf.float32), (1, 2, 2, 1))
    reference = tf.zeros((3, 7, 5, 9))
    # tf.image.resize alone would return float32 from float16 input.
    out = ResizeLike("bilinear", dtype="mixed_float16")([x, reference])
    assert tuple(out.shape) == (1, 7, 5, 1)
    assert out.dtype == tf.float16
    nearest = ResizeLike("nearest")([tf.ones((1, 1, 1, 2)) * 3, reference])
    np.testing.assert_array_equal(nearest.numpy(), np.full((1, 7, 5, 2), 3.0))


def test_resize_like_rejects_unknown_interpolation() -> None:
    with pytest.raises(ValueError, match="interpolation: expected 'bilinear' or 'nearest', got 'cubic'"):
        ResizeLike("cubic")


@pytest.mark.parametrize(
    ("n", "expected"),
    [(32, (32,)), (33, (32, 48)), (47, (32, 48)), (5, (16,)), (16, (16,))],
)
def test_valid_sizes(n: int, expected: tuple) -> None:
    assert valid_sizes(n, 16) == expected


def test_size_error_names_the_size_and_the_nearest_valid_ones() -> None:
    assert size_error("unet (depth 4)", 33, 32, 16) == (
        "unet (depth 4) needs height and width divisible by 16, got 33x32; "
        "nearest valid height: 32 or 48, width: 32"
    )


def test_size_check_raises_eagerly_and_in_a_graph_with_the_same_message() -> None:
    check = DivisibleSizeCheck(8, "model X")
    np.testing.assert_array_equal(check(np.ones((1, 16, 8, 1), np.float32)), np.ones((1, 16, 8, 1)))
    with pytest.raises(ValueError, match=r"model X needs .* by 8, got 20x4; nearest valid height: 16 or 24, width: 8"):
        check(np.ones((1, 20, 4, 1), np.float32))

    graph_check = tf.function(check, input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
    assert tuple(graph_check(tf.ones((2, 16, 24, 1))).shape) == (2, 16, 24, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"got 20x4; nearest valid height: 16 or 24, width: 8"):
        graph_check(tf.ones((1, 20, 4, 1)))


@pytest.mark.parametrize(
    "layer",
    [DivisibleSizeCheck(16, "unet (depth 4)"), MaxPoolingWithArgmax2D(3, 2), MaxUnpooling2D(), ResizeLike("nearest")],
    ids=lambda layer: type(layer).__name__,
)
def test_layers_round_trip_through_config_and_registered_names(layer: keras.layers.Layer) -> None:
    config = keras.saving.serialize_keras_object(layer)
    assert config["registered_name"] == f"segray>{type(layer).__name__}"
    clone = keras.saving.deserialize_keras_object(config, safe_mode=True)
    assert type(clone) is type(layer)
    assert clone.get_config() == layer.get_config()
