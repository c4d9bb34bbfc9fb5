"""A trained model rebuilt from Keras' own layers and ops, so it loads where segray is not installed.

segray's models use four custom layers. Each has an exact equivalent in
standard Keras layers and ``keras.ops`` on inputs whose height and width are
divisible by the model's ``export_multiple`` (every pooled size is then an
exact power-of-two fraction):

- ``DivisibleSizeCheck``: a pass-through; dropped (the exported model pads,
  or the model card states the rule).
- ``ResizeLike`` (DeepLab): a 1x1 map resized to any size is a broadcast; a
  map 1/f the size of its reference is upsampled by f with half-pixel
  centres, as ``tf.image.resize`` does, in elementwise ops: each output row
  mixes its source row with the row above or below (the edge row repeated)
  by weights that depend on the row's position modulo f; then the columns.
  (``UpSampling2D(f, "bilinear")`` computes the same, but Keras 3.15 cannot
  trace it when height and width are unknown, as they are here.)
- ``MaxPoolingWithArgmax2D`` / ``MaxUnpooling2D`` (SegNet): the flat argmax
  index becomes a full-size mask of the pixel each maximum came from. Where
  several pixels of a window hold the maximum (common after a ReLU: zeros),
  TensorFlow's kernel keeps the first in raster order; so does the mask.

The rebuilt model shares the loaded model's layers (and weights); no value is
copied or recomputed. It saves as a ``.keras`` file that
``keras.models.load_model(path, safe_mode=True)`` reads without segray.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from segray.models import DivisibleSizeCheck, MaxPoolingWithArgmax2D, MaxUnpooling2D, ResizeLike

# Side of the square input the model is probed at to read the size ratio of
# each resize (any multiple of every stride works).
_PROBE = 256


def _probe_ratios(model: keras.Model) -> dict[str, int]:
    """Layer name -> reference size / input size of each ``ResizeLike`` (0 for a 1x1 broadcast)."""
    ratios: dict[str, int] = {}

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(layer, ResizeLike):
            x, reference = args[0]
            h, ref_h = x.shape[1], reference.shape[1]
            w, ref_w = x.shape[2], reference.shape[2]
            if (h, w) == (1, 1):
                ratios[layer.name] = 0
            elif ref_h % h or ref_w % w or ref_h // h != ref_w // w:
                raise ValueError(
                    f"{model.name}: layer {layer.name} resizes {h}x{w} to {ref_h}x{ref_w} at a {_PROBE}x{_PROBE} input, "
                    "not by one integer factor; it has no standard-layer equivalent"
                )
            else:
                ratios[layer.name] = ref_h // h
        return layer(*args, **kwargs)

    probe = keras.Input((_PROBE, _PROBE, model.input_shape[-1]))
    keras.models.clone_model(model, input_tensors=probe, clone_function=lambda layer: layer, call_function=call)
    return ratios


def export_multiple(model: keras.Model) -> int:
    """What height and width must be divisible by for the rebuilt model to equal the original.

    The size checks' multiple, 2 per argmax pool, and the largest stride a
    resize undoes (a DeepLab's output stride).
    """
    multiple = 1
    pools = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):  # noqa: SLF001 - Keras' own walk
        if isinstance(layer, DivisibleSizeCheck):
            multiple = math.lcm(multiple, layer.multiple)
        elif isinstance(layer, MaxPoolingWithArgmax2D):
            if layer.pool_size != 2 or layer.strides != 2:
                raise ValueError(f"{model.name}: layer {layer.name} pools {layer.pool_size}x{layer.pool_size} by {layer.strides}; only 2x2 by 2 is exported")
            pools += 1
    multiple = math.lcm(multiple, 2**pools)
    if any(isinstance(layer, ResizeLike) for layer in model.layers):
        ratios = _probe_ratios(model)
        # The decoder undoes the output stride in one or more resizes; their product is it.
        product = int(np.prod([r for r in ratios.values() if r > 1] or [1]))
        multiple = math.lcm(multiple, product)
    return multiple


def _first_max_mask(x: Any) -> tuple[Any, Any]:
    """(2x2 max-pooled x, bool mask of the first maximum of each window in raster order)."""
    pooled = ops.max_pool(x, pool_size=2, strides=2, padding="valid")
    up = ops.repeat(ops.repeat(pooled, 2, axis=1), 2, axis=2)
    # Row and column of every pixel from cumulative sums (the sizes are only known at run time).
    ones = ops.ones_like(x[..., :1])
    row = ops.cumsum(ones, axis=1) - 1.0
    col = ops.cumsum(ones, axis=2) - 1.0
    position = 2.0 * ops.mod(row, 2.0) + ops.mod(col, 2.0)  # 0..3 within the window, raster order
    candidate = ops.where(ops.equal(x, up), position, 4.0)
    first = -ops.max_pool(-candidate, pool_size=2, strides=2, padding="valid")
    chosen = ops.equal(candidate, ops.repeat(ops.repeat(first, 2, axis=1), 2, axis=2))
    return pooled, chosen


def _shifted(x: Any, axis: int, step: int) -> Any:
    """``x`` moved one row (axis 1) or column (axis 2) back (step -1) or forward (+1), the edge repeated."""
    def cut(start: int | None, stop: int | None) -> Any:
        return x[:, start:stop] if axis == 1 else x[:, :, start:stop]

    if step < 0:
        return ops.concatenate([cut(None, 1), cut(None, -1)], axis=axis)
    return ops.concatenate([cut(1, None), cut(-1, None)], axis=axis)


def _upsample_bilinear(x: Any, factor: int) -> Any:
    """``tf.image.resize(x, (H * factor, W * factor), "bilinear")`` (half-pixel centres) for dynamic H and W."""
    for axis in (1, 2):
        spread = ops.repeat(x, factor, axis=axis)
        before = ops.repeat(_shifted(x, axis, -1), factor, axis=axis)
        after = ops.repeat(_shifted(x, axis, 1), factor, axis=axis)
        index = ops.cumsum(ops.ones_like(spread[..., :1]), axis=axis) - 1.0
        # Source coordinate minus the source pixel's centre, in source pixels: (j + 0.5) / f - 0.5.
        offset = (ops.mod(index, float(factor)) + 0.5) / float(factor) - 0.5
        x = (1.0 - ops.abs(offset)) * spread + ops.relu(-offset) * before + ops.relu(offset) * after
    return x


def portable_core(model: keras.Model) -> keras.Model:
    """``model`` with its segray layers replaced by standard layers and ``keras.ops``.

    Same input and output as ``model`` ((B, H, W, 3) normalised float32 ->
    (B, H, W, C) logits) on sides divisible by ``export_multiple(model)``.

    Raises:
        ValueError: the model holds a layer with no standard equivalent.
    """
    ratios = _probe_ratios(model) if any(isinstance(layer, ResizeLike) for layer in model.layers) else {}

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(layer, DivisibleSizeCheck):
            return args[0]
        if isinstance(layer, ResizeLike):
            x, reference = args[0]
            factor = ratios[layer.name]
            if factor == 0:
                return ops.add(x, ops.zeros_like(reference[..., :1]))
            if factor == 1:
                return x
            if layer.interpolation == "nearest":
                return ops.repeat(ops.repeat(x, factor, axis=1), factor, axis=2)
            return _upsample_bilinear(x, factor)
        if isinstance(layer, MaxPoolingWithArgmax2D):
            return _first_max_mask(args[0])
        if isinstance(layer, MaxUnpooling2D):
            values, chosen, _ = args[0]
            spread = ops.repeat(ops.repeat(values, 2, axis=1), 2, axis=2)
            return ops.where(chosen, spread, ops.zeros_like(spread))
        if type(layer).__module__.startswith("segray"):
            raise ValueError(f"{model.name}: layer {layer.name} ({type(layer).__name__}) has no standard-layer equivalent for export")
        return layer(*args, **kwargs)

    core = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    if len(core.inputs) != 1 or len(core.outputs) != 1:
        raise ValueError(f"{model.name}: expected one input and one output, got {len(core.inputs)} and {len(core.outputs)}")
    return keras.Model(core.inputs[0], core.outputs[0], name=f"{model.name}_portable")


def portable_model(core: keras.Model, mean: tuple[float, ...], std: tuple[float, ...]) -> keras.Model:
    """The exported Keras model: uint8 RGB ``(N, H, W, 3)`` in, ``class_ids``, ``probabilities`` and ``logits`` out.

    The run's normalisation is built in; H and W must be divisible by the
    model's ``export_multiple`` (the model card says which).
    """
    images = keras.Input((None, None, 3), dtype="uint8", name="images")
    x = (ops.cast(images, "float32") - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    logits = ops.cast(core(x), "float32")
    outputs = {
        "class_ids": ops.cast(ops.argmax(logits, axis=-1), "uint8"),
        "probabilities": ops.softmax(logits, axis=-1),
        "logits": logits,
    }
    return keras.Model(images, outputs, name="segray_export")
