"""TensorFlow confusion matrix and its Keras 3 metric, for graph and replica code.

``tf_confusion_matrix`` is the in-graph twin of ``segray.metrics.confusion_matrix``:
same layout (rows truth, columns prediction), same ignore rule, int64 result.
``ConfusionMatrixMetric`` keeps the summed matrix as its only state, so
replicas, workers and evaluation shards merge by adding matrices.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

__all__ = ["ConfusionMatrixMetric", "tf_confusion_matrix"]

# One call counts into int32 bins (int32 segment sums have kernels on CPU, GPU
# and XLA; float32 would lose counts past 2**24). A single call cannot reach
# 2**31 pixels in a bin without 2**31 input pixels, which is checked; counts
# become int64 before anything sums them.
_MAX_PIXELS_PER_CALL = 2**31 - 1


def tf_confusion_matrix(
    y_true: tf.Tensor,
    y_pred: tf.Tensor,
    num_classes: int,
    ignore_index: int | None = 255,
) -> tf.Tensor:
    """Counts pixels by (truth, prediction) class, inside or outside ``tf.function``.

    Args:
        y_true: Integer truth labels, e.g. ``(B, H, W)``.
        y_pred: Integer predicted labels, same shape (``argmax`` of the logits).
        num_classes: Number of classes ``C`` (a Python int: it fixes the shape).
        ignore_index: Truth value whose pixels are never counted; ``None``
            counts every pixel.

    Returns:
        int64 tensor ``(C, C)``; ``cm[t, p]`` counts truth ``t`` predicted ``p``.

    Raises:
        ValueError: Static shapes differ.
        tf.errors.InvalidArgumentError: A counted truth value or a prediction
            lies outside ``[0, C)`` (the message gives the number of such pixels
            and the first offending truth/prediction pair), or one call holds
            2**31 pixels or more. Under XLA (``jit_compile=True``) the check is
            dropped and such pixels are simply not counted.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    with tf.name_scope("confusion_matrix"):
        y_true = tf.convert_to_tensor(y_true)
        y_pred = tf.convert_to_tensor(y_pred)
        if not y_true.shape.is_compatible_with(y_pred.shape):
            raise ValueError(f"truth has shape {y_true.shape}, prediction has shape {y_pred.shape}")
        for name, t in (("truth", y_true), ("prediction", y_pred)):
            if not (t.dtype.is_integer or t.dtype == tf.bool):
                raise TypeError(f"{name} labels must be integers, got dtype {t.dtype.name}")
        true = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        pred = tf.reshape(tf.cast(y_pred, tf.int32), [-1])

        if ignore_index is None:
            counted = tf.ones_like(true, dtype=tf.bool)
        else:
            counted = tf.not_equal(true, ignore_index)
        in_range = (true >= 0) & (true < num_classes) & (pred >= 0) & (pred < num_classes)
        bad = counted & ~in_range
        n_bad = tf.reduce_sum(tf.cast(bad, tf.int64))
        ok = tf.equal(n_bad, 0)

        def first_bad_pair() -> tf.Tensor:
            first = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int32)
            # gather, not true[first]: a strided slice wants its begin as a
            # compile-time constant, so XLA would recompile for every batch.
            return tf.stack([tf.gather(true, first), tf.gather(pred, first)])

        # The offending pair is computed only when the check fails.
        pair = tf.cond(ok, lambda: tf.zeros([2], tf.int32), first_bad_pair)
        checks = [
            tf.debugging.Assert(
                ok,
                [
                    f"labels must lie in [0, {num_classes}) (truth may also be "
                    f"ignore_index {ignore_index}); pixels outside:",
                    n_bad,
                    "first (truth, prediction):",
                    pair,
                ],
            ),
            tf.debugging.Assert(
                tf.size(true, out_type=tf.int64) <= _MAX_PIXELS_PER_CALL,
                ["one confusion_matrix call counts at most 2**31 - 1 pixels; got", tf.size(true, out_type=tf.int64)],
            ),
        ]
        with tf.control_dependencies(checks):
            cells = num_classes * num_classes
            # Ignored and invalid pixels go to one spare bin past the matrix,
            # which keeps shapes static (XLA-friendly) unlike a boolean_mask.
            index = tf.where(counted & in_range, true * num_classes + pred, cells)
            # A segment sum with a Python-int segment count: bincount's output
            # size is a tensor, which XLA refuses inside a larger step.
            counts = tf.math.unsorted_segment_sum(tf.ones_like(index), index, num_segments=cells + 1)
        return tf.reshape(tf.cast(counts[:cells], tf.int64), [num_classes, num_classes])


def _mean_iou(cm: tf.Tensor) -> tf.Tensor:
    """mIoU (float64) over classes with ``tp + fp + fn > 0``; NaN if there are none."""
    cm = tf.cast(cm, tf.float64)  # float64 holds int64 counts exactly up to 2**53
    tp = tf.linalg.diag_part(cm)
    union = tf.reduce_sum(cm, axis=0) + tf.reduce_sum(cm, axis=1) - tp
    valid = union > 0
    per_class = tf.where(valid, tp / tf.where(valid, union, 1.0), 0.0)
    # 0 / 0 is NaN: no valid class gives NaN, as segray.metrics.summary does.
    return tf.reduce_sum(per_class) / tf.reduce_sum(tf.cast(valid, tf.float64))


@keras.saving.register_keras_serializable(package="segray")
class ConfusionMatrixMetric(keras.metrics.Metric):
    """Mean IoU whose state is an int64 ``(C, C)`` confusion matrix ``total_cm``.

    Keras 3 on the TensorFlow backend accepts int64 metric variables, so
    ``total_cm`` is a Keras variable (summed on read across replicas, like
    Keras' own ``_IoUBase``). Read it to compute any other score with
    ``segray.metrics.scores``; merge metrics of different workers by adding
    their ``total_cm``.

    Args:
        num_classes: Number of classes ``C``.
        ignore_index: Truth value that is never counted (``None``: count all).
        name: Metric name shown in logs.
        dtype: dtype of ``result()``; the matrix is always int64.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        name: str = "mean_iou",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, dtype=dtype or "float32")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.total_cm = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype="int64",
            name="total_cm",
        )

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Adds a batch to the matrix.

        Args:
            y_true: Integer labels ``(B, H, W)`` or ``(B, H, W, 1)``.
            y_pred: Logits or probabilities ``(B, H, W, C)`` (any float dtype;
                argmax is taken) or integer labels ``(B, H, W)``.
            sample_weight: Not supported: counts stay integer; mark pixels to
                skip with ``ignore_index`` instead.
        """
        if sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} takes no sample_weight (its counts stay integer); "
                f"set the label of pixels to skip to ignore_index={self.ignore_index}"
            )
        y_true = tf.convert_to_tensor(y_true)
        y_pred = tf.convert_to_tensor(y_pred)
        if y_pred.dtype.is_floating:
            y_pred = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
        if y_true.shape.rank == y_pred.shape.rank + 1 and y_true.shape[-1] == 1:
            y_true = tf.squeeze(y_true, axis=-1)
        self.total_cm.assign_add(
            tf_confusion_matrix(y_true, y_pred, self.num_classes, self.ignore_index)
        )

    def result(self) -> tf.Tensor:
        """Mean IoU over the classes present in truth or prediction; NaN before any pixel."""
        return tf.cast(_mean_iou(self.total_cm.value), self.dtype)

    def reset_state(self) -> None:
        self.total_cm.assign(tf.zeros((self.num_classes, self.num_classes), tf.int64))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes, "ignore_index": self.ignore_index}
