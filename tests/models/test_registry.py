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
    with pytest.raises(ValueError, match=r"unknown model 'unett'; available: deeplabv3plus, segnet, (.*, )?unet"):
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


@pytest.mark.parametrize("name", NAMES)
def test_declared_multiple_is_what_the_built_model_checks(name: str) -> None:
    from segray.runs import required_multiple

    entry = models.spec(name)
    for options in (dict(TINY_OPTIONS[name]), {**TINY_OPTIONS[name], **({"depth": 3} if "depth" in entry.default_options() else {})}):
        declared = entry.multiple(**options)
        assert required_multiple(models.build(name, 2, **options)) == declared
        if declared > 1:  # a side off the multiple is refused at build time
            with pytest.raises(ValueError, match=f"divisible by {declared}"):
                models.build(name, 2, (declared + 1, declared, 3), **options)


def test_deep_supervision_is_declared_by_the_entry_and_builds_the_heads_it_declares() -> None:
    takes = [n for n in NAMES if models.spec(n).deep_supervision is not None]
    assert takes == ["unet"]
    entry = models.spec("unet")
    assert entry.supervised_levels(depth=3) == 2 and entry.supervised_levels(depth=2) == 1
    assert models.spec("segnet").supervised_levels() == 0
    net = entry.deep_supervision(models.build("unet", 2, depth=3, width=4), 2, models.DEEP_SUPERVISION_LEVELS)
    assert [tuple(o.shape[1:3]) for o in net(np.zeros((1, 32, 32, 3), np.float32))] == [(32, 32), (16, 16), (8, 8)]


def test_register_names_a_model_by_its_importable_module() -> None:
    from segray.models.registry import ModelSpec, register
    from tests.models import toy_model

    assert models.spec("tests.models.toy_model:toy").build is toy_model.build_toy
    logits = models.build("tests.models.toy_model:toy", 3, **models.spec("tests.models.toy_model:toy").tiny_options)(np.zeros((2, 8, 8, 3), np.float32))
    assert tuple(logits.shape) == (2, 8, 8, 3)

    def in_main(num_classes, input_shape=(None, None, 3)):
        return toy_model.build_toy(num_classes, input_shape)

    in_main.__module__ = "__main__"
    with pytest.raises(ValueError, match="define it in an importable module"):
        register(ModelSpec("main", in_main))
    with pytest.raises(ValueError, match="cannot import its module 'no_such_module'"):
        models.spec("no_such_module:toy")
    with pytest.raises(ValueError, match="module tests.models.toy_model registers no model 'other' \\(it registers toy\\)"):
        models.spec("tests.models.toy_model:other")
