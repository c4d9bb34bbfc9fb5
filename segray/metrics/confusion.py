"""Confusion matrices and per-class counts (numpy).

The confusion matrix is the one additive state of every segmentation metric:
rows are truth, columns are prediction, and batches, workers and Ray tasks
merge by summing matrices. Counts are int64 throughout, so no cell loses
pixels past 2**24 the way a float32 matrix does.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "CELL_BASE",
    "SparseCellError",
    "class_counts",
    "confusion_matrix",
    "counts_from_sparse",
    "decode_cells",
    "encode_cells",
    "image_counts",
    "per_image_counts",
    "sparse_confusion",
]

CELL_BASE = 256  # class ids are uint8: a sparse cell is truth * 256 + prediction


def encode_cells(truth: npt.ArrayLike, pred: npt.ArrayLike) -> np.ndarray:
    """Sparse cells ``truth * CELL_BASE + prediction`` (int32) of class ids ``0 .. 255``."""
    return (np.asarray(truth, np.int64) * CELL_BASE + np.asarray(pred, np.int64)).astype(np.int32)


def decode_cells(cells: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(truth, prediction)`` int64 class ids of sparse cells (``encode_cells``); the only decoder of the cell format."""
    cells = np.asarray(cells, np.int64)
    return cells // CELL_BASE, cells % CELL_BASE


def _as_labels(name: str, values: npt.ArrayLike) -> np.ndarray:
    array = np.asarray(values)
    # Float labels would be truncated silently by the index arithmetic; a mask
    # read with the wrong decoder (e.g. an RGB PNG scaled to [0, 1]) should fail.
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise TypeError(f"{name} labels must be integers, got dtype {array.dtype}")
    return array


def _check_range(name: str, values: np.ndarray, num_classes: int, note: str = "") -> None:
    """Raises ValueError naming the out-of-range values and their pixel counts."""
    if values.size == 0:
        return
    if values.min() >= 0 and values.max() < num_classes:
        return
    bad = values[(values < 0) | (values >= num_classes)]
    found, counts = np.unique(bad, return_counts=True)
    listed = ", ".join(f"{v} ({c} px)" for v, c in zip(found[:10].tolist(), counts[:10].tolist()))
    more = f" and {len(found) - 10} more values" if len(found) > 10 else ""
    raise ValueError(
        f"{name} labels must lie in [0, {num_classes}){note}; got {bad.size} pixels "
        f"outside it: {listed}{more}"
    )


def _valid_pairs(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, num_classes: int, ignore_index: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked flat (truth, prediction) labels and the keep-mask over all pixels."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    true = _as_labels("truth", y_true)
    pred = _as_labels("prediction", y_pred)
    if true.shape != pred.shape:
        raise ValueError(f"truth has shape {true.shape}, prediction has shape {pred.shape}")
    true = true.reshape(-1).astype(np.int64, copy=False)
    pred = pred.reshape(-1).astype(np.int64, copy=False)
    if ignore_index is None:
        keep = np.ones(true.shape, dtype=bool)
    else:
        keep = true != ignore_index
    true, pred_kept = true[keep], pred[keep]
    note = f" (or be ignore_index {ignore_index})" if ignore_index is not None else ""
    _check_range("truth", true, num_classes, note)
    # A prediction of ignore_index under a counted truth pixel is still wrong:
    # a model cannot abstain, so it raises like any other out-of-range value.
    _check_range("prediction", pred_kept, num_classes)
    return true, pred_kept, keep


def confusion_matrix(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    num_classes: int,
    ignore_index: int | None = 255,
) -> np.ndarray:
    """Counts pixels by (truth, prediction) class.

    Args:
        y_true: Integer truth labels of any shape, e.g. ``(H, W)`` or ``(B, H, W)``.
        y_pred: Integer predicted labels, same shape as ``y_true``.
        num_classes: Number of classes ``C``; valid labels are ``0 .. C-1``.
        ignore_index: Truth value whose pixels are never counted, whatever was
            predicted there. ``None`` counts every pixel.

    Returns:
        int64 array ``(C, C)``; ``cm[t, p]`` is the number of pixels of truth
        class ``t`` predicted as ``p``.

    Raises:
        TypeError: A label array is not integer.
        ValueError: Shapes differ, or a counted truth or a prediction value lies
            outside ``[0, C)``; the message lists the values and pixel counts.
    """
    true, pred, _ = _valid_pairs(y_true, y_pred, num_classes, ignore_index)
    cells = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return cells.astype(np.int64, copy=False).reshape(num_classes, num_classes)


def class_counts(cm: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class true positives, false positives, false negatives and support.

    Args:
        cm: Confusion matrix ``(C, C)``, rows truth, columns prediction; a stack
            ``(..., C, C)`` gives counts shaped ``(..., C)``.

    Returns:
        ``(tp, fp, fn, support)`` as int64 arrays ``(..., C)``; ``support`` is the
        number of truth pixels of each class (``tp + fn``).
    """
    cm = np.asarray(cm)
    if cm.ndim < 2 or cm.shape[-1] != cm.shape[-2]:
        raise ValueError(f"confusion matrix must be (..., C, C), got shape {cm.shape}")
    cm = cm.astype(np.int64, copy=False)
    tp = np.diagonal(cm, axis1=-2, axis2=-1).copy()
    support = cm.sum(axis=-1)
    predicted = cm.sum(axis=-2)
    return tp, predicted - tp, support - tp, support


def image_counts(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    num_classes: int,
    ignore_index: int | None = 255,
) -> dict[str, np.ndarray]:
    """Per-class counts of one image, the row a per-image table keeps.

    Args:
        y_true: Integer truth labels ``(H, W)``.
        y_pred: Integer predicted labels ``(H, W)``.
        num_classes: Number of classes ``C``.
        ignore_index: Truth value that is never counted.

    Returns:
        ``{"tp", "fp", "fn", "support"}``, each an int64 array ``(C,)``.
    """
    tp, fp, fn, support = class_counts(confusion_matrix(y_true, y_pred, num_classes, ignore_index))
    return {"tp": tp, "fp": fp, "fn": fn, "support": support}


def per_image_counts(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    num_classes: int,
    ignore_index: int | None = 255,
) -> dict[str, np.ndarray]:
    """Per-class counts for each image of a batch, in one ``np.bincount``.

    Args:
        y_true: Integer truth labels ``(N, H, W)``.
        y_pred: Integer predicted labels ``(N, H, W)``.
        num_classes: Number of classes ``C``.
        ignore_index: Truth value that is never counted.

    Returns:
        ``{"tp", "fp", "fn", "support"}``, each an int64 array ``(N, C)``; row
        ``i`` equals ``image_counts(y_true[i], y_pred[i], ...)``.
    """
    shape = np.shape(y_true)
    if len(shape) < 1:
        raise ValueError(f"expected a batch (N, ...) of label images, got shape {shape}")
    n = shape[0]
    true, pred, keep = _valid_pairs(y_true, y_pred, num_classes, ignore_index)
    cells = num_classes * num_classes
    # Offsetting each image by n * C * C keeps the images' matrices apart in a
    # single bincount instead of a Python loop over the batch.
    pixels_per_image = keep.size // n if n else 0
    image = np.repeat(np.arange(n, dtype=np.int64), pixels_per_image)[keep]
    flat = np.bincount(image * cells + true * num_classes + pred, minlength=n * cells)
    tp, fp, fn, support = class_counts(flat.astype(np.int64, copy=False).reshape(n, num_classes, num_classes))
    return {"tp": tp, "fp": fp, "fn": fn, "support": support}


def sparse_confusion(truth: np.ndarray, pred: np.ndarray, ignore_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero cells of one image's confusion matrix.

    Args:
        truth: (H, W) uint8 class ids (``ignore_index`` pixels are not counted).
        pred: (H, W) uint8 class ids.

    Returns:
        ``(cells, counts)``: int32 ``truth * 256 + pred`` and int64 pixel counts, cells ascending.
    """
    if truth.shape != pred.shape:
        raise ValueError(f"truth is {truth.shape[1]}x{truth.shape[0]}, prediction is {pred.shape[1]}x{pred.shape[0]}")
    t, p = np.ravel(truth), np.ravel(pred)
    if ignore_index is not None:
        keep = t != ignore_index
        if not keep.all():
            t, p = t[keep], p[keep]
    if t.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    # Count over the k x k ids actually present (k small), then re-index to base 256.
    k = int(max(t.max(), p.max())) + 1
    counts = np.bincount(t.astype(np.int32) * k + p, minlength=k * k)
    nonzero = np.flatnonzero(counts)
    return encode_cells(nonzero // k, nonzero % k), counts[nonzero].astype(np.int64)


class SparseCellError(ValueError):
    """A sparse cell holds a class id outside ``0 .. C-1``; ``owner`` is its image's index."""

    def __init__(self, message: str, owner: int):
        super().__init__(message)
        self.owner = owner


def counts_from_sparse(
    owner: np.ndarray, truth: np.ndarray, pred: np.ndarray, counts: np.ndarray, n: int, num_classes: int
) -> dict[str, np.ndarray]:
    """Per-image counts and the summed matrix from the sparse cells of ``n`` images.

    Args:
        owner: int64 ``(K,)`` the image index (``0 .. n-1``) of each cell.
        truth, pred: int64 ``(K,)`` the class ids of each cell (``decode_cells`` of ``sparse_confusion``'s cells).
        counts: int64 ``(K,)`` pixel counts of the cells.
        n: number of images.
        num_classes: ``C``.

    Returns:
        ``tp``, ``fp``, ``fn``, ``support`` int64 ``(n, C)`` and ``confusion`` int64 ``(C, C)``.

    Raises:
        SparseCellError: a cell's truth or prediction lies outside ``0 .. C-1``.
    """
    c = num_classes
    bad = (truth >= c) | (pred >= c)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise SparseCellError(
            f"class id {max(int(truth[k]), int(pred[k]))} outside 0..{c - 1} (truth {int(truth[k])}, prediction {int(pred[k])})", int(owner[k])
        )
    confusion = np.zeros((c, c), np.int64)
    np.add.at(confusion, (truth, pred), counts)
    support = np.zeros((n, c), np.int64)
    predicted = np.zeros((n, c), np.int64)
    tp = np.zeros((n, c), np.int64)
    np.add.at(support, (owner, truth), counts)
    np.add.at(predicted, (owner, pred), counts)
    hit = truth == pred
    np.add.at(tp, (owner[hit], truth[hit]), counts[hit])
    return {"tp": tp, "fp": predicted - tp, "fn": support - tp, "support": support, "confusion": confusion}
