"""One walk over the registry: every model builds, runs, saves and reloads."""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest
import tensorflow as tf

from segray import models
from segray.models.registry import MODELS, TINY_OPTIONS

NAMES = models.available()


def tiny(name: str, num_classes: int = 3, input_shape: tuple = (None, None, 3)) -> keras.Model:
    keras.utils.set_random_seed(0)
    return models.build(name, num_classes, input_shape, **TINY_OPTIONS[name])


def test_available_lists_the_registry_sorted() -> None:
    assert NAMES == sorted(MODELS)
    assert {"unet", "segnet", "deeplabv3plus"} <= set(NAMES)


def test_every_model_has_tiny_options() -> None:
    assert set(TINY_OPTIONS) == set(MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_finite_float32_logits_at_input_size(name: str, images: np.ndarray) -> None:
    model = tiny(name)
    logits = model(images, training=False)
    assert tuple(logits.shape) == (2, 32, 32, 3)
    assert logits.dtype == tf.float32
    assert np.isfinite(logits.numpy()).all()
    # Logits, not probabilities: a softmax output would sum to 1 over classes.
    assert not np.allclose(logits.numpy().sum(axis=-1), 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_dynamic_input_takes_varying_sizes_and_batches_in_a_graph(name: str) -> None:
    model = tiny(name)
    forward = tf.function(model, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    for shape in [(2, 32, 32, 3), (1, 48, 40, 3)]:
        logits = forward(tf.random.uniform(shape))
        assert tuple(logits.shape) == shape[:3] + (3,)


@pytest.mark.parametrize("name", NAMES)
def test_static_input_shape_is_kept(name: str) -> None:
    model = tiny(name, num_classes=2, input_shape=(32, 48, 3))
    assert tuple(model.output_shape) == (None, 32, 48, 2)


@pytest.mark.parametrize("name", NAMES)
def test_saved_keras_file_loads_in_safe_mode_with_equal_outputs(name: str, images: np.ndarray, tmp_path) -> None:
    model = tiny(name)
    # A training-mode call moves the batch-norm statistics off their initial
    # values, so the comparison also covers non-trainable weights.
    model(images, training=True)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded(images, training=False).numpy(), model(images, training=False).numpy())


@pytest.mark.parametrize("name", NAMES)
def test_get_config_round_trip(name: str, images: np.ndarray) -> None:
    model = tiny(name)
    config = model.get_config()
    # from_config consumes the dict it is given.
    clone = keras.Model.from_config(copy.deepcopy(config))
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone(images).numpy(), model(images).numpy())


@pytest.mark.parametrize("name", NAMES)
def test_logits_stay_float32_under_mixed_precision(name: str, images: np.ndarray, mixed_float16: None) -> None:
    model = tiny(name)
    assert model.get_layer("classifier").compute_dtype == "float16"
    logits = model(images, training=True)
    assert logits.dtype == tf.float32
    assert np.isfinite(logits.numpy()).all()


def test_unknown_model_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'unett'; available: deeplabv3plus, segnet, unet"):
        models.build("unett", 2)


def test_unknown_option_is_named_with_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        models.build("unet", 2, depht=3)
    message = str(info.value)
    assert "'depht'" in message and "'unet'" in message
    assert "valid options: attention, depth, dropout, residual, width" in message


@pytest.mark.parametrize(
    ("num_classes", "input_shape", "expected"),
    [
        (0, (None, None, 3), "num_classes must be a positive integer, got 0"),
        (2, (32, 32), r"input_shape must be \(height, width, channels\)"),
        (2, (32, 32, None), "channels known"),
    ],
)
def test_bad_common_arguments_are_named(num_classes: int, input_shape: tuple, expected: str) -> None:
    for name in NAMES:
        with pytest.raises(ValueError, match=expected):
            models.build(name, num_classes, input_shape)
