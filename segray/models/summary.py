"""Sizes and costs of models: parameters, forward FLOPs, a printable summary."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import keras

from segray.models.registry import available, build, default_options


def count_params(model: keras.Model) -> int:
    """All weights of ``model``, trainable or not (batch-norm statistics included)."""
    return int(model.count_params())


def _leaf_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _size(shape: tuple[int | None, ...], layer: keras.layers.Layer) -> int:
    """Elements per image of ``shape`` (batch dimension left out)."""
    if any(n is None for n in shape[1:]):
        raise ValueError(
            f"layer {layer.name} has shape {shape}: FLOPs need a model built with a static input size"
        )
    return math.prod(shape[1:])


def layer_flops(layer: keras.layers.Layer) -> int:
    """Forward FLOPs per image of one layer: 2 per multiply-add, 1 per bias add.

    Counts ``Conv1D/2D/3D``, ``Conv2DTranspose``, ``DepthwiseConv2D``,
    ``SeparableConv2D`` and ``Dense``; every other layer counts 0. The layer
    must have been called once, on a tensor of static size.
    """
    if isinstance(layer, keras.layers.SeparableConv2D):
        out = _size(layer.output.shape, layer)
        out_pixels = out // layer.filters
        depthwise = out_pixels * math.prod(layer.depthwise_kernel.shape)
        pointwise = out * layer.pointwise_kernel.shape[2]
        bias = out if layer.use_bias else 0
        return 2 * (depthwise + pointwise) + bias
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        out = _size(layer.output.shape, layer)
        # Each output channel reads kh x kw inputs of a single input channel.
        macs = out * math.prod(layer.kernel.shape[:2])
        return 2 * macs + (out if layer.use_bias else 0)
    if isinstance(layer, (keras.layers.Conv2DTranspose, keras.layers.Conv1DTranspose, keras.layers.Conv3DTranspose)):
        # Every input element is scattered through the whole kernel for its channel.
        in_size = _size(layer.input.shape, layer)
        out = _size(layer.output.shape, layer)
        macs = in_size * math.prod(layer.kernel.shape) // layer.kernel.shape[-1]
        return 2 * macs + (out if layer.use_bias else 0)
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)):
        out = _size(layer.output.shape, layer)
        # kernel is (*window, C_in / groups, C_out): MACs per output element = its size / C_out.
        macs = out * math.prod(layer.kernel.shape) // layer.kernel.shape[-1]
        return 2 * macs + (out if layer.use_bias else 0)
    if isinstance(layer, keras.layers.Dense):
        rows = _size(layer.input.shape, layer) // layer.kernel.shape[0]
        macs = rows * math.prod(layer.kernel.shape)
        return 2 * macs + (rows * layer.units if layer.use_bias else 0)
    return 0


def model_flops(model: keras.Model) -> int:
    """Forward FLOPs per image of a model built with a static input size.

    Sums ``layer_flops`` over every layer (nested models included). Element-wise
    layers (batch norm, activations, pooling, adds, resizes) are left out; in
    these conv nets they are a few percent of the total.

    Raises:
        ValueError: a counted layer's size is not static.
    """
    return sum(layer_flops(layer) for layer in _leaf_layers(model))


def _square(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def flops_per_image(
    name: str,
    size: int | tuple[int, int] = (256, 256),
    num_classes: int = 2,
    **options: Any,
) -> int:
    """Forward FLOPs for one ``size`` RGB image through model ``name``.

    A multiply-add counts as 2 FLOPs (see ``model_flops`` for what is counted).
    Training costs about 3x this (forward, then gradients of inputs and weights).

    Args:
        name: a name from ``available()``.
        size: ``(height, width)``, or one int for a square.
        num_classes: output channels.
        **options: builder options, as for ``build``.
    """
    height, width = _square(size)
    return model_flops(build(name, num_classes, (height, width, 3), **options))


def describe(
    name: str | None = None,
    size: int | tuple[int, int] = (256, 256),
    num_classes: int = 2,
    **options: Any,
) -> str:
    """A printable summary.

    Args:
        name: a model name; ``None`` gives a table of every model and its
            parameter count (default options).
        size: ``(height, width)`` for the FLOPs of a named model.
        num_classes: output channels of the models described.
        **options: builder options of the named model (defaults otherwise).

    Returns:
        Text without a trailing newline.

    Raises:
        ValueError: unknown model or option, or options without a name.
    """
    if name is None:
        if options:
            raise ValueError(f"options {', '.join(sorted(options))} need a model name")
        rows = [(n, count_params(build(n, num_classes))) for n in available()]
        name_width = max(len("model"), *(len(n) for n, _ in rows))
        lines = [f"{'model':<{name_width}}  {'parameters':>12}"]
        lines += [f"{n:<{name_width}}  {p:>12,}" for n, p in rows]
        lines.append(f"({num_classes} classes, default options; `segray models NAME` for FLOPs)")
        return "\n".join(lines)

    height, width = _square(size)
    model = build(name, num_classes, (height, width, 3), **options)
    flops = model_flops(model)
    shown = ", ".join(f"{k}={v!r}" for k, v in {**default_options(name), **options}.items())
    return "\n".join(
        [
            f"{name}",
            f"  parameters:       {count_params(model):,}",
            f"  input:            {height}x{width}x3, {num_classes} classes",
            f"  forward FLOPs:    {flops:,} per image ({flops / 1e9:.2f} GFLOPs)",
            f"  training FLOPs:   ~{3 * flops / 1e9:.2f} GFLOPs per image (3x forward)",
            f"  options:          {shown}",
        ]
    )
