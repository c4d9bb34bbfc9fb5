"""A synthetic dataset of shapes in the raw ``ids`` layout.

Circles, rectangles and triangles of different classes lie on textured, noisy
backgrounds; shapes overlap, and each class is left out of some images. The
same seed gives the same bytes.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from segray import storage
from segray.data.imageio import encode_png
from segray.data.info import default_color
from segray.progress import progress

SHAPES = ("circle", "rectangle", "triangle")


def class_names(num_classes: int) -> list[str]:
    names = ["background"]
    for k in range(1, num_classes):
        names.append(f"{SHAPES[(k - 1) % 3]}" + (f"_{(k - 1) // 3}" if k > 3 else ""))
    return names


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # Low-frequency texture (upsampled noise) plus pixel noise: shapes cannot
    # be found by a global threshold alone.
    coarse = rng.uniform(60, 140, size=(max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    texture = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return texture + rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)


def _class_color(k: int) -> np.ndarray:
    base = np.array(default_color(k), np.float32)
    return 0.5 * base + 100.0


def make_pair(rng: np.random.Generator, height: int, width: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image (H, W, 3) uint8 RGB, mask (H, W) uint8) pair."""
    image = _background(rng, height, width)
    mask = np.zeros((height, width), np.uint8)
    scale = min(height, width)
    present = [k for k in range(1, num_classes) if rng.random() < 0.7]
    order = [k for k in present for _ in range(int(rng.integers(1, 3)))]
    rng.shuffle(order)
    for k in order:
        shape_mask = np.zeros((height, width), np.uint8)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        r = int(rng.integers(max(2, scale // 12), max(3, scale // 4)))
        kind = SHAPES[(k - 1) % 3]
        if kind == "circle":
            cv2.circle(shape_mask, (cx, cy), r, 1, -1)
        elif kind == "rectangle":
            h2, w2 = int(r * rng.uniform(0.5, 1.2)), int(r * rng.uniform(0.5, 1.2))
            cv2.rectangle(shape_mask, (cx - w2, cy - h2), (cx + w2, cy + h2), 1, -1)
        else:
            angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2])
            pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).astype(np.int32)
            cv2.fillPoly(shape_mask, [pts], 1)
        inside = shape_mask.astype(bool)
        shade = _class_color(k) + rng.normal(0, 10, 3).astype(np.float32)
        image[inside] = shade + rng.normal(0, 12, size=(int(inside.sum()), 3)).astype(np.float32)
        mask[inside] = k
    return np.clip(image, 0, 255).astype(np.uint8), mask


def start_dataset(dst: str, n: int, size: tuple[int, int], num_classes: int, min_side: int) -> tuple[int, int]:
    """Checks a synthetic dataset's arguments and writes its ``dst/classes.json``; returns ``(height, width)``."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 2 <= num_classes <= 255:
        raise ValueError(f"num_classes must be 2..255, got {num_classes}")
    height, width = size
    if min(height, width) < min_side:
        raise ValueError(f"size {height}x{width} is too small; use at least {min_side}x{min_side}")
    names = class_names(num_classes)
    classes = [{"id": k, "name": names[k], "color": default_color(k)} for k in range(num_classes)]
    storage.write_text(storage.join(dst, "classes.json"), json.dumps(classes, indent=2))
    return height, width


def synthesize(
    dst: str,
    n: int,
    size: tuple[int, int] = (128, 128),
    num_classes: int = 4,
    seed: int = 0,
    show_progress: bool = True,
) -> str:
    """Writes ``n`` pairs to ``dst/images``, ``dst/masks`` and ``dst/classes.json``.

    Returns:
        ``dst``.
    """
    height, width = start_dataset(dst, n, size, num_classes, min_side=8)

    def write(i: int) -> None:
        # One generator per image: the bytes of image i never depend on n or on thread order.
        rng = np.random.default_rng([seed, i])
        image, mask = make_pair(rng, height, width, num_classes)
        storage.write_bytes(storage.join(dst, "images", f"img_{i:06d}.png"), encode_png(image))
        storage.write_bytes(storage.join(dst, "masks", f"img_{i:06d}.png"), encode_png(mask))

    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in progress(pool.map(write, range(n)), total=n, desc="synth", enabled=show_progress):
            pass
    return dst
