"""The training input pipeline: Parquet shards -> decode -> fit -> augment -> batches.

Decoding runs with OpenCV in ``map_batches`` on CPU workers (faster than
``read_images``, ray issue 37499), and the result is a Ray Dataset of
``image`` (H, W, 3) and ``mask`` uint8 (H, W), every row of the same size.
Images stay uint8 (float32 on the 0..255 scale when the dataset holds 16-bit
or float files): casting and normalising with the dataset's mean and std
happen in the training step (``transforms.normalize_tf``), so the object
store moves a quarter of the bytes of normalised float32.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from segray import storage
from segray.data.imageio import decode_image, decode_mask
from segray.data.info import DatasetInfo, load_dataset_info
from segray.data.shards import decode_tasks, read_shards, stable_hash
from segray.data.transforms import FitMode, augment, class_pixels, fit, random_crop, sample_patch

# Decoded bytes per map_batches batch: large enough that Ray's per-task and
# per-block overhead is small beside the decoding, small enough to stream.
BATCH_BYTES = 8 * 2**20


def image_dtype(info: DatasetInfo) -> np.dtype:
    """uint8 when ingest saw only 8-bit files, else float32 (the 0..255 scale keeps 16-bit fractions).

    One dtype per dataset: Ray Data casts a column to one dtype when it joins
    blocks, so mixing them would silently round 16-bit images to 8 bits.
    """
    seen = set((info.extra or {}).get("dtypes", {"uint8": 1}))
    return np.dtype(np.uint8) if seen <= {"uint8"} else np.dtype(np.float32)


def row_bytes(size: tuple[int, int], dtype: np.dtype, channels: int = 3) -> int:
    """Bytes of one decoded row: the image of ``dtype`` and a uint8 mask."""
    return size[0] * size[1] * (channels * np.dtype(dtype).itemsize + 1)


def rows_per_batch(size: tuple[int, int], dtype: np.dtype, channels: int = 3) -> int:
    """Rows of one decode batch from the image size: about ``BATCH_BYTES`` of images and masks, 4 to 256 rows."""
    return int(min(256, max(4, BATCH_BYTES // row_bytes(size, dtype, channels))))


@dataclass(frozen=True)
class PipelineConfig:
    size: tuple[int, int]
    crop: tuple[int, int] | None = None
    augment: bool = False
    seed: int = 0
    fit: FitMode = "resize"
    augment_strength: float = 1.0
    augment_set: tuple[str, ...] = ("flip", "rot90", "scale", "brightness", "contrast")
    patches_per_image: int = 1
    foreground_oversample: float = 0.0
    class_draw: tuple[float, ...] = ()

    @property
    def patches(self) -> bool:
        """Patch sampling (``transforms.sample_patch``) rather than augment-then-crop.

        Taken with ``crop`` when any of the plan's recipe is asked for; the
        older path stays for configs that ask for none of it.
        """
        basic = set(self.augment_set) <= {"flip", "rot90", "scale", "brightness", "contrast"}
        return bool(self.crop) and (self.patches_per_image > 1 or self.foreground_oversample > 0 or not basic)


_WORKER_READY = False


def _prepare_worker() -> None:
    """Once per process: one OpenCV thread, since Ray already runs a task per core.

    The task keeps Ray's worker niceness (15): beside a training worker (at
    0, ``normal_priority``) decoding takes the cycles the step leaves, and
    the prefetched batches absorb the difference. At niceness 0 it took them
    from the step instead (pipeline / step-only 0.905 against 0.976 before,
    benchmarks/train_throughput.py).
    """
    global _WORKER_READY
    if not _WORKER_READY:
        import cv2

        cv2.setNumThreads(1)
        _WORKER_READY = True


# Draws per image in this worker process. Ray Data re-runs the pipeline every
# epoch; counting the draws gives each epoch fresh augmentations while a seed
# still fixes the sequence an image sees within one process.
_DRAWS: dict[tuple[int, str], int] = defaultdict(int)



def reset_draws() -> None:
    """Forgets this process's draws: the next pass over a split sees the augmentations of a first epoch again."""
    _DRAWS.clear()

class DecodeBatch:
    """``map_batches`` body: encoded rows -> decoded, fitted, augmented rows (``dtype`` images, uint8 masks)."""

    def __init__(self, config: PipelineConfig, dtype: np.dtype = np.dtype(np.uint8)):
        self.config = config
        self.dtype = np.dtype(dtype)

    def _rng(self, image_id: str) -> np.random.Generator:
        key = (self.config.seed, image_id)
        draw = _DRAWS[key]
        _DRAWS[key] += 1
        return np.random.default_rng([self.config.seed, stable_hash(image_id), draw])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.config
        _prepare_worker()
        images, masks, ids = [], [], []
        for image_id, image_bytes, mask_bytes in zip(batch["image_id"], batch["image"], batch["mask"]):
            # Ingest checked every image against its max_pixels before it wrote the shard.
            image = decode_image(image_bytes, max_pixels=None).astype(self.dtype, copy=False)
            mask = decode_mask(mask_bytes, max_pixels=None)
            image, mask = fit(image, mask, cfg.size, cfg.fit)
            if cfg.patches:
                rng = self._rng(str(image_id))
                foreground = class_pixels(mask) if cfg.foreground_oversample > 0 else None
                chosen = cfg.augment_set if cfg.augment else ()
                for _ in range(cfg.patches_per_image):
                    patch, labels = sample_patch(
                        image, mask, cfg.crop, rng, chosen, cfg.augment_strength, cfg.foreground_oversample, foreground, cfg.class_draw
                    )
                    images.append(patch)
                    masks.append(labels)
                    ids.append(image_id)
                continue
            if cfg.augment or cfg.crop:
                rng = self._rng(str(image_id))
                if cfg.augment:
                    image, mask = augment(image, mask, rng, strength=cfg.augment_strength)
                if cfg.crop:
                    image, mask = random_crop(image, mask, cfg.crop, rng)
            images.append(image)
            masks.append(mask)
            ids.append(image_id)
        return {"image_id": np.asarray(ids), "image": np.stack(images), "mask": np.stack(masks)}


def split_uri(dataset: str, split: str) -> str:
    return storage.join(dataset, split)


def read_split(
    dataset: str,
    split: str,
    size: tuple[int, int] | None = None,
    crop: tuple[int, int] | None = None,
    augment: bool = False,
    seed: int = 0,
    fit_mode: FitMode = "resize",
    info: DatasetInfo | None = None,
    batch_size: int | None = None,
    part: tuple[int, int] | None = None,
    augment_strength: float = 1.0,
    augment_set: tuple[str, ...] | list[str] = ("flip", "rot90", "scale", "brightness", "contrast"),
    patches_per_image: int = 1,
    foreground_oversample: float = 0.0,
    class_draw: tuple[float, ...] | list[float] = (),
) -> Any:
    """A Ray Dataset of decoded pairs of one split of an ingested dataset.

    Args:
        dataset: the ingested dataset's URI (holds dataset.json).
        split: "train" or "val".
        size: (H, W) every pair is fitted to; default the dataset's own size
            when all images share it, else (256, 256).
        crop: (H, W) random crops taken after fitting (training).
        augment_strength: multiplies the augmentation's magnitudes (``transforms.augment``).
        augment_set, patches_per_image, foreground_oversample, class_draw: the
            patch recipe (``transforms.sample_patch``; ``PipelineConfig.patches``
            says when it applies); ``class_draw`` weighs the class an
            oversampled patch centres on (``training.trainer.class_draw_for``).
        batch_size: rows per decode task batch; default from the image size
            (``rows_per_batch``).
        part: (index, count): only the ids whose stable hash modulo ``count``
            is ``index``, filtered before decoding. The parts cover the split
            exactly once, unlike an equal split, which drops the remainder.

    Returns:
        ``ray.data.Dataset`` with ``image_id``, ``image`` (H, W, 3) uint8
        (float32 on the 0..255 scale for datasets of 16-bit or float files;
        see ``image_dtype``), not normalised, and ``mask`` uint8 (H, W).

    Raises:
        FileNotFoundError: not an ingested dataset, or the split is empty.
    """
    info = info or load_dataset_info(dataset)
    size = tuple(size or info.size or (256, 256))
    uri = split_uri(dataset, split)
    shards = [f for f in storage.list_files(uri) if f.uri.endswith(".parquet")]
    if not shards:
        raise FileNotFoundError(f"{dataset}: split {split!r} has no shards under {uri}")
    config = PipelineConfig(size=size, crop=crop, augment=augment, seed=seed, fit=fit_mode, augment_strength=augment_strength,
                            augment_set=tuple(augment_set), patches_per_image=patches_per_image,
                            foreground_oversample=foreground_oversample, class_draw=tuple(class_draw))
    dtype = image_dtype(info)
    batch_size = batch_size or rows_per_batch(tuple(crop or size), dtype)
    # Decoded in the read tasks: a separate map operator moved every encoded
    # row through the object store and ran as a second set of tasks.
    decode = DecodeBatch(config, dtype)
    cpus = _cluster_cpus()
    if len(shards) < cpus:
        # Fewer shards than cores: decoding in the read tasks (one per shard)
        # would leave cores idle; a separate operator spreads the rows, in
        # batches small enough that every core gets some of a small split.
        rows = info.splits.get(split, 0) // (part[1] if part else 1)
        batch_size = max(4, min(batch_size, -(-rows // (2 * cpus)))) if rows else batch_size
        ds = read_shards(shards, ["image_id", "image", "mask"], part=part)
        return ds.map_batches(decode, batch_size=batch_size, batch_format="numpy")
    ds = read_shards(shards, ["image_id", "image", "mask"], part=part, transform=decode, rows_per_block=batch_size,
                     tasks=decode_tasks(shards, cpus))
    # The dataset is one operator: Ray Data's per-operator reservation of CPUs
    # (meant to keep one stage of several from starving the others) held it to
    # about one task at a time on 2 cores (steady rate 400 -> 650-1080 images/s
    # without it in benchmarks/input_pipeline.py's setting).
    ds.context.op_resource_reservation_enabled = False
    # A read task's blocks leave it as the transform makes them. Ray Data
    # otherwise gathers a task's output up to target_max_block_size (128 MiB)
    # and copies it into one block at the task's end, so the consumer saw
    # nothing of a task until all its shards were decoded. The buffer passes a
    # block on once it holds more than this (and slices one of 1.5x it or
    # more), so three quarters of a full transform block keeps them as made.
    out_rows = batch_size * max(1, patches_per_image if config.patches else 1)
    ds.context.target_max_block_size = max(1, int(0.75 * out_rows * row_bytes(tuple(crop or size), dtype)))
    return ds


def _cluster_cpus() -> int:
    """CPUs of the Ray cluster this driver is connected to (this machine's when none is yet)."""
    import os

    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


# Shared with the instance pipeline (segray.data.instance_pipeline).
prepare_worker = _prepare_worker
