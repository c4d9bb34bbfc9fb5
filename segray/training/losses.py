"""Segmentation losses that mask ``ignore_index`` pixels and survive mixed precision.

Losses are computed in float32 whatever the logits' dtype (a float16 softmax
over many pixels underflows). The cross-entropy returns a (sum, weight) pair
rather than a mean, so a distributed step can divide by the weight summed over
all replicas: averaging per-replica means would weight a replica whose batch
is mostly ignored pixels like any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import tensorflow as tf

__all__ = [
    "class_weights_from_frequency",
    "masked_cross_entropy",
    "present_class_dice_loss",
    "truth_counts",
    "soft_dice_loss",
    "soft_dice_sums",
]


def _labels_and_mask(labels: tf.Tensor, logits: tf.Tensor, ignore_index: int | None) -> tuple[tf.Tensor, tf.Tensor]:
    """Labels ``(B, H, W)`` int32 with ignored pixels set to 0, and the keep mask."""
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank is not None and labels.shape.rank == logits.shape.rank:
        labels = tf.squeeze(labels, axis=-1)  # (B, H, W, 1) masks as Keras loaders give them
    labels = tf.cast(labels, tf.int32)
    if ignore_index is None:
        return labels, tf.ones_like(labels, dtype=tf.bool)
    keep = tf.not_equal(labels, ignore_index)
    # The loss op rejects (CPU) or NaNs (GPU) an out-of-range label, so ignored
    # pixels get a harmless class 0 before it and are masked out after.
    return tf.where(keep, labels, 0), keep


def masked_cross_entropy(
    labels: tf.Tensor,
    logits: tf.Tensor,
    class_weights: tf.Tensor | Sequence[float] | np.ndarray | None = None,
    ignore_index: int | None = 255,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Sum of (weighted) per-pixel softmax cross-entropy, and the sum of weights.

    Args:
        labels: Integer labels ``(B, H, W)`` or ``(B, H, W, 1)``.
        logits: Unnormalised scores ``(B, H, W, C)``, any float dtype.
        class_weights: Optional ``(C,)`` weights; a pixel weighs
            ``class_weights[label]``. ``None`` weighs every pixel 1.
        ignore_index: Label of pixels that contribute nothing (``None``: none).

    Returns:
        ``(loss_sum, weight_sum)``, float32 scalars. The mean loss is
        ``loss_sum / weight_sum`` with both summed over replicas first; when
        every pixel is ignored both are 0 and the division is the caller's.
    """
    with tf.name_scope("masked_cross_entropy"):
        logits = tf.cast(logits, tf.float32)
        safe_labels, keep = _labels_and_mask(labels, logits, ignore_index)
        per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
        weights = tf.cast(keep, tf.float32)
        if class_weights is not None:
            table = tf.cast(tf.convert_to_tensor(class_weights), tf.float32)
            weights = weights * tf.gather(table, safe_labels)
        # where, not a product alone: a non-finite loss on an ignored pixel
        # (e.g. inf logits in padding) must not leak into the sum as NaN.
        loss_sum = tf.reduce_sum(tf.where(keep, per_pixel * weights, 0.0))
        return loss_sum, tf.reduce_sum(weights)


def soft_dice_sums(
    labels: tf.Tensor,
    logits: tf.Tensor,
    num_classes: int,
    ignore_index: int | None = 255,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-class soft-Dice intersection and denominator over counted pixels.

    Both are sums over pixels, so replicas can add them before forming Dice
    (``soft_dice_loss`` forms it from one replica's batch).

    Args:
        labels: Integer labels ``(B, H, W)`` or ``(B, H, W, 1)``.
        logits: Unnormalised scores ``(B, H, W, C)``, any float dtype.
        num_classes: Number of classes ``C``.
        ignore_index: Label of pixels left out.

    Returns:
        ``(intersection, denominator)``, float32 ``(C,)``: ``sum(p * y)`` and
        ``sum(p) + sum(y)`` with ``p`` the softmax and ``y`` the one-hot labels.
    """
    logits = tf.cast(logits, tf.float32)
    safe_labels, keep = _labels_and_mask(labels, logits, ignore_index)
    keep = tf.cast(keep, tf.float32)[..., tf.newaxis]
    probs = tf.nn.softmax(logits, axis=-1) * keep
    onehot = tf.one_hot(safe_labels, num_classes, dtype=tf.float32) * keep
    axes = tf.range(tf.rank(probs) - 1)  # every axis but the class axis
    intersection = tf.reduce_sum(probs * onehot, axis=axes)
    denominator = tf.reduce_sum(probs, axis=axes) + tf.reduce_sum(onehot, axis=axes)
    return intersection, denominator


def truth_counts(labels: tf.Tensor, num_classes: int, ignore_index: int | None = 255) -> tf.Tensor:
    """Counted pixels of each class in ``labels``: float32 ``(C,)``, summable over replicas."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    if ignore_index is not None:
        labels = tf.boolean_mask(labels, tf.not_equal(labels, ignore_index))
    return tf.cast(tf.math.bincount(labels, minlength=num_classes, maxlength=num_classes), tf.float32)


def present_class_dice_loss(intersection: tf.Tensor, denominator: tf.Tensor, truth: tf.Tensor, smooth: float = 1.0) -> tf.Tensor:
    """``1 - mean of (2 I + smooth) / (D + smooth)`` over the classes present in the batch's truth.

    nnU-Net's batch Dice: sums over the whole (global) batch, then a mean
    over the classes that have truth pixels in it, so a class the batch
    lacks neither scores a free 1 nor pulls towards predicting nothing.
    Every argument is a ``(C,)`` sum over the batch (``soft_dice_sums``,
    ``truth_counts``); with no class present the loss is 0.
    """
    present = tf.cast(truth > 0, tf.float32)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return tf.reduce_sum((1.0 - dice) * present) / tf.maximum(tf.reduce_sum(present), 1.0)


def soft_dice_loss(
    labels: tf.Tensor,
    logits: tf.Tensor,
    num_classes: int,
    ignore_index: int | None = 255,
    smooth: float = 1.0,
) -> tf.Tensor:
    """``1 - mean over classes of (2 I + smooth) / (D + smooth)``, a float32 scalar.

    Sums run over the whole batch. A class absent from truth with little
    predicted mass scores close to 1 (``smooth`` keeps 0/0 away), so absent
    classes neither NaN nor dominate the loss.

    Args:
        labels: Integer labels ``(B, H, W)`` or ``(B, H, W, 1)``.
        logits: Unnormalised scores ``(B, H, W, C)``, any float dtype.
        num_classes: Number of classes ``C``.
        ignore_index: Label of pixels left out.
        smooth: Added to numerator and denominator; must be positive.
    """
    if smooth <= 0:
        raise ValueError(f"smooth must be positive (it keeps 0/0 out of Dice), got {smooth}")
    with tf.name_scope("soft_dice_loss"):
        intersection, denominator = soft_dice_sums(labels, logits, num_classes, ignore_index)
        dice = (2.0 * intersection + smooth) / (denominator + smooth)
        return 1.0 - tf.reduce_mean(dice)


def class_weights_from_frequency(freq: Sequence[float] | npt.ArrayLike) -> np.ndarray:
    """'auto' class weights: inverse square root of pixel frequency.

    Normalised so the frequency-weighted mean weight is 1, which keeps the
    loss scale (and so the learning rate) comparable to unweighted training.

    A class with frequency 0 gets the largest weight of the others, not 0:
    frequencies are usually estimated from a sample, and a class the sample
    missed is rare rather than impossible; weight 0 would silently drop its
    pixels from the loss when they do appear.

    Args:
        freq: Per-class pixel fractions ``(C,)`` (or raw pixel counts: only the
            proportions matter).

    Returns:
        float64 ``(C,)`` weights.

    Raises:
        ValueError: A frequency is negative or not finite, or all are 0.
    """
    f = np.asarray(freq, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"expected one frequency per class, got shape {f.shape}")
    if not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ValueError(f"frequencies must be finite and non-negative, got {f.tolist()}")
    if not np.any(f > 0):
        raise ValueError(f"at least one class needs a positive frequency, got {f.tolist()}")
    f = f / f.sum()
    seen = f > 0
    weights = np.zeros_like(f)
    weights[seen] = 1.0 / np.sqrt(f[seen])
    weights /= np.sum(f * weights)  # sum(f * w) == 1 after this
    weights[~seen] = weights[seen].max()
    return weights


def deep_supervision_weights(levels: int) -> list[float]:
    """Loss weights of the full-size output and each lower level: halving per level, summing to 1 (nnU-Net)."""
    raw = [0.5**k for k in range(levels + 1)]
    return [w / sum(raw) for w in raw]


class TrainingLoss:
    """The loss of one replica's batch in a data-parallel step: the one owner of how the step's loss is made.

    Cross-entropy is divided by the weight of the *global* batch (Keras' optimizer
    sums gradients over replicas); ``ce+dice`` adds soft Dice over the global
    batch and its present classes (nnU-Net's batch Dice); with deep supervision
    each lower output adds its loss against nearest-downsampled labels, weighted
    by ``deep_supervision_weights``. Call it inside ``strategy.run``.

    Args:
        num_classes: C.
        class_weights: ``(C,)`` float32 weights, or None.
        loss: ``ce`` or ``ce+dice``.
        dice_weight: the Dice term's weight.
        supervised_levels: lower outputs the model gives besides its logits (0: none).
        ignore_index: the label never counted.
    """

    def __init__(
        self,
        num_classes: int,
        class_weights: tf.Tensor | None,
        loss: str = "ce",
        dice_weight: float = 1.0,
        supervised_levels: int = 0,
        ignore_index: int | None = 255,
    ) -> None:
        self.num_classes, self.class_weights, self.loss, self.dice_weight = num_classes, class_weights, loss, dice_weight
        self.ignore_index = ignore_index
        self.level_weights = deep_supervision_weights(supervised_levels) if supervised_levels else []

    def _one(self, labels: tf.Tensor, logits: tf.Tensor, replica_ctx) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        sum_over = tf.distribute.ReduceOp.SUM
        loss_sum, weight_sum = masked_cross_entropy(labels, logits, self.class_weights, self.ignore_index)
        global_weight = replica_ctx.all_reduce(sum_over, weight_sum)
        loss = loss_sum / tf.maximum(global_weight, 1.0)
        if self.loss == "ce+dice":
            inter, denom = soft_dice_sums(labels, logits, self.num_classes, self.ignore_index)
            truth = truth_counts(labels, self.num_classes, self.ignore_index)
            inter = replica_ctx.all_reduce(sum_over, inter)
            denom = replica_ctx.all_reduce(sum_over, denom)
            truth = replica_ctx.all_reduce(sum_over, truth)
            loss = loss + self.dice_weight * present_class_dice_loss(inter, denom, truth) / replica_ctx.num_replicas_in_sync
        return loss, loss_sum, weight_sum

    def __call__(self, labels: tf.Tensor, outputs) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(loss, loss_sum, weight_sum, logits)``: the loss to differentiate, the full-size CE sums, and the full-size logits.

        Args:
            labels: ``(B, H, W)`` int32.
            outputs: the model's ``(B, H, W, C)`` logits, or with deep
                supervision the list ``[logits, logits at 1/2, at 1/4 ...]``.
        """
        replica_ctx = tf.distribute.get_replica_context()
        logits = outputs[0] if self.level_weights else outputs
        loss, loss_sum, weight_sum = self._one(labels, logits, replica_ctx)
        if self.level_weights:
            loss = self.level_weights[0] * loss
            for level, (weight, aux) in enumerate(zip(self.level_weights[1:], outputs[1:]), start=1):
                # Nearest downsampling of the labels (every 2**level-th pixel), as nnU-Net's.
                step = 2**level
                loss = loss + weight * self._one(labels[:, ::step, ::step], aux, replica_ctx)[0]
        return loss, loss_sum, weight_sum, logits
