"""Test-time augmentation: the model's logits averaged over mirrored views of its input.

``flip`` predicts 4 views (identity, left-right, up-down, both), ``flip8``
adds the transpose of each (the 8 symmetries of a square). Each view's logits
are mapped back to the input's orientation and the views' logits are
averaged, as nnU-Net v2 does (v1 averaged softmax probabilities): averaging
logits keeps one kind of output everywhere, so the windows' Gaussian blending
and the resizing back to the image act on logits whatever the TTA. A model
that is equivariant to the flips gives the same logits with and without TTA.

Only numpy: the predictor runs each view through its model function.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# (transpose, flip rows, flip columns) of each view, identity first.
_FLIPS = [(False, False, False), (False, False, True), (False, True, False), (False, True, True)]
VIEWS: dict[str, list[tuple[bool, bool, bool]]] = {
    "none": _FLIPS[:1],
    "flip": _FLIPS,
    "flip8": _FLIPS + [(True, rows, cols) for _, rows, cols in _FLIPS],
}


def apply_view(x: np.ndarray, view: tuple[bool, bool, bool]) -> np.ndarray:
    """(N, H, W, C) -> the view: flipped, then transposed to (N, W, H, C) if it says so."""
    transpose, rows, cols = view
    if rows:
        x = x[:, ::-1]
    if cols:
        x = x[:, :, ::-1]
    if transpose:
        x = x.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(x)


def undo_view(y: np.ndarray, view: tuple[bool, bool, bool]) -> np.ndarray:
    """The inverse of ``apply_view``: a view's (N, h, w, C) logits back in the input's orientation."""
    transpose, rows, cols = view
    if transpose:
        y = y.transpose(0, 2, 1, 3)
    if cols:
        y = y[:, :, ::-1]
    if rows:
        y = y[:, ::-1]
    return y


def mean_of_views(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tta: str) -> np.ndarray:
    """The logits of ``x`` (N, H, W, 3) averaged over the views of ``tta``.

    Args:
        predict: ``(N, h, w, 3) -> (N, h, w, C)`` logits.
        tta: ``none``, ``flip`` or ``flip8``.

    Returns:
        (N, H, W, C) float32.
    """
    views = VIEWS[tta]
    total = None
    for view in views:
        y = undo_view(np.asarray(predict(apply_view(x, view)), np.float32), view)
        total = y.copy() if total is None else total + y
    return total / np.float32(len(views)) if len(views) > 1 else total
