"""U-Net specifics: size errors, depth and width, residual and attention variants."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from segray import models


def test_static_bad_size_fails_at_build_naming_the_nearest_valid_sizes() -> None:
    with pytest.raises(ValueError) as info:
        models.build("unet", 2, (250, 256, 3))
    assert str(info.value) == (
        "unet (depth 4) needs height and width divisible by 16, got 250x256; "
        "nearest valid height: 240 or 256, width: 256"
    )


def test_static_bad_side_with_the_other_dynamic() -> None:
    with pytest.raises(ValueError, match=r"got \?x7; nearest valid height: any multiple of 8, width: 8"):
        models.build("unet", 2, (None, 7, 3), depth=3)


def test_dynamic_model_called_on_a_bad_size_names_it_and_the_nearest_valid_ones() -> None:
    model = models.build("unet", 2, depth=2, width=4)
    assert tuple(model(np.zeros((1, 36, 32, 3), np.float32)).shape) == (1, 36, 32, 2)
    expected = r"unet \(depth 2\) needs height and width divisible by 4, got 34x32; nearest valid height: 32 or 36"
    with pytest.raises(ValueError, match=expected):
        model(np.zeros((1, 34, 32, 3), np.float32))
    # Inside a graph traced for any size the check runs when the size is known.
    forward = tf.function(model, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
        forward(tf.zeros((1, 34, 32, 3)))


def test_depth_and_width_set_the_levels() -> None:
    model = models.build("unet", 2, (32, 32, 3), depth=3, width=4, dropout=0.0)
    assert model.get_layer("enc1_1_conv").filters == 4
    assert model.get_layer("bottleneck_1_conv").filters == 32
    assert tuple(model.get_layer("pool3").output.shape) == (None, 4, 4, 16)
    assert "bottleneck_dropout" not in [layer.name for layer in model.layers]
    assert model.get_layer("up1").strides == (2, 2)


def test_residual_and_attention_variants_run_and_reload(tmp_path) -> None:
    model = models.build("unet", 2, depth=2, width=4, residual=True, attention=True)
    names = {layer.name for layer in model.layers}
    assert {"enc1_add", "att1_alpha", "att2_scale"} <= names
    images = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
    logits = model(images)
    assert tuple(logits.shape) == (2, 16, 16, 2)
    model.save(tmp_path / "unet.keras")
    loaded = keras.saving.load_model(tmp_path / "unet.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded(images).numpy(), logits.numpy())


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"depth": 0}, "unet: depth must be a positive integer, got 0"),
        ({"width": 2.5}, "unet: width must be a positive integer, got 2.5"),
        ({"dropout": 1.0}, r"unet: dropout must be in \[0, 1\), got 1.0"),
        ({"attention": "yes"}, "unet: attention must be true or false, got 'yes'"),
    ],
)
def test_bad_options_are_named(options: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        models.build("unet", 2, **options)
