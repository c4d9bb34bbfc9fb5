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


# --- patch sampling (the plan's recipe) ----------------------------------------------
# Magnitudes at strength 1, nnU-Net's (Isensee et al. 2021, supplementary
# "data augmentation"): scale 0.7-1.4, rotation, gamma 0.7-1.5, Gaussian
# noise and blur, each drawn with its own probability.
SCALE_RANGE = (0.7, 1.4)
ROTATE_SMALL = 15.0  # degrees, for natural images (no 90-degree turns)
ELASTIC_P, ELASTIC_ALPHA = 0.2, 0.04  # displacement up to 4% of the patch side
GAMMA_RANGE, GAMMA_P = (0.7, 1.5), 0.3
NOISE_P, NOISE_SIGMA = 0.15, 0.04  # sigma up to 4% of the 0..255 scale
BLUR_P, BLUR_SIGMA = 0.2, (0.5, 1.0)


def patch_centre(
    mask: np.ndarray,
    rng: np.random.Generator,
    oversample: float,
    foreground: dict[int, np.ndarray] | None = None,
    class_draw: tuple[float, ...] = (),
):
    """(y, x) of a patch centre: with probability ``oversample`` a random pixel of a present class (ids 1.., not ignored), else anywhere.

    ``foreground``: the flat pixel indices of each present class (from
    ``class_pixels``), computed once per image for all its patches.
    ``class_draw``: a weight per class id for choosing among the present
    classes (``training.trainer.class_draw_for``); empty: each present class alike (nnU-Net).
    """
    h, w = mask.shape
    if oversample > 0 and rng.random() < oversample:
        if foreground is None:
            foreground = class_pixels(mask)
        if foreground:
            ids = list(foreground)
            if class_draw:
                p = np.array([class_draw[k] if k < len(class_draw) else 1.0 for k in ids], np.float64)
                k = ids[int(rng.choice(len(ids), p=p / p.sum()))]
            else:
                k = ids[int(rng.integers(0, len(ids)))]
            pixels = foreground[k]
            flat = int(pixels[int(rng.integers(0, len(pixels)))])
            return flat // w, flat % w
    return int(rng.integers(0, h)), int(rng.integers(0, w))


def class_pixels(mask: np.ndarray) -> dict[int, np.ndarray]:
    """Class id -> flat indices of its pixels, for each class present in ``mask`` other than 0 and ``IGNORE_INDEX``."""
    flat = mask.ravel()
    ids = [int(k) for k in np.unique(flat) if k != 0 and k != IGNORE_INDEX]
    return {k: np.flatnonzero(flat == k) for k in ids}


def _elastic_field(shape: tuple[int, int], rng: np.random.Generator, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random displacement field (dy, dx) in pixels: a coarse 4x4 grid of draws, bicubically upsampled."""
    h, w = shape
    coarse = rng.normal(0.0, 1.0, size=(2, 4, 4)).astype(np.float32) * alpha * max(h, w)
    dy = cv2.resize(coarse[0], (w, h), interpolation=cv2.INTER_CUBIC)
    dx = cv2.resize(coarse[1], (w, h), interpolation=cv2.INTER_CUBIC)
    return dy, dx


def sample_patch(
    image: np.ndarray,
    mask: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator,
    augment_set: tuple[str, ...] = (),
    strength: float = 1.0,
    oversample: float = 0.0,
    foreground: dict[int, np.ndarray] | None = None,
    class_draw: tuple[float, ...] = (),
):
    """One (H, W) training patch of a full-size pair: centre, then scale, rotation and elastic in one remap.

    The centre comes from ``patch_centre``. Scale, rotation and elastic
    deformation map each patch pixel to a point of the whole image, so one
    ``cv2.remap`` (linear for the image, nearest for the mask) cuts and
    deforms at once, with the image's own content, mirrored, beyond its
    border. Flips and 90-degree turns follow, then the intensity
    augmentations (``augment_intensity``). ``strength`` scales every magnitude.

    Returns:
        ``image`` (H, W, C) in the input's dtype, ``mask`` (H, W) uint8.
    """
    cy, cx = patch_centre(mask, rng, oversample, foreground, class_draw)
    s = set(augment_set)
    scale, angle, elastic = draw_geometry(rng, s, strength)
    patch, labels = warp(image, mask, size, (cy, cx), scale, angle, rng if elastic else None, strength, cv2.BORDER_REFLECT_101)
    patch, labels = flip_rot90(patch, labels, rng, s)
    patch = augment_intensity(np.ascontiguousarray(patch), rng, s, strength)
    return patch, np.ascontiguousarray(labels)


def draw_geometry(rng: np.random.Generator | None, s: set[str], strength: float) -> tuple[float, float, bool]:
    """Draws a patch's scale, rotation (radians) and whether it is deformed, each if in ``s`` (``sample_patch``).

    Returns:
        ``(scale, angle, elastic)``; ``(1.0, 0.0, False)`` when ``s`` holds none of them.
    """
    scale, angle = 1.0, 0.0
    if "scale" in s and strength > 0:
        lo, hi = (1.0 + (v - 1.0) * strength for v in SCALE_RANGE)
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    if "rotate" in s and strength > 0:
        limit = 180.0 if "rot90" in s else ROTATE_SMALL
        angle = float(rng.uniform(-limit, limit) * min(1.0, strength)) * np.pi / 180
    elastic = "elastic" in s and strength > 0 and rng.random() < ELASTIC_P
    return scale, angle, elastic


def warp(
    image: np.ndarray,
    labels: np.ndarray,
    size: tuple[int, int],
    centre: tuple[int, int],
    scale: float,
    angle: float,
    elastic_rng: np.random.Generator | None,
    strength: float,
    border: int,
) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W) window around ``centre`` of an image and its labels, scaled, rotated and deformed in one remap.

    Linear for the image, nearest for the labels; ``border`` is the
    ``cv2.BORDER_*`` mode beyond the image (a constant border is 0).
    ``elastic_rng`` draws the elastic field; None: no deformation.

    Returns:
        ``image`` (H, W, C) and ``labels`` (H, W), each in its input's dtype.
    """
    ph, pw = size
    cy, cx = centre
    ys, xs = np.mgrid[0:ph, 0:pw].astype(np.float32)
    # Integer offsets: without scale, rotation and elastic the remap is an exact crop.
    ys -= ph // 2
    xs -= pw // 2
    if elastic_rng is not None:
        dy, dx = _elastic_field((ph, pw), elastic_rng, ELASTIC_ALPHA * strength)
        ys, xs = ys + dy, xs + dx
    # scale > 1 zooms in (objects larger): a patch pixel covers 1/scale image pixels.
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    map_y = (cy + sin * xs + cos * ys).astype(np.float32)
    map_x = (cx + cos * xs - sin * ys).astype(np.float32)
    patch = cv2.remap(np.ascontiguousarray(image), map_x, map_y, cv2.INTER_LINEAR, borderMode=border, borderValue=0)
    if patch.ndim == 2:
        patch = patch[..., None]
    return patch, cv2.remap(np.ascontiguousarray(labels), map_x, map_y, cv2.INTER_NEAREST, borderMode=border, borderValue=0)


def flip_rot90(patch: np.ndarray, labels: np.ndarray, rng: np.random.Generator, s: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal flip (``flip`` in ``s``), vertical flip and 90-degree turns (``rot90``; 180 only for a non-square patch)."""
    ph, pw = labels.shape[:2]
    if "flip" in s and rng.random() < 0.5:
        patch, labels = patch[:, ::-1], labels[:, ::-1]
    if "rot90" in s:
        if rng.random() < 0.5:
            patch, labels = patch[::-1], labels[::-1]
        k = int(rng.integers(0, 4)) if ph == pw else 2 * int(rng.integers(0, 2))
        if k:
            patch, labels = np.rot90(patch, k), np.rot90(labels, k)
    return patch, labels


def augment_intensity(image: np.ndarray, rng: np.random.Generator, augment_set: set[str] | tuple[str, ...], strength: float = 1.0) -> np.ndarray:
    """Brightness, contrast, gamma, Gaussian noise and blur, each if in ``augment_set``; keeps shape and dtype.

    Works in float32 on the 0..255 scale; uint8 results are rounded and clipped.
    """
    s = set(augment_set)
    if strength <= 0 or not s & {"brightness", "contrast", "gamma", "noise", "blur"}:
        return image
    x = image.astype(np.float32)
    level = float(x.mean())
    if "contrast" in s:
        alpha = 1.0 + float(rng.uniform(-0.25, 0.25)) * strength
        x = (x - level) * alpha + level
    if "brightness" in s:
        x = x * (1.0 + float(rng.uniform(-0.25, 0.25)) * strength)
    if "gamma" in s and rng.random() < GAMMA_P:
        lo, hi = (1.0 + (v - 1.0) * strength for v in GAMMA_RANGE)
        gamma = float(rng.uniform(lo, hi))
        x_min, x_max = float(x.min()), float(x.max())
        span = max(x_max - x_min, 1e-6)
        x = ((x - x_min) / span) ** gamma * span + x_min
    if "blur" in s and rng.random() < BLUR_P:
        sigma = float(rng.uniform(*BLUR_SIGMA)) * max(strength, 0.1)
        x = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma)
        if x.ndim == 2:
            x = x[..., None]
    if "noise" in s and rng.random() < NOISE_P:
        sigma = float(rng.uniform(0, NOISE_SIGMA * 255.0 * strength))
        x = x + rng.normal(0.0, sigma, size=x.shape).astype(np.float32)
    if image.dtype == np.uint8:
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return x.astype(image.dtype)

