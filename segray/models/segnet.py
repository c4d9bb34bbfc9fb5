"""SegNet (Badrinarayanan et al., 2017).

A VGG-style encoder whose max-pools record where each maximum came from, and
a mirrored decoder that upsamples by putting values back at those positions
(``MaxUnpooling2D``) and then densifies the sparse maps with convolutions. No
transposed convolutions, no interpolation, and no skip features are carried
over: only the indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from segray.models import blocks
from segray.models.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D


def stage_layout(depth: int, width: int, convs_per_stage: int | None) -> list[tuple[int, int]]:
    """``(filters, convs)`` per encoder stage.

    With ``depth=5, width=64`` and no ``convs_per_stage`` this is VGG16's
    13-conv layout: 64x2, 128x2, 256x3, 512x3, 512x3.
    """
    layout = []
    for stage in range(depth):
        filters = width * 2 ** min(stage, 3)
        convs = convs_per_stage if convs_per_stage is not None else (2 if stage < 2 else 3)
        layout.append((filters, convs))
    return layout


def build_segnet(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    *,
    depth: int = 5,
    width: int = 64,
    convs_per_stage: int | None = None,
) -> keras.Model:
    """Builds a SegNet that outputs per-pixel logits at the input's size.

    Pools use ``SAME`` padding and each unpool restores the exact size of the
    tensor its pool read, so any input size works.

    Args:
        num_classes: number of output channels (logits, no softmax).
        input_shape: ``(H, W, C)``; ``H`` and ``W`` may be ``None``.
        depth: number of encoder stages (each ends in a 2x max-pool).
        width: filters of the first stage; doubled per stage up to ``8 * width``.
        convs_per_stage: convs in every stage; ``None`` follows VGG16
            (2, 2, 3, 3, 3, ...).

    Returns:
        A ``keras.Model`` named ``segnet`` mapping ``(B, H, W, C)`` images to
        ``(B, H, W, num_classes)`` float32 logits.
    """
    shape = blocks.check_common(num_classes, input_shape, "segnet")
    blocks.check_positive("segnet", depth=depth, width=width)
    if convs_per_stage is not None:
        blocks.check_positive("segnet", convs_per_stage=convs_per_stage)
    layout = stage_layout(depth, width, convs_per_stage)

    inputs = keras.Input(shape, name="image")
    x = inputs
    pooled_from, argmaxes = [], []
    for stage, (filters, convs) in enumerate(layout, start=1):
        for i in range(convs):
            x = blocks.conv_bn_relu(x, filters, f"enc{stage}_{i + 1}")
        pooled_from.append(x)
        x, argmax = MaxPoolingWithArgmax2D(2, name=f"pool{stage}")(x)
        argmaxes.append(argmax)

    for stage in reversed(range(depth)):
        filters, convs = layout[stage]
        x = MaxUnpooling2D(name=f"unpool{stage + 1}")([x, argmaxes[stage], pooled_from[stage]])
        # The last conv of a stage narrows to the width of the stage above,
        # whose recorded indices the next unpool scatters with.
        out_filters = layout[stage - 1][0] if stage > 0 else filters
        for i in range(convs):
            x = blocks.conv_bn_relu(x, out_filters if i == convs - 1 else filters, f"dec{stage + 1}_{i + 1}")

    outputs = blocks.logits_head(x, num_classes)
    return keras.Model(inputs, outputs, name="segnet")
