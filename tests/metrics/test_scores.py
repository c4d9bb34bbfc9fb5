"""Scores as functions of the confusion matrix and of per-image count tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segray.metrics import (
    class_counts,
    confusion_matrix,
    dice,
    dice_from_counts,
    iou,
    iou_from_counts,
    mean_of_images,
    per_image_counts,
    pixel_accuracy,
    precision,
    recall,
    recall_from_counts,
    summary,
    summary_from_counts,
)

# 4 classes; class 3 appears in neither truth nor prediction.
#            pred 0  1  2  3
#   truth 0     [3, 1, 0, 0]
#   truth 1     [0, 2, 2, 0]
#   truth 2     [0, 0, 0, 0]    class 2 is only ever predicted (2 false positives)
#   truth 3     [0, 0, 0, 0]
# tp = [3, 2, 0, 0], fp = [0, 1, 2, 0], fn = [1, 2, 0, 0]
CM = np.array([[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_hand_computed_scores_and_nan_rule():
    np.testing.assert_allclose(iou(CM), [3 / 4, 2 / 5, 0.0, np.nan])
    np.testing.assert_allclose(dice(CM), [6 / 7, 4 / 7, 0.0, np.nan])
    np.testing.assert_allclose(precision(CM), [3 / 3, 2 / 3, 0.0, np.nan])
    # Class 2 is absent from truth but predicted: recall 0/0 reads 0, not NaN.
    np.testing.assert_allclose(recall(CM), [3 / 4, 2 / 4, 0.0, np.nan])
    for scores in (iou(CM), dice(CM), precision(CM), recall(CM)):
        assert scores.dtype == np.float64

    s = summary(CM)
    assert s["valid_classes"] == 3
    assert s["pixels"] == 8
    assert s["pixel_accuracy"] == pytest.approx(5 / 8)
    assert s["miou"] == pytest.approx((3 / 4 + 2 / 5 + 0) / 3)
    assert s["mean_dice"] == pytest.approx((6 / 7 + 4 / 7 + 0) / 3)
    assert pixel_accuracy(CM) == pytest.approx(5 / 8)


def test_present_but_never_predicted_class_scores_zero_precision():
    # truth 1 exists (2 px) but nothing is predicted 1.
    #            pred 0  1
    #   truth 0     [1, 0]
    #   truth 1     [2, 0]
    cm = np.array([[1, 0], [2, 0]])
    np.testing.assert_allclose(precision(cm), [1 / 3, 0.0])
    np.testing.assert_allclose(iou(cm), [1 / 3, 0.0])
    assert summary(cm)["valid_classes"] == 2


def test_empty_matrix_is_all_nan_with_no_warning():
    cm = np.zeros((3, 3), np.int64)
    with np.errstate(all="raise"):
        s = summary(cm)
        assert np.isnan(iou(cm)).all()
    assert s["valid_classes"] == 0 and s["pixels"] == 0
    assert math.isnan(s["miou"]) and math.isnan(s["mean_dice"]) and math.isnan(s["pixel_accuracy"])
    assert math.isnan(pixel_accuracy(cm))


def test_summary_values_are_plain_python_numbers():
    s = summary(CM)
    assert set(s) == {"pixel_accuracy", "miou", "mean_dice", "valid_classes", "pixels"}
    assert all(type(v) in (int, float) for v in s.values())


def test_mean_of_images_hand_computed():
    # image 0: tp=[2, 0], fp=[0, 0], fn=[0, 0]  -> IoU [1, NaN]  -> mIoU 1.0
    # image 1: tp=[1, 1], fp=[1, 0], fn=[0, 1]  -> IoU [1/2, 1/2] -> mIoU 0.5
    # image 2: everything ignored                -> no valid class, left out
    tp = np.array([[2, 0], [1, 1], [0, 0]])
    fp = np.array([[0, 0], [1, 0], [0, 0]])
    fn = np.array([[0, 0], [0, 1], [0, 0]])
    assert mean_of_images(tp, fp, fn) == pytest.approx(0.75)
    # The dataset-level mIoU pools pixels first and differs:
    # tp=[3, 1], fp=[1, 0], fn=[0, 1] -> IoU [3/4, 1/2] -> 0.625
    assert summary_from_counts(tp, fp, fn)["miou"] == pytest.approx(0.625)
    assert math.isnan(mean_of_images(tp[2:], fp[2:], fn[2:]))
    with pytest.raises(ValueError, match=r"\(N_images, C\)"):
        mean_of_images(tp[0], fp[0], fn[0])


def test_counts_functions_check_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        iou_from_counts([1, 2], [0, 0], [0])


def test_per_image_table_recomputes_dataset_scores():
    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 5, size=(6, 9, 9)).astype(np.uint8)
    y_true[rng.random(y_true.shape) < 0.25] = 255
    y_pred = rng.integers(0, 5, size=y_true.shape)
    y_pred[y_pred == 4] = 0  # class 4 never predicted
    table = per_image_counts(y_true, y_pred, 5)

    cm = confusion_matrix(y_true, y_pred, 5)
    from_table = summary_from_counts(table["tp"], table["fp"], table["fn"])
    assert from_table == pytest.approx(summary(cm), nan_ok=True)
    # Per-class scores from the summed columns equal the matrix's.
    np.testing.assert_allclose(iou_from_counts(*(table[k].sum(0) for k in ("tp", "fp", "fn"))), iou(cm))
    np.testing.assert_allclose(recall_from_counts(*(table[k].sum(0) for k in ("tp", "fp", "fn"))), recall(cm))
    # Mean of images equals the loop over images.
    per_image = [np.nanmean(iou(confusion_matrix(t, p, 5))) for t, p in zip(y_true, y_pred)]
    assert mean_of_images(table["tp"], table["fp"], table["fn"]) == pytest.approx(np.mean(per_image))


def test_scores_exact_for_counts_past_2_pow_24():
    # float32 would make these two classes' IoU identical; float64 keeps them apart.
    cm = np.array([[2**24 + 1, 1], [0, 2**24]], dtype=np.int64)
    scores = iou(cm)
    assert scores[0] == (2**24 + 1) / (2**24 + 2)
    assert scores[1] == 2**24 / (2**24 + 1)
    assert summary(cm)["pixels"] == 2**25 + 2


@st.composite
def matrices(draw):
    c = draw(st.integers(1, 6))
    return draw(hnp.arrays(np.int64, (c, c), elements=st.integers(0, 50)))


@settings(max_examples=80, deadline=None)
@given(matrices(), st.randoms(use_true_random=False))
def test_permuting_class_ids_permutes_scores(cm, random):
    c = cm.shape[0]
    perm = list(range(c))
    random.shuffle(perm)
    permuted = np.zeros_like(cm)
    permuted[np.ix_(perm, perm)] = cm  # class k renamed perm[k]
    for score in (iou, dice, precision, recall):
        np.testing.assert_array_equal(score(permuted)[perm], score(cm))
    a, b = summary(cm), summary(permuted)
    assert a == pytest.approx(b, nan_ok=True)


@settings(max_examples=80, deadline=None)
@given(matrices())
def test_nan_exactly_for_absent_classes(cm):
    tp, fp, fn, _ = class_counts(cm)
    absent = (tp + fp + fn) == 0
    for score in (iou, dice, precision, recall):
        values = score(cm)
        np.testing.assert_array_equal(np.isnan(values), absent)
        assert np.all((values[~absent] >= 0) & (values[~absent] <= 1))
    s = summary(cm)
    assert s["valid_classes"] == int((~absent).sum())
    if s["valid_classes"]:
        assert s["miou"] == pytest.approx(np.nanmean(iou(cm)))
    # Dice is never below IoU: D = 2J / (1 + J).
    j, d = iou(cm), dice(cm)
    np.testing.assert_allclose(d[~absent], 2 * j[~absent] / (1 + j[~absent]))
    np.testing.assert_allclose(dice_from_counts(tp, fp, fn), d)
