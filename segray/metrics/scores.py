"""Scores as pure functions of a confusion matrix or of tp / fp / fn counts.

Rule for absent classes (MONAI's): a class absent from both truth and
prediction (``tp + fp + fn == 0``) scores NaN on every per-class score and is
left out of every mean; ``valid_classes`` reports how many classes were
averaged. A class that is present but was missed entirely, or predicted where
it is absent, scores 0 (its 0/0 precision or recall is 0, like its IoU and
Dice), so the four scores agree on which classes count.

The ``*_from_counts`` functions are elementwise over arrays of any shape, so
the same code scores one matrix ``(C,)``, a per-image table ``(N, C)``, or the
dataset-level sum of that table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from segray.metrics.confusion import class_counts

__all__ = [
    "dice",
    "dice_from_counts",
    "iou",
    "iou_from_counts",
    "mean_of_images",
    "pixel_accuracy",
    "precision",
    "precision_from_counts",
    "recall",
    "recall_from_counts",
    "summary",
    "summary_from_counts",
]


def _ratio(numerator: np.ndarray, denominator: np.ndarray, absent: np.ndarray) -> np.ndarray:
    """numerator / denominator as float64; 0/0 -> 0, absent classes -> NaN."""
    num = numerator.astype(np.float64)
    den = denominator.astype(np.float64)
    out = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    out[absent] = np.nan
    return out


def _counts(tp: npt.ArrayLike, fp: npt.ArrayLike, fn: npt.ArrayLike) -> tuple[np.ndarray, ...]:
    tp, fp, fn = (np.asarray(a, dtype=np.int64) for a in (tp, fp, fn))
    if not tp.shape == fp.shape == fn.shape:
        raise ValueError(f"tp, fp, fn shapes differ: {tp.shape}, {fp.shape}, {fn.shape}")
    return tp, fp, fn, (tp + fp + fn) == 0


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """np.nanmean without the empty-slice RuntimeWarning: all-NaN -> NaN."""
    valid = ~np.isnan(values)
    total = np.where(valid, values, 0.0).sum(axis=axis)
    count = valid.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / np.where(count > 0, count, np.nan)


def iou_from_counts(tp: npt.ArrayLike, fp: npt.ArrayLike, fn: npt.ArrayLike) -> np.ndarray:
    """Intersection over union ``tp / (tp + fp + fn)``, NaN where the class is absent.

    Args:
        tp: True positives, any shape (``(C,)`` or ``(N, C)``).
        fp: False positives, same shape.
        fn: False negatives, same shape.

    Returns:
        float64 array of the same shape.
    """
    tp, fp, fn, absent = _counts(tp, fp, fn)
    return _ratio(tp, tp + fp + fn, absent)


def dice_from_counts(tp: npt.ArrayLike, fp: npt.ArrayLike, fn: npt.ArrayLike) -> np.ndarray:
    """Dice (F1) ``2 tp / (2 tp + fp + fn)``, NaN where the class is absent."""
    tp, fp, fn, absent = _counts(tp, fp, fn)
    return _ratio(2 * tp, 2 * tp + fp + fn, absent)


def precision_from_counts(tp: npt.ArrayLike, fp: npt.ArrayLike, fn: npt.ArrayLike) -> np.ndarray:
    """Precision ``tp / (tp + fp)``; 0 for a present class never predicted, NaN if absent."""
    tp, fp, fn, absent = _counts(tp, fp, fn)
    return _ratio(tp, tp + fp, absent)


def recall_from_counts(tp: npt.ArrayLike, fp: npt.ArrayLike, fn: npt.ArrayLike) -> np.ndarray:
    """Recall ``tp / (tp + fn)``; 0 for a class predicted but absent from truth, NaN if absent."""
    tp, fp, fn, absent = _counts(tp, fp, fn)
    return _ratio(tp, tp + fn, absent)


def iou(cm: npt.ArrayLike) -> np.ndarray:
    """Per-class IoU ``(C,)`` float64 of a confusion matrix ``(C, C)``; NaN for absent classes."""
    tp, fp, fn, _ = class_counts(cm)
    return iou_from_counts(tp, fp, fn)


def dice(cm: npt.ArrayLike) -> np.ndarray:
    """Per-class Dice ``(C,)`` float64 of a confusion matrix ``(C, C)``; NaN for absent classes."""
    tp, fp, fn, _ = class_counts(cm)
    return dice_from_counts(tp, fp, fn)


def precision(cm: npt.ArrayLike) -> np.ndarray:
    """Per-class precision ``(C,)`` float64 of a confusion matrix ``(C, C)``."""
    tp, fp, fn, _ = class_counts(cm)
    return precision_from_counts(tp, fp, fn)


def recall(cm: npt.ArrayLike) -> np.ndarray:
    """Per-class recall ``(C,)`` float64 of a confusion matrix ``(C, C)``."""
    tp, fp, fn, _ = class_counts(cm)
    return recall_from_counts(tp, fp, fn)


def pixel_accuracy(cm: npt.ArrayLike) -> float:
    """Fraction of counted pixels predicted correctly; NaN when nothing was counted."""
    cm = np.asarray(cm, dtype=np.int64)
    total = int(cm.sum())
    return float(np.trace(cm)) / total if total else float("nan")


def summary_from_counts(tp: npt.ArrayLike, fp: npt.ArrayLike, fn: npt.ArrayLike) -> dict[str, Any]:
    """Dataset-level scores from per-class counts, summed over images first.

    Summing the counts of a per-image table and scoring the sum gives exactly
    the scores of the summed confusion matrix, never a mean of per-image means.

    Args:
        tp: True positives ``(C,)`` or a per-image table ``(N, C)``.
        fp: False positives, same shape.
        fn: False negatives, same shape.

    Returns:
        ``pixel_accuracy``, ``miou``, ``mean_dice`` (floats, NaN when undefined),
        ``valid_classes`` (classes present in truth or prediction) and ``pixels``
        (counted pixels), as plain Python numbers.
    """
    tp, fp, fn, _ = _counts(tp, fp, fn)
    if tp.ndim == 0:
        raise ValueError("counts must have a class axis, got scalars")
    if tp.ndim > 1:
        tp, fp, fn = (a.reshape(-1, a.shape[-1]).sum(axis=0) for a in (tp, fp, fn))
    # Each counted pixel has exactly one truth class: pixels = sum of support.
    pixels = int((tp + fn).sum())
    per_class_iou = iou_from_counts(tp, fp, fn)
    return {
        "pixel_accuracy": float(tp.sum()) / pixels if pixels else float("nan"),
        "miou": float(_nanmean(per_class_iou)),
        "mean_dice": float(_nanmean(dice_from_counts(tp, fp, fn))),
        "valid_classes": int((~np.isnan(per_class_iou)).sum()),
        "pixels": pixels,
    }


def summary(cm: npt.ArrayLike) -> dict[str, Any]:
    """Scores of a confusion matrix ``(C, C)``; see ``summary_from_counts`` for the keys."""
    tp, fp, fn, _ = class_counts(cm)
    return summary_from_counts(tp, fp, fn)


def mean_of_images(tp: npt.ArrayLike, fp: npt.ArrayLike, fn: npt.ArrayLike) -> float:
    """Mean over images of each image's mIoU (the "mean-of-images mIoU").

    Each image's mIoU averages the classes valid in that image; images with no
    valid class (every pixel ignored) are left out. This differs from the
    dataset-level mIoU of ``summary_from_counts``, which pools pixels first.

    Args:
        tp: True positives per image and class ``(N, C)``.
        fp: False positives ``(N, C)``.
        fn: False negatives ``(N, C)``.

    Returns:
        The mean, or NaN when no image has a valid class.
    """
    tp, fp, fn, _ = _counts(tp, fp, fn)
    if tp.ndim != 2:
        raise ValueError(f"expected per-image counts (N_images, C), got shape {tp.shape}")
    per_image = _nanmean(iou_from_counts(tp, fp, fn), axis=1)
    return float(_nanmean(np.asarray(per_image, dtype=np.float64)))
