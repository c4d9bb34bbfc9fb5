"""Masked cross-entropy, soft Dice and class weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from segray.training.losses import (
    class_weights_from_frequency,
    masked_cross_entropy,
    soft_dice_loss,
    soft_dice_sums,
)

IGNORE = 255


@pytest.fixture
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (2, 6, 5)).astype(np.uint8)
    labels[0, :2] = IGNORE
    labels[1, 3, 3] = IGNORE
    logits = rng.normal(scale=3.0, size=(2, 6, 5, 4)).astype(np.float32)
    return labels, logits


def keras_ce_on_kept(labels: np.ndarray, logits: np.ndarray) -> float:
    keep = labels != IGNORE
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    return float(ce(labels[keep].astype(np.int32), logits[keep]))


def test_cross_entropy_equals_keras_on_unmasked_pixels(batch):
    labels, logits = batch
    loss_sum, weight_sum = masked_cross_entropy(labels, logits)
    assert loss_sum.dtype == tf.float32 and loss_sum.shape == ()
    assert float(weight_sum) == (labels != IGNORE).sum()
    assert float(loss_sum) == pytest.approx(keras_ce_on_kept(labels, logits), rel=1e-5)


def test_ignored_pixels_do_not_change_cross_entropy(batch):
    labels, logits = batch
    before = masked_cross_entropy(labels, logits)
    other = logits.copy()
    other[labels == IGNORE] = np.array([1e4, -1e4, 0.0, 7.0], np.float32)  # anything at all
    after = masked_cross_entropy(labels, other)
    np.testing.assert_allclose([float(x) for x in after], [float(x) for x in before], rtol=1e-6)


def test_trailing_channel_labels_and_float16_logits(batch):
    labels, logits = batch
    ref = float(masked_cross_entropy(labels, logits.astype(np.float16).astype(np.float32))[0])
    loss_sum, _ = masked_cross_entropy(labels[..., None], tf.constant(logits, tf.float16))
    assert loss_sum.dtype == tf.float32
    assert float(loss_sum) == pytest.approx(ref, rel=1e-5)


def test_class_weights_scale_each_pixel_by_its_label_weight(batch):
    labels, logits = batch
    uniform = masked_cross_entropy(labels, logits)
    doubled = masked_cross_entropy(labels, logits, class_weights=[2.0, 2.0, 2.0, 2.0])
    assert float(doubled[0]) == pytest.approx(2 * float(uniform[0]), rel=1e-6)
    assert float(doubled[1]) == pytest.approx(2 * float(uniform[1]))

    weights = np.array([0.5, 1.0, 3.0, 0.0], np.float32)
    loss_sum, weight_sum = masked_cross_entropy(labels, logits, class_weights=weights)
    keep = labels != IGNORE
    per_pixel = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(
        labels[keep].astype(np.int32), logits[keep]
    )
    pixel_weights = weights[labels[keep]]
    assert float(loss_sum) == pytest.approx(float(np.sum(per_pixel * pixel_weights)), rel=1e-5)
    assert float(weight_sum) == pytest.approx(float(pixel_weights.sum()))


def test_all_ignored_batch_gives_zeros_and_finite_gradients():
    labels = np.full((2, 3, 3), IGNORE, np.uint8)
    logits = tf.Variable(np.random.default_rng(1).normal(size=(2, 3, 3, 5)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss_sum, weight_sum = masked_cross_entropy(labels, logits, class_weights=np.ones(5))
        dice = soft_dice_loss(labels, logits, 5)
        total = loss_sum + dice
    assert float(loss_sum) == 0.0 and float(weight_sum) == 0.0
    assert np.isfinite(float(dice))
    assert np.all(np.isfinite(tape.gradient(total, logits).numpy()))


def test_cross_entropy_in_tf_function_sums_like_replicas(batch):
    labels, logits = batch
    fn = tf.function(masked_cross_entropy)
    whole = fn(labels, logits)
    halves = [fn(labels[i : i + 1], logits[i : i + 1]) for i in range(2)]
    # Replicas add both sums; dividing the totals gives the global mean.
    assert float(whole[0]) == pytest.approx(sum(float(h[0]) for h in halves), rel=1e-6)
    assert float(whole[1]) == sum(float(h[1]) for h in halves)


def one_hot_logits(labels: np.ndarray, num_classes: int, scale: float = 50.0) -> np.ndarray:
    safe = np.where(labels == IGNORE, 0, labels)
    return (np.eye(num_classes, dtype=np.float32)[safe] * scale).astype(np.float32)


def test_dice_loss_near_zero_for_perfect_logits_and_larger_for_wrong():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, (2, 8, 8)).astype(np.uint8)
    labels[0, 0] = IGNORE
    perfect = float(soft_dice_loss(labels, one_hot_logits(labels, 3), 3))
    wrong = float(soft_dice_loss(labels, one_hot_logits((labels + 1) % 3, 3), 3))
    random = float(soft_dice_loss(labels, rng.normal(size=(2, 8, 8, 3)).astype(np.float32), 3))
    assert 0.0 <= perfect < 1e-3
    assert wrong > 0.9
    assert perfect < random < wrong


def test_dice_hand_computed_and_absent_class_is_stable():
    # 4 pixels, classes {0, 1} present, class 2 absent and never predicted.
    # Near-one-hot predictions: 3 right, 1 pixel of class 1 predicted 0.
    labels = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 0, 1, 0]])
    intersection, denominator = soft_dice_sums(labels, one_hot_logits(pred, 3), 3)
    np.testing.assert_allclose(intersection, [2, 1, 0], atol=1e-5)
    np.testing.assert_allclose(denominator, [3 + 2, 1 + 2, 0], atol=1e-5)
    loss = float(soft_dice_loss(labels, one_hot_logits(pred, 3), 3, smooth=1.0))
    expected = 1 - np.mean([(4 + 1) / (5 + 1), (2 + 1) / (3 + 1), (0 + 1) / (0 + 1)])
    assert loss == pytest.approx(expected, abs=1e-5)


def test_dice_ignores_masked_pixels():
    labels = np.array([[0, 1, IGNORE, IGNORE]])
    logits = one_hot_logits(np.array([[0, 1, 0, 0]]), 2)
    changed = logits.copy()
    changed[0, 2:] = one_hot_logits(np.array([[1, 1]]), 2)[0]
    assert float(soft_dice_loss(labels, logits, 2)) == pytest.approx(float(soft_dice_loss(labels, changed, 2)))
    with pytest.raises(ValueError, match="smooth"):
        soft_dice_loss(labels, logits, 2, smooth=0.0)


def test_class_weights_from_frequency():
    freq = np.array([0.64, 0.32, 0.04, 0.0])
    w = class_weights_from_frequency(freq)
    # Inverse square root: 1/0.8, 1/sqrt(0.32), 1/0.2, up to one scale.
    ratio = w[:3] / w[0]
    np.testing.assert_allclose(ratio, [1.0, 0.8 / np.sqrt(0.32), 4.0])
    assert float(np.sum(freq * w)) == pytest.approx(1.0)  # frequency-weighted mean is 1
    assert w[3] == w[:3].max()  # unseen class: weighted like the rarest seen one
    # Raw pixel counts give the same weights as fractions.
    np.testing.assert_allclose(class_weights_from_frequency(freq * 12345), w)
    np.testing.assert_allclose(class_weights_from_frequency([0.25] * 4), [1.0] * 4)


@pytest.mark.parametrize("freq", [[0.0, 0.0], [0.5, -0.1], [np.nan, 1.0], [], [[0.5, 0.5]]])
def test_class_weights_from_frequency_rejects_bad_input(freq):
    with pytest.raises(ValueError):
        class_weights_from_frequency(freq)


def test_present_class_dice_leaves_out_classes_absent_from_the_truth():
    from segray.training.losses import present_class_dice_loss, soft_dice_sums, truth_counts

    labels = tf.constant([[[0, 0], [1, 255]]])  # class 2 absent, one pixel ignored
    logits = tf.constant([[[[9.0, 0, 0], [9.0, 0, 0]], [[0, 9.0, 0], [0, 0, 9.0]]]])
    inter, denom = soft_dice_sums(labels, logits, 3)
    truth = truth_counts(labels, 3)
    np.testing.assert_allclose(truth.numpy(), [2, 1, 0])
    # Classes 0 and 1 are predicted right (Dice ~1); class 2 would score a free 1 in an all-class mean.
    assert float(present_class_dice_loss(inter, denom, truth)) < 1e-3
    wrong = tf.constant([[[[0, 0, 9.0], [0, 0, 9.0]], [[0, 0, 9.0], [0, 0, 9.0]]]])
    inter, denom = soft_dice_sums(labels, wrong, 3)
    assert float(present_class_dice_loss(inter, denom, truth)) > 0.5  # (1 - 1/3) and (1 - 1/2), averaged
    assert float(present_class_dice_loss(inter, denom, tf.zeros(3))) == 0.0
