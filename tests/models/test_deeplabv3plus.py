"""DeepLabV3+ specifics: ASPP rates, decoder join, keras.applications backbone."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from segray import models
from segray.models.registry import TINY_OPTIONS


def test_aspp_has_rates_6_12_18_image_pooling_and_a_low_level_join() -> None:
    model = models.build("deeplabv3plus", 2, (64, 64, 3), **TINY_OPTIONS["deeplabv3plus"])
    for rate in (6, 12, 18):
        assert model.get_layer(f"aspp_rate{rate}_conv").dilation_rate == (rate, rate)
    # Image pooling: the stride-16 features (8 * width = 64 channels) averaged to 1x1.
    assert tuple(model.get_layer("aspp_pool").output.shape) == (None, 1, 1, 64)
    assert tuple(model.get_layer("aspp_pool_resize").output.shape) == (None, 4, 4, 16)
    # Stride 16 into ASPP, stride 4 at the decoder join, input size at the end.
    assert tuple(model.get_layer("aspp_concat").output.shape)[1:3] == (4, 4)
    assert tuple(model.get_layer("decoder_concat").output.shape) == (None, 16, 16, 16 + 8)
    assert tuple(model.output_shape) == (None, 64, 64, 2)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"backbone": "vgg"}, "unknown backbone 'vgg'; valid: small, resnet50"),
        ({"backbone_weights": "x.h5"}, "backbone_weights needs a keras.applications backbone"),
        ({"backbone": "resnet50", "width": 8}, "width applies to backbone='small' only"),
    ],
)
def test_bad_backbone_options_are_named(options: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        models.build("deeplabv3plus", 2, **options)


def test_missing_backbone_weights_file_is_named(tmp_path) -> None:
    path = tmp_path / "none.weights.h5"
    with pytest.raises(FileNotFoundError, match=f"backbone_weights {path} does not exist"):
        models.build("deeplabv3plus", 2, backbone="resnet50", backbone_weights=str(path))


@pytest.mark.slow
def test_resnet50_backbone_loads_a_local_weights_file(tmp_path) -> None:
    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
    kernel = reference.get_layer("conv3_block1_1_conv").kernel
    kernel.assign(np.random.default_rng(0).normal(size=kernel.shape).astype(np.float32))
    path = tmp_path / "resnet50_notop.weights.h5"
    reference.save_weights(path)

    model = models.build(
        "deeplabv3plus", 2, backbone="resnet50", backbone_weights=str(path), aspp_filters=8, decoder_filters=8
    )
    np.testing.assert_array_equal(model.get_layer("conv3_block1_1_conv").kernel.numpy(), kernel.numpy())
    logits = model(np.zeros((1, 64, 48, 3), np.float32))
    assert tuple(logits.shape) == (1, 64, 48, 2)
