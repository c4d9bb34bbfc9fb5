"""Writing the portable model in each format: Keras, TensorFlow SavedModel, ONNX.

All three take uint8 RGB images ``(N, H, W, 3)`` (the channel order segray's
decoder gives) and return ``class_ids`` uint8 ``(N, H, W)``,
``probabilities`` and ``logits`` float32 ``(N, H, W, C)``; the run's mean and
std are built in.

- ``keras``: ``model.keras``; H and W must be divisible by the model's
  ``multiple``.
- ``savedmodel`` and ``onnx``: any H and W. The normalised image is padded at
  the bottom and right with zeros (the mean) to the next multiple and the
  outputs cropped back, as ``segray predict`` does for a model without a
  training size.

ONNX goes through tf2onnx at the pinned ``ONNX_OPSET``: Keras 3's own
``model.export(format="onnx")`` calls the same converter on the TensorFlow
backend but exports only the model's ``call`` (no padding, no named outputs),
and tf2onnx takes the wrapped function directly.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from segray.runs import MODEL_FILE

FORMATS = ("savedmodel", "onnx", "keras")

# 17: every op the models need (Resize with half-pixel centres, Pad, ArgMax,
# Softmax on the last axis) at a version ONNX Runtime >= 1.13, TensorRT 8.6
# and OpenVINO all run; newer opsets add nothing these models use.
ONNX_OPSET = 17

INPUT_NAME = "images"
OUTPUT_NAMES = ("class_ids", "probabilities", "logits")
KERAS_FILE = MODEL_FILE  # the name a run's model has; the exported one is a different model under the same name
ONNX_FILE = "model.onnx"


def serving_function(core, mean: tuple[float, ...] | None, std: tuple[float, ...] | None, multiple: int, size: tuple[int, int] | None = None):
    """A ``tf.function`` over images of any size: normalise, pad to ``multiple``, run ``core``, crop back.

    Args:
        core: the portable model (normalised float32 in, logits out).
        mean, std: the run's normalisation; the function takes uint8
            ``(N, H, W, 3)``. Both None: it takes float32 images normalised
            already (``segray predict --backend onnxruntime``, whose decode
            tasks normalise).
        multiple: ``portable.export_multiple`` of the model.
        size: ``(H, W)`` to fix the input's height and width to (the batch
            stays free), or None for any. A fixed size lets tf2onnx fold
            TensorFlow's space-to-batch form of a dilated convolution back
            into one ``Conv`` (DeepLab's ASPP: 2.2x faster in ONNX Runtime at 64x64).

    Returns:
        The ``tf.function``; its one input is named ``images``.
    """
    import tensorflow as tf

    raw = mean is not None
    height, width = size or (None, None)
    spec = tf.TensorSpec([None, height, width, 3], tf.uint8 if raw else tf.float32, name=INPUT_NAME)
    mean_np = np.asarray(mean if raw else (0.0, 0.0, 0.0), np.float32)
    std_np = np.asarray(std if raw else (1.0, 1.0, 1.0), np.float32)

    @tf.function(input_signature=[spec])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        # Constants made inside the function: captured tensors would become extra ONNX inputs.
        x = (tf.cast(images, tf.float32) - tf.constant(mean_np)) / tf.constant(std_np) if raw else images
        shape = tf.shape(x)
        height, width = shape[1], shape[2]
        pad_h = (multiple - height % multiple) % multiple
        pad_w = (multiple - width % multiple) % multiple
        x = tf.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
        logits = tf.cast(core(x, training=False), tf.float32)[:, :height, :width, :]
        return {
            "class_ids": tf.identity(tf.cast(tf.argmax(logits, axis=-1), tf.uint8), name="class_ids"),
            "probabilities": tf.identity(tf.nn.softmax(logits, axis=-1), name="probabilities"),
            "logits": tf.identity(logits, name="logits"),
        }

    return serve


def write_keras(model, folder: str) -> str:
    path = os.path.join(folder, KERAS_FILE)
    model.save(path)
    return path


def write_savedmodel(core, mean, std, multiple: int, folder: str) -> str:
    """A SavedModel in ``folder`` whose ``serving_default`` signature is the serving function."""
    import tensorflow as tf

    module = tf.Module()
    module.core = core
    module.serve = serving_function(core, mean, std, multiple)
    tf.saved_model.save(module, folder, signatures={"serving_default": module.serve})
    return folder


def onnx_bytes(core, mean, std, multiple: int, size: tuple[int, int] | None = None) -> bytes:
    """The serving function converted with tf2onnx at ``ONNX_OPSET``; dynamic batch, height and width unless ``size``."""
    import tf2onnx

    serve = serving_function(core, mean, std, multiple, size)
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=ONNX_OPSET)
    return proto.SerializeToString()


def write_onnx(core, mean, std, multiple: int, folder: str) -> str:
    """``model.onnx`` in ``folder`` (``onnx_bytes`` of uint8 images)."""
    path = os.path.join(folder, ONNX_FILE)
    with open(path, "wb") as f:
        f.write(onnx_bytes(core, mean, std, multiple))
    return path


def check_formats(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return fmt


def describe_outputs(num_classes: int) -> dict[str, Any]:
    """The model card's description of the inputs and outputs (every format)."""
    return {
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", "H", "W", 3], "channels": "RGB"},
        "outputs": {
            "class_ids": {"dtype": "uint8", "shape": ["N", "H", "W"]},
            "probabilities": {"dtype": "float32", "shape": ["N", "H", "W", num_classes], "note": "softmax of the logits"},
            "logits": {"dtype": "float32", "shape": ["N", "H", "W", num_classes]},
        },
    }
