"""A synthetic instance dataset: overlapping shapes, one id per object, in the raw ``instance-ids`` layout.

Circles, rectangles and triangles (one class per kind) lie on the textured,
noisy backgrounds of ``synthetic``; later shapes lie over earlier ones, so
objects touch and hide parts of each other, and every object keeps its own
id. Written: ``images/<id>.png``, ``instances/<id>.png`` (16-bit ids),
``instance_classes/<id>.json`` (object id -> class id) and ``classes.json``.
The same seed gives the same bytes.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from segray import storage
from segray.data.imageio import encode_png
from segray.data.info import default_color
from segray.data.synthetic import SHAPES, start_dataset
from segray.progress import progress


def _shade(k: int) -> np.ndarray:
    return 0.5 * np.array(default_color(k), np.float32) + 100.0


def make_instances(rng: np.random.Generator, height: int, width: int, num_classes: int, max_objects: int = 8) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """One (image (H, W, 3) uint8, instance map (H, W) uint16, object id -> class id).

    Objects that later shapes cover completely are left out, and ids are
    1..K in drawing order.
    """
    coarse = rng.uniform(60, 140, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    ids = np.zeros((height, width), np.uint16)
    scale = min(height, width)
    classes: dict[int, int] = {}
    for obj in range(1, int(rng.integers(1, max_objects + 1)) + 1):
        k = int(rng.integers(1, num_classes))
        shape = np.zeros((height, width), np.uint8)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        r = int(rng.integers(max(2, scale // 14), max(3, scale // 5)))
        kind = SHAPES[(k - 1) % 3]
        if kind == "circle":
            cv2.circle(shape, (cx, cy), r, 1, -1)
        elif kind == "rectangle":
            h2, w2 = int(r * rng.uniform(0.4, 1.2)), int(r * rng.uniform(0.4, 1.2))
            cv2.rectangle(shape, (cx - w2, cy - h2), (cx + w2, cy + h2), 1, -1)
        else:
            angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2])
            pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).astype(np.int32)
            cv2.fillPoly(shape, [pts], 1)
        inside = shape.astype(bool)
        if not inside.any():
            continue
        # Each object its own shade of its class's colour, so touching objects of a class can be told apart.
        shade = _shade(k) + rng.normal(0, 18, 3).astype(np.float32)
        image[inside] = shade + rng.normal(0, 10, (int(inside.sum()), 3)).astype(np.float32)
        ids[inside] = obj
        classes[obj] = k
    present = [int(v) for v in np.unique(ids) if v]
    lookup = np.zeros(max(classes, default=0) + 1, np.uint16)
    lookup[present] = np.arange(1, len(present) + 1)
    return np.clip(image, 0, 255).astype(np.uint8), lookup[ids], {i + 1: classes[v] for i, v in enumerate(present)}


def synthesize_instances(
    dst: str,
    n: int,
    size: tuple[int, int] = (128, 128),
    num_classes: int = 4,
    seed: int = 0,
    show_progress: bool = True,
) -> str:
    """Writes ``n`` images with their instance maps to ``dst`` in the ``instance-ids`` layout.

    Returns:
        ``dst``.
    """
    height, width = start_dataset(dst, n, size, num_classes, min_side=16)

    def write(i: int) -> None:
        rng = np.random.default_rng([seed, i, 27])
        image, ids, object_classes = make_instances(rng, height, width, num_classes)
        name = f"img_{i:06d}"
        storage.write_bytes(storage.join(dst, "images", f"{name}.png"), encode_png(image))
        storage.write_bytes(storage.join(dst, "instances", f"{name}.png"), encode_png(ids))
        storage.write_text(storage.join(dst, "instance_classes", f"{name}.json"), json.dumps({str(k): v for k, v in object_classes.items()}))

    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in progress(pool.map(write, range(n)), total=n, desc="synth", enabled=show_progress):
            pass
    return dst
