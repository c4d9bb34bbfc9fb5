"""DeepLabV3+ (Chen et al., 2018).

A ResNet-style backbone at output stride 16, Atrous Spatial Pyramid Pooling
(a 1x1 conv, 3x3 convs at dilation 6, 12 and 18, and image pooling), and a
decoder that upsamples the ASPP output to stride 4, joins the backbone's
stride-4 ("low-level") features and upsamples the logits to the input size.

The default backbone is a small built-in ResNet (basic blocks, ResNet-18
layout at half width) so that CPU tests are fast. ``backbone="resnet50"``
uses ``keras.applications.ResNet50`` instead, randomly initialised or loaded
from a local weights file: nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import keras

from segray.models import blocks
from segray.models.layers import ResizeLike

ASPP_RATES = (6, 12, 18)

# keras.applications backbones: constructor, then the layer giving stride-4
# (low-level) features and the one giving stride-16 features. Stopping at
# stride 16 (before conv5) is how the keras.io DeepLabV3+ example uses ResNet50.
KERAS_BACKBONES: dict[str, tuple[Any, str, str]] = {
    "resnet50": (keras.applications.ResNet50, "conv2_block3_out", "conv4_block6_out"),
}
BACKBONES = ("small", *KERAS_BACKBONES)


def small_backbone(inputs: Any, width: int, blocks_per_stage: int) -> tuple[Any, Any]:
    """A ResNet with basic blocks: stride-4 and stride-16 features.

    Stem of two 3x3 convs (stride 2), then four stages of ``width * (1, 2, 4,
    8)`` filters; the first three halve the size and the last keeps stride 16
    with dilation 2, as DeepLab does with the last ResNet stage.
    """
    x = blocks.conv_bn_relu(inputs, width, "stem_1", strides=2)
    x = blocks.conv_bn_relu(x, width, "stem_2")
    low_level = None
    for stage, (mult, stride, dilation) in enumerate(((1, 2, 1), (2, 2, 1), (4, 2, 1), (8, 1, 2)), start=1):
        for block in range(blocks_per_stage):
            x = blocks.residual_block(
                x,
                width * mult,
                f"stage{stage}_block{block + 1}",
                strides=stride if block == 0 else 1,
                dilation_rate=dilation,
            )
        if stage == 1:
            low_level = x
    return low_level, x


def keras_backbone(inputs: Any, backbone: str, weights: str | None) -> tuple[Any, Any]:
    """Stride-4 and stride-16 features of a ``keras.applications`` model.

    The model is built on ``inputs`` with ``weights=None`` and, when given,
    loaded from the local file ``weights`` (a ``.weights.h5`` saved from the
    same application with ``include_top=False``, or Keras' own
    ``*_notop.h5`` file).
    """
    constructor, low_name, high_name = KERAS_BACKBONES[backbone]
    model = constructor(include_top=False, weights=None, input_tensor=inputs)
    if weights is not None:
        model.load_weights(weights)
    return model.get_layer(low_name).output, model.get_layer(high_name).output


def aspp(x: Any, filters: int, dropout: float) -> Any:
    """Atrous Spatial Pyramid Pooling on stride-16 features."""
    branches = [blocks.conv_bn_relu(x, filters, "aspp_1x1", kernel_size=1)]
    for rate in ASPP_RATES:
        branches.append(blocks.conv_bn_relu(x, filters, f"aspp_rate{rate}", dilation_rate=rate))
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(x)
    pooled = blocks.conv_bn_relu(pooled, filters, "aspp_pool_proj", kernel_size=1)
    # A 1x1 map resized to any size is a broadcast, exact with either method;
    # bilinear because XLA has no kernel for the gradient of nearest.
    branches.append(ResizeLike("bilinear", name="aspp_pool_resize")([pooled, x]))
    y = keras.layers.Concatenate(name="aspp_concat")(branches)
    y = blocks.conv_bn_relu(y, filters, "aspp_proj", kernel_size=1)
    if dropout > 0:
        y = keras.layers.Dropout(dropout, name="aspp_dropout")(y)
    return y


def build_deeplabv3plus(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    *,
    backbone: str = "small",
    backbone_weights: str | None = None,
    width: int | None = None,
    blocks_per_stage: int | None = None,
    aspp_filters: int = 256,
    low_level_filters: int = 48,
    decoder_filters: int = 256,
    dropout: float = 0.1,
) -> keras.Model:
    """Builds a DeepLabV3+ that outputs per-pixel logits at the input's size.

    Any input size works: feature maps are matched by resizing to each
    other's run-time size, not by fixed factors.

    Args:
        num_classes: number of output channels (logits, no softmax).
        input_shape: ``(H, W, C)``; ``H`` and ``W`` may be ``None``.
        backbone: ``"small"`` (built-in ResNet) or ``"resnet50"``
            (``keras.applications``).
        backbone_weights: local weights file for a ``keras.applications``
            backbone; the default ``None`` means random initialisation.
            ResNet50's ImageNet weights expect its caffe preprocessing
            (``keras.applications.resnet50.preprocess_input``) of the images.
        width: first-stage filters of the small backbone (default 32).
        blocks_per_stage: basic blocks per stage of the small backbone (default 2).
        aspp_filters: filters of each ASPP branch and of its projection.
        low_level_filters: the low-level features are projected to this many.
        decoder_filters: filters of the two 3x3 decoder convs.
        dropout: dropout rate after the ASPP projection (0 turns it off).

    Returns:
        A ``keras.Model`` named ``deeplabv3plus`` mapping ``(B, H, W, C)``
        images to ``(B, H, W, num_classes)`` float32 logits.

    Raises:
        ValueError: for an unknown backbone or an option that does not apply to it.
        FileNotFoundError: if ``backbone_weights`` does not exist.
    """
    shape = blocks.check_common(num_classes, input_shape, "deeplabv3plus")
    blocks.check_positive(
        "deeplabv3plus",
        aspp_filters=aspp_filters,
        low_level_filters=low_level_filters,
        decoder_filters=decoder_filters,
    )
    blocks.check_rate("deeplabv3plus", "dropout", dropout)
    if backbone not in BACKBONES:
        raise ValueError(f"deeplabv3plus: unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    if backbone == "small":
        if backbone_weights is not None:
            raise ValueError(
                "deeplabv3plus: backbone_weights needs a keras.applications backbone "
                f"({', '.join(KERAS_BACKBONES)}), got backbone='small'"
            )
        width = 32 if width is None else width
        blocks_per_stage = 2 if blocks_per_stage is None else blocks_per_stage
        blocks.check_positive("deeplabv3plus", width=width, blocks_per_stage=blocks_per_stage)
    else:
        for key, value in (("width", width), ("blocks_per_stage", blocks_per_stage)):
            if value is not None:
                raise ValueError(f"deeplabv3plus: {key} applies to backbone='small' only, got backbone={backbone!r}")
        if backbone_weights is not None and not os.path.isfile(backbone_weights):
            raise FileNotFoundError(f"deeplabv3plus: backbone_weights {backbone_weights} does not exist")

    inputs = keras.Input(shape, name="image")
    if backbone == "small":
        low_level, high_level = small_backbone(inputs, width, blocks_per_stage)
    else:
        low_level, high_level = keras_backbone(inputs, backbone, backbone_weights)

    x = aspp(high_level, aspp_filters, dropout)
    x = ResizeLike("bilinear", name="decoder_upsample")([x, low_level])
    low = blocks.conv_bn_relu(low_level, low_level_filters, "decoder_low_proj", kernel_size=1)
    x = keras.layers.Concatenate(name="decoder_concat")([x, low])
    x = blocks.conv_bn_relu(x, decoder_filters, "decoder_1")
    x = blocks.conv_bn_relu(x, decoder_filters, "decoder_2")
    # Classify at stride 4, then upsample the few logit channels, not the features.
    x = keras.layers.Conv2D(num_classes, 1, name="classifier")(x)
    x = ResizeLike("bilinear", name="upsample_to_input")([x, inputs])
    outputs = keras.layers.Activation("linear", dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name="deeplabv3plus")
