"""U-Net (Ronneberger et al., 2015) with the usual later improvements.

Differences from the 2015 paper: batch norm after every conv, ``same``
padding (the output has the input's size, no cropping of skips), a
configurable depth and base width, optional residual blocks (as in ResUNet),
optional additive attention gates on the skips (Oktay et al., 2018, "Attention
U-Net"), and dropout at the bottleneck.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from segray.models import blocks
from segray.models.layers import DivisibleSizeCheck, check_static_size


def attention_gate(skip: Any, gate: Any, inter_filters: int, name: str) -> Any:
    """Scales each skip pixel by a weight in (0, 1) computed from skip and decoder.

    ``gate`` is the upsampled decoder feature at the skip's resolution (as most
    Attention U-Net implementations do), which keeps the gate free of resampling.

    Args:
        skip: encoder feature, ``(B, H, W, Fs)``.
        gate: decoder feature, ``(B, H, W, Fg)``.
        inter_filters: width of the intermediate 1x1 projections.
        name: prefix of the layer names.

    Returns:
        ``skip * alpha`` with ``alpha`` of shape ``(B, H, W, 1)``.
    """
    theta = keras.layers.Conv2D(inter_filters, 1, use_bias=False, name=f"{name}_skip_proj")(skip)
    phi = keras.layers.Conv2D(inter_filters, 1, name=f"{name}_gate_proj")(gate)
    f = keras.layers.Add(name=f"{name}_add")([theta, phi])
    f = keras.layers.ReLU(name=f"{name}_relu")(f)
    alpha = keras.layers.Conv2D(1, 1, name=f"{name}_psi")(f)
    alpha = keras.layers.BatchNormalization(momentum=blocks.BN_MOMENTUM, name=f"{name}_psi_bn")(alpha)
    alpha = keras.layers.Activation("sigmoid", name=f"{name}_alpha")(alpha)
    return keras.layers.Multiply(name=f"{name}_scale")([skip, alpha])


def input_multiple(*, depth: int = 4, **_: Any) -> int:
    """What a U-Net of ``depth`` poolings needs height and width divisible by."""
    return 2**depth


def decoder_levels(*, depth: int = 4, **_: Any) -> int:
    """The decoder levels below full size a U-Net of ``depth`` has (deep supervision can train heads on them)."""
    return depth - 1


def build_unet(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    *,
    depth: int = 4,
    width: int = 32,
    residual: bool = False,
    attention: bool = False,
    dropout: float = 0.5,
) -> keras.Model:
    """Builds a U-Net that outputs per-pixel logits at the input's size.

    Args:
        num_classes: number of output channels (logits, no softmax).
        input_shape: ``(H, W, C)``; ``H`` and ``W`` may be ``None``.
        depth: number of 2x poolings; sides must be divisible by ``2**depth``.
        width: filters of the first level; each level below doubles it.
        residual: use ResNet basic blocks instead of two plain convs per level.
        attention: gate each skip connection with an additive attention gate.
        dropout: dropout rate at the bottleneck (0 turns it off).

    Returns:
        A ``keras.Model`` named ``unet`` mapping ``(B, H, W, C)`` images to
        ``(B, H, W, num_classes)`` float32 logits.

    Raises:
        ValueError: for a bad option, or a static ``H`` or ``W`` that is not
            divisible by ``2**depth`` (the message names the nearest valid
            sizes). A dynamic input of a bad size fails the same way when the
            model is called.
    """
    shape = blocks.check_common(num_classes, input_shape, "unet")
    blocks.check_positive("unet", depth=depth, width=width)
    blocks.check_bool("unet", residual=residual, attention=attention)
    blocks.check_rate("unet", "dropout", dropout)
    multiple = input_multiple(depth=depth)
    label = f"unet (depth {depth})"
    check_static_size(label, shape, multiple)
    block = blocks.residual_block if residual else blocks.double_conv

    inputs = keras.Input(shape, name="image")
    x = inputs
    if shape[0] is None or shape[1] is None:
        x = DivisibleSizeCheck(multiple, label, name="size_check")(x)

    skips = []
    for level in range(depth):
        x = block(x, width * 2**level, f"enc{level + 1}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{level + 1}")(x)

    x = block(x, width * 2**depth, "bottleneck")
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="bottleneck_dropout")(x)

    for level in reversed(range(depth)):
        filters = width * 2**level
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{level + 1}")(x)
        skip = skips[level]
        if attention:
            skip = attention_gate(skip, x, max(filters // 2, 1), f"att{level + 1}")
        x = keras.layers.Concatenate(name=f"concat{level + 1}")([x, skip])
        x = block(x, filters, f"dec{level + 1}")

    outputs = blocks.logits_head(x, num_classes)
    return keras.Model(inputs, outputs, name="unet")


def decoder_outputs(model: keras.Model) -> dict[int, Any]:
    """The U-Net's decoder features by level (1: full size, k: 1/2**(k-1) of it), from its layer names."""
    found = {}
    for layer in model.layers:
        name = layer.name
        for suffix in ("_2_relu", "_out"):  # double_conv, residual_block
            if name.startswith("dec") and name.endswith(suffix) and name[3 : -len(suffix)].isdigit():
                found[int(name[3 : -len(suffix)])] = layer.output
    return found


def with_deep_supervision(model: keras.Model, num_classes: int, levels: int = 2) -> keras.Model:
    """The training model of deep supervision: ``model``'s logits plus logits at ``levels`` lower decoder levels.

    Each extra output is a 1x1 conv of a decoder level's features, at 1/2,
    1/4, ... of the input's size (nnU-Net's deep supervision). The model shares
    ``model``'s layers, so training it trains ``model``; the extra heads are
    for training only and ``model`` stays the one that is saved and predicts.

    Args:
        model: a U-Net from ``build_unet``.
        num_classes: its output channels.
        levels: lower decoder levels supervised; at most the U-Net's depth - 1.

    Returns:
        A ``keras.Model`` with outputs ``[logits, logits at 1/2, logits at 1/4, ...]``, float32.

    Raises:
        ValueError: ``model`` has no U-Net decoder, or fewer than ``levels`` lower levels.
    """
    decoder = decoder_outputs(model) if model.name == "unet" else {}
    wanted = list(range(2, 2 + levels))
    missing = [k for k in wanted if k not in decoder]
    if not decoder or missing:
        raise ValueError(
            f"deep supervision needs a U-Net with decoder levels {wanted} (depth {levels + 1} or more); "
            f"{model.name} has {sorted(decoder) or 'none'}"
        )
    outputs = [model.outputs[0]]
    for k in wanted:
        x = keras.layers.Conv2D(num_classes, 1, name=f"deep_supervision{k}")(decoder[k])
        outputs.append(keras.layers.Activation("linear", dtype="float32", name=f"deep_supervision{k}_logits")(x))
    return keras.Model(model.input, outputs, name=f"{model.name}_deep_supervision")

