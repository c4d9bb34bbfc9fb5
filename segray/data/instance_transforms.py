"""Per-image transforms of an image and its instance map: fit, augment, renumber.

The id map moves with the image through one ``cv2.remap`` (nearest for the
ids, linear for the image), then flips and 90-degree turns, then the
intensity augmentations of ``transforms.augment_intensity``. Outside the
image both are 0 (no mirrored border as for class masks: a mirrored object
would carry the same id in two places). Afterwards the objects are
renumbered 1..K; an object cut away disappears, and remnants under
``min_area`` pixels are dropped (set to background).
"""

from __future__ import annotations

import cv2
import numpy as np

from segray.data.transforms import FitMode, augment_intensity, draw_geometry, fit, flip_rot90, warp

# Pixels an object must keep after a crop or a resize to stay an object.
MIN_AREA = 4


def fit_instances(image: np.ndarray, ids: np.ndarray, size: tuple[int, int], mode: FitMode = "resize") -> tuple[np.ndarray, np.ndarray]:
    """``transforms.fit`` for an image and its id map: nearest for the ids, padding with 0 (background)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, ids
    fitted, _ = fit(image, None, size, mode)
    if mode == "resize":
        return fitted, cv2.resize(ids, (w, h), interpolation=cv2.INTER_NEAREST)
    scale = min(h / ids.shape[0], w / ids.shape[1], 1.0)
    if scale < 1.0:
        ids = cv2.resize(ids, (max(1, round(ids.shape[1] * scale)), max(1, round(ids.shape[0] * scale))), interpolation=cv2.INTER_NEAREST)
    return fitted, np.pad(ids, ((0, h - ids.shape[0]), (0, w - ids.shape[1])))


def renumber(ids: np.ndarray, classes: np.ndarray, min_area: int = MIN_AREA) -> tuple[np.ndarray, np.ndarray]:
    """Objects of at least ``min_area`` pixels renumbered 1..K in order of their old id; others become 0.

    Args:
        ids: (H, W) ids, 0 background.
        classes: (K_old,) the class of old object k at k - 1.

    Returns:
        ``ids`` (H, W) int32 and ``classes`` (K,) int32.
    """
    area = np.bincount(ids.ravel(), minlength=len(classes) + 1)
    keep = np.flatnonzero(area[1:] >= max(1, min_area)) + 1
    lookup = np.zeros(len(area), np.int32)
    lookup[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lookup[ids], np.asarray(classes, np.int32)[keep - 1]


def sample_instances(
    image: np.ndarray,
    ids: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator | None = None,
    augment_set: tuple[str, ...] = (),
    strength: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W) window of a fitted image and its id map, with the drawn spatial and intensity augmentations.

    ``size`` equal to the image's size and no augmentation returns the pair
    unchanged; a smaller ``size`` is a random crop. ``augment_set`` takes
    the names of ``TrainConfig.augment_set``: ``scale``, ``rotate`` (up to
    180 degrees with ``rot90``, else 15), ``elastic``, ``flip``, ``rot90``
    (vertical flips and 90-degree turns), and the intensity ones.

    Returns:
        ``image`` (H, W, C) in the input's dtype, ``ids`` (H, W) in the input's dtype (not renumbered).
    """
    ph, pw = size
    h, w = ids.shape
    s = set(augment_set) if rng is not None else set()
    if rng is None:
        cy, cx = h // 2, w // 2
    else:
        # A window inside the image when it fits (without scale and rotation the crop is exact).
        cy = int(rng.integers(min(ph // 2, h // 2), max(h - ph + ph // 2, h // 2) + 1))
        cx = int(rng.integers(min(pw // 2, w // 2), max(w - pw + pw // 2, w // 2) + 1))
    scale, angle, elastic = draw_geometry(rng, s, strength)
    if (ph, pw) == (h, w) and scale == 1.0 and angle == 0.0 and not elastic:
        patch, labels = image, ids
    else:
        patch, labels = warp(image, ids, size, (cy, cx), scale, angle, rng if elastic else None, strength, cv2.BORDER_CONSTANT)
    if rng is not None:
        patch, labels = flip_rot90(patch, labels, rng, s)
        patch = augment_intensity(np.ascontiguousarray(patch), rng, s, strength)
    return np.ascontiguousarray(patch), np.ascontiguousarray(labels)
