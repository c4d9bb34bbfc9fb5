"""Per-image transforms on numpy arrays with OpenCV: fit to a size, augment, normalise.

All functions take and return ``image`` (H, W, 3) and ``mask`` (H, W) arrays;
randomness comes only from the ``rng`` passed in, so a seed fixes the result.
Images keep their dtype (uint8, or float32 on the 0..255 scale for 16-bit and
float files): they travel to the model's worker at that size, and
``normalize_tf`` casts and normalises them there, in the model's graph.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from segray.data.info import IGNORE_INDEX

FitMode = Literal["resize", "pad"]


def fit(image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int], mode: FitMode = "resize"):
    """Brings a pair to ``size`` = (H, W).

    ``resize`` scales (linear for the image, nearest for the mask). ``pad``
    pads at the bottom and right (image with 0, mask with ``IGNORE_INDEX``) when
    the image is smaller, and scales down, keeping the aspect ratio, when it is
    larger.
    """
    h, w = size
    if image.shape[:2] == (h, w):
        return image, mask
    if mode == "resize":
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        if mask is not None:
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        return image, mask
    scale = min(h / image.shape[0], w / image.shape[1], 1.0)
    if scale < 1.0:
        new = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, new, interpolation=cv2.INTER_AREA)
        if mask is not None:
            mask = cv2.resize(mask, new, interpolation=cv2.INTER_NEAREST)
    pad = ((0, h - image.shape[0]), (0, w - image.shape[1]))
    image = np.pad(image, pad + ((0, 0),) * (image.ndim - 2))
    if mask is not None:
        mask = np.pad(mask, pad, constant_values=IGNORE_INDEX)
    return image, mask


def random_crop(image: np.ndarray, mask: np.ndarray, size: tuple[int, int], rng: np.random.Generator):
    """A random (H, W) window; pads (mask with ignore) where the pair is smaller."""
    h, w = size
    if image.shape[0] < h or image.shape[1] < w:
        image, mask = fit(image, mask, (max(h, image.shape[0]), max(w, image.shape[1])), mode="pad")
    y = int(rng.integers(0, image.shape[0] - h + 1))
    x = int(rng.integers(0, image.shape[1] - w + 1))
    return image[y : y + h, x : x + w], mask[y : y + h, x : x + w]


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.75, 1.25),
    brightness: float = 0.2,
    contrast: float = 0.2,
    strength: float = 1.0,
):
    """Flips, rotate-90, random scale-crop, brightness and contrast; keeps the size and dtype.

    ``strength`` multiplies the magnitudes (the scale range's distance from 1,
    brightness and contrast): 0 leaves flips and rotations only.

    ``image`` is uint8 or float32 on the 0..255 scale; brightness shifts by a
    fraction of that image's mean, contrast scales around it. uint8 results
    are rounded and saturated to 0..255 (OpenCV's ``saturate_cast``).
    """
    h, w = mask.shape
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    k = int(rng.integers(0, 4)) if h == w else 2 * int(rng.integers(0, 2))
    if k:
        image, mask = np.rot90(image, k), np.rot90(mask, k)
    scale_range = (1.0 + (scale_range[0] - 1.0) * strength, 1.0 + (scale_range[1] - 1.0) * strength)
    brightness, contrast = brightness * strength, contrast * strength
    scale = float(rng.uniform(*scale_range))
    if abs(scale - 1.0) > 1e-3:
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        image = cv2.resize(np.ascontiguousarray(image), (sw, sh), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(np.ascontiguousarray(mask), (sw, sh), interpolation=cv2.INTER_NEAREST)
        image, mask = random_crop(image, mask, (h, w), rng)
    image = np.ascontiguousarray(image)
    level = float(np.mean(cv2.mean(image)[: image.shape[2] if image.ndim == 3 else 1]))
    alpha = 1.0 + float(rng.uniform(-contrast, contrast))
    beta = float(rng.uniform(-brightness, brightness)) * level
    # (image - level) * alpha + level + beta in one OpenCV pass, in the image's dtype.
    image = cv2.addWeighted(image, alpha, image, 0.0, (1.0 - alpha) * level + beta)
    return image, np.ascontiguousarray(mask)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """(image - mean) / std in float32, with numpy (the reference for ``normalize_tf``)."""
    return ((image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def normalize_tf(images, mean, std):
    """``normalize`` inside a TensorFlow graph: (B, H, W, 3) uint8 or float32 -> float32.

    The training step and the predictor apply it before the model, so images
    cross Ray's object store as uint8 (a quarter of float32's bytes) and the
    saved model keeps taking normalised float32 input.
    """
    import tensorflow as tf

    x = tf.cast(images, tf.float32)
    return (x - tf.constant(np.asarray(mean, np.float32))) / tf.constant(np.asarray(std, np.float32))
