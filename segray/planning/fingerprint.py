"""A dataset's fingerprint: what the plan's rules need to know about its train split.

One pass over (a sample of) the train split's shards, on the driver, without
Ray: image sizes, per-channel intensity percentiles, per-class pixel
frequency, and a typical object size per class from connected components
(nnU-Net's "dataset fingerprint", in 2D and for RGB).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segray import storage
from segray.config import Config, ConfigError, about
from segray.data import IGNORE_INDEX, DatasetInfo, load_dataset_info

# Images decoded for the fingerprint at most: sizes and frequencies settle
# long before, and a large train split must not make planning slow.
MAX_IMAGES = 64
# Pixels per channel kept per image for the intensity percentiles.
PIXELS_PER_IMAGE = 10_000


@dataclass(frozen=True)
class ClassFingerprint(Config):
    """One class in the train split.

    Attributes:
        name: the class's name.
        frequency: share of counted pixels (ignored pixels left out).
        images: share of sampled images in which the class appears.
        object_size: median side (sqrt of area) in pixels of its connected
            components; 0 when it never appears.
        object_size_p90: 90th percentile of the same.
    """

    name: str
    frequency: float
    images: float
    object_size: float
    object_size_p90: float


@dataclass(frozen=True)
class Fingerprint(Config):
    """What ``fingerprint`` found.

    Attributes:
        train_images: images in the train split (all of them, from dataset.json).
        sampled_images: images decoded for the rest.
        median_size: ``[H, W]``, the median image size.
        min_size: ``[H, W]``, the smallest height and width seen.
        max_size: ``[H, W]``, the largest.
        channels: image channels the pipeline feeds the model (3).
        percentiles: per channel, the 0.5, 50 and 99.5 intensity percentiles.
        mean: per channel, the mean intensity (dataset.json's).
        std: per channel, the standard deviation (dataset.json's).
        classes: one entry per class, by id.
        objects: instance datasets: the object statistics of dataset.json
            (objects per image, side and aspect per class) the rules used.
    """

    train_images: int
    sampled_images: int
    median_size: list[int]
    min_size: list[int]
    max_size: list[int]
    channels: int
    percentiles: list[list[float]]
    mean: list[float]
    std: list[float]
    classes: list[ClassFingerprint] = field(default_factory=list)
    objects: dict[str, Any] | None = None  # instance datasets: dataset.json's object statistics

    @property
    def frequencies(self) -> np.ndarray:
        return np.asarray([c.frequency for c in self.classes], np.float64)


def _component_sizes(mask: np.ndarray, class_id: int) -> np.ndarray:
    """Sides (sqrt of pixel area) of the 8-connected components of ``class_id`` in ``mask``."""
    import cv2

    binary = (mask == class_id).astype(np.uint8)
    if not binary.any():
        return np.zeros(0)
    count, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    return np.sqrt(stats[1:count, cv2.CC_STAT_AREA].astype(np.float64))


def fingerprint(data: str, info: DatasetInfo | None = None, max_images: int = MAX_IMAGES, seed: int = 0) -> Fingerprint:
    """One pass over (a sample of at most ``max_images`` of) the train split of ``data``.

    Raises:
        ConfigError: the dataset has fewer than 2 classes, or its train split is empty.
    """
    from segray.data import decode_image, decode_mask, split_uri

    info = info or load_dataset_info(data)
    if info.num_classes < 2:
        raise about("data", ConfigError(f"data {data}: only one class ({', '.join(info.class_names)}); segmentation needs at least 2"))
    n_train = info.splits.get("train", 0)
    shards = [f.uri for f in storage.list_files(split_uri(data, "train")) if f.uri.endswith(".parquet")] if n_train else []
    if not shards:
        raise about("data", ConfigError(f"data {data}: the train split is empty; nothing to plan from"))
    rng = np.random.default_rng(seed)
    # Which images: an even share from every shard, so a sample is not one shard's.
    per_shard = max(1, -(-max_images // len(shards)))
    C = info.num_classes
    sizes, samples, seen_in, counts = [], [[] for _ in range(3)], np.zeros(C), np.zeros(C, np.int64)
    objects: list[list[np.ndarray]] = [[] for _ in range(C)]
    for uri in shards:
        table = storage.read_parquet(uri, columns=["image", "mask"])
        rows = rng.permutation(table.num_rows)[:per_shard]
        images, masks = table.column("image"), table.column("mask")
        for r in rows:
            if len(sizes) >= max_images:
                break
            image = decode_image(images[int(r)].as_py(), max_pixels=None)
            mask = decode_mask(masks[int(r)].as_py(), max_pixels=None)
            sizes.append(mask.shape[:2])
            flat = image.reshape(-1, image.shape[2] if image.ndim == 3 else 1)
            pick = rng.integers(0, len(flat), min(PIXELS_PER_IMAGE, len(flat)))
            for ch in range(min(3, flat.shape[1])):
                samples[ch].append(flat[pick, ch].astype(np.float32))
            present = np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=C)[:C]
            counts += present
            seen_in += present > 0
            for k in np.flatnonzero(present):
                objects[k].append(_component_sizes(mask, int(k)))
    sizes_a = np.asarray(sizes)
    values = [np.concatenate(s) if s else np.zeros(1, np.float32) for s in samples]
    if len(samples[1]) == 0:  # one-channel images are fed as 3 equal channels
        values = [values[0]] * 3
    total = max(1, int(counts.sum()))
    classes = []
    for k, name in enumerate(info.class_names):
        o = np.concatenate(objects[k]) if objects[k] else np.zeros(0)
        classes.append(ClassFingerprint(
            name=name,
            frequency=float(counts[k] / total),
            images=float(seen_in[k] / len(sizes)),
            object_size=float(np.median(o)) if o.size else 0.0,
            object_size_p90=float(np.percentile(o, 90)) if o.size else 0.0,
        ))
    return Fingerprint(
        train_images=n_train,
        sampled_images=len(sizes),
        median_size=[int(v) for v in np.median(sizes_a, axis=0)],
        min_size=[int(v) for v in sizes_a.min(axis=0)],
        max_size=[int(v) for v in sizes_a.max(axis=0)],
        channels=3,
        percentiles=[[float(np.percentile(v, q)) for q in (0.5, 50, 99.5)] for v in values],
        mean=[float(m) for m in info.mean],
        std=[float(s) for s in info.std],
        classes=classes,
    )


def missing_classes(fp: Fingerprint) -> list[str]:
    """Names of the classes with no pixel in the sampled train images."""
    return [c.name for c in fp.classes if c.frequency == 0]


def warn_missing(fp: Fingerprint, data: str) -> None:
    missing = missing_classes(fp)
    if missing:
        warnings.warn(
            f"data {data}: class(es) {', '.join(missing)} have no pixels in the {fp.sampled_images} sampled train images; "
            "the model cannot learn them (check the masks or the class list)",
            stacklevel=3,
        )


def as_dict(fp: Fingerprint) -> dict[str, Any]:
    return fp.to_dict()
