"""Parameter and FLOP counts, and the text the CLI prints."""

from __future__ import annotations

import keras
import pytest

from segray import models
from segray.models.registry import TINY_OPTIONS
from segray.models.summary import model_flops


def single_layer_model(layer: keras.layers.Layer, input_shape: tuple) -> keras.Model:
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, layer(inputs))


def test_conv_flops_match_a_hand_count() -> None:
    # 3x3 conv, 3 -> 8 channels, same padding on 16x20: every one of the
    # 16*20*8 outputs takes 3*3*3 multiply-adds (2 FLOPs each) plus a bias add.
    model = single_layer_model(keras.layers.Conv2D(8, 3, padding="same"), (16, 20, 3))
    assert model_flops(model) == 16 * 20 * 8 * (2 * 3 * 3 * 3 + 1)


def test_strided_grouped_conv_without_bias() -> None:
    # Stride 2 -> 8x10 outputs; groups=2 -> each output reads 3*3*(4/2) inputs.
    layer = keras.layers.Conv2D(6, 3, strides=2, padding="same", groups=2, use_bias=False)
    model = single_layer_model(layer, (16, 20, 4))
    assert model_flops(model) == 8 * 10 * 6 * 2 * 3 * 3 * 2


def test_transposed_conv_and_dense_flops_match_hand_counts() -> None:
    # Each of the 4*4*5 inputs is spread over a 2x2x3 patch of outputs.
    up = single_layer_model(keras.layers.Conv2DTranspose(3, 2, strides=2), (4, 4, 5))
    assert model_flops(up) == 2 * 4 * 4 * 5 * 2 * 2 * 3 + 8 * 8 * 3
    dense = single_layer_model(keras.layers.Dense(7), (10,))
    assert model_flops(dense) == 2 * 10 * 7 + 7


def test_model_flops_needs_a_static_size() -> None:
    model = single_layer_model(keras.layers.Conv2D(2, 1), (None, None, 3))
    with pytest.raises(ValueError, match="static input size"):
        model_flops(model)


def test_unet_flops_scale_with_pixels() -> None:
    small = models.flops_per_image("unet", (32, 32), **TINY_OPTIONS["unet"])
    large = models.flops_per_image("unet", 64, **TINY_OPTIONS["unet"])
    # Every counted layer of a U-Net is a conv whose output scales with H*W.
    assert large == 4 * small > 0


def test_count_params_counts_every_weight() -> None:
    model = single_layer_model(keras.layers.Conv2D(8, 3), (None, None, 3))
    assert models.count_params(model) == 3 * 3 * 3 * 8 + 8
    bn = single_layer_model(keras.layers.BatchNormalization(), (None, None, 5))
    assert models.count_params(bn) == 4 * 5  # gamma, beta, moving mean and variance


def test_describe_without_a_name_tables_every_model() -> None:
    text = models.describe()
    lines = text.splitlines()
    assert lines[0].split() == ["model", "parameters"]
    counts = {}
    for name in models.available():
        row = next(line for line in lines if line.startswith(name + " "))
        counts[name] = int(row.split()[-1].replace(",", ""))
    assert counts["unet"] == models.count_params(models.build("unet", 2))
    assert min(counts.values()) > 100_000


def test_describe_a_model_gives_params_and_flops_at_the_size() -> None:
    options = TINY_OPTIONS["unet"]
    text = models.describe("unet", size=(64, 96), num_classes=3, **options)
    flops = models.flops_per_image("unet", (64, 96), 3, **options)
    assert text.splitlines()[0] == "unet"
    assert "64x96x3, 3 classes" in text
    assert f"{flops:,} per image ({flops / 1e9:.2f} GFLOPs)" in text
    assert f"parameters:       {models.count_params(models.build('unet', 3, **options)):,}" in text
    assert "depth=2, width=8, residual=False" in text


def test_describe_options_need_a_name() -> None:
    with pytest.raises(ValueError, match="options depth need a model name"):
        models.describe(depth=2)


def test_describe_an_unknown_model_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'nope'; available: deeplabv3plus, segnet, (.*, )?unet"):
        models.describe("nope")
