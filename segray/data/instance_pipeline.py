"""The training input of an instance dataset: shards -> decode -> fit -> augment -> renumber -> rows.

Beside the semantic pipeline (``segray.data.pipeline``), with its shard
reading and decoding tasks; the rows follow the instance batch contract:

- ``image``: (H, W, 3) uint8 (float32 on the 0..255 scale for datasets of
  16-bit or float files, as ``pipeline.image_dtype`` says), not normalised;
- ``instances``: (H, W) int32, 0 background, objects 1..K numbered
  contiguously after augmentation and cropping;
- ``classes``: (M,) int32, the class (>= 1) of object k at k - 1, 0 as
  padding; M = ``max_instances`` (the dataset's, from ``dataset.json``).

Boxes and per-object masks are derived from ``instances`` by the model, so
augmentation only moves the id map with the image (``instance_transforms``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segray import storage
from segray.data.imageio import decode_image
from segray.data.info import DatasetInfo, load_dataset_info
from segray.data.instance_transforms import MIN_AREA, fit_instances, renumber, sample_instances
from segray.data.pipeline import DecodeBatch, PipelineConfig, image_dtype, prepare_worker, row_bytes, rows_per_batch, split_uri
from segray.data.shards import decode_tasks, read_shards

INSTANCE_COLUMNS = ["image_id", "image", "instances", "classes"]
# Spatial augmentations the instance pipeline applies (the rest of augment_set is intensity).
INSTANCE_AUGMENT = ("flip", "rot90", "scale", "rotate", "elastic", "brightness", "contrast", "gamma", "noise", "blur")


def decode_instances(data: bytes) -> np.ndarray:
    """A shard's instance map (16-bit PNG) -> (H, W) uint16."""
    import cv2

    ids = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if ids is None or ids.ndim != 2:
        raise ValueError(f"instances: not a one-channel PNG ({len(data)} bytes)")
    return ids.astype(np.uint16, copy=False)


class DecodeInstances(DecodeBatch):
    """``map_batches`` body: encoded rows -> fitted, augmented rows of the instance batch contract.

    ``config.augment_set`` names the augmentations (``sample_instances``);
    ``config.crop`` cuts random windows; ``config.patches_per_image`` windows per image.
    """

    def __init__(self, config: PipelineConfig, dtype: np.dtype, max_instances: int, min_area: int = MIN_AREA):
        super().__init__(config, dtype)
        self.max_instances = max_instances
        self.min_area = min_area

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.config
        prepare_worker()
        images, maps, classes, ids = [], [], [], []
        out = tuple(cfg.crop or cfg.size)
        for image_id, image_bytes, instance_bytes, object_classes in zip(batch["image_id"], batch["image"], batch["instances"], batch["classes"]):
            image = decode_image(image_bytes, max_pixels=None).astype(self.dtype, copy=False)
            instance_map = decode_instances(instance_bytes)
            image, instance_map = fit_instances(image, instance_map, tuple(cfg.size), cfg.fit)
            object_classes = np.asarray(object_classes, np.int32)
            rng = self._rng(str(image_id)) if (cfg.augment or cfg.crop) else None
            chosen = tuple(cfg.augment_set) if cfg.augment else ()
            for _ in range(cfg.patches_per_image if cfg.crop else 1):
                patch, labels = sample_instances(image, instance_map, out, rng, chosen, cfg.augment_strength)
                labels, kept = renumber(labels, object_classes, self.min_area)
                if len(kept) > self.max_instances:
                    raise ValueError(f"{image_id}: {len(kept)} objects, more than max_instances {self.max_instances}")
                padded = np.zeros(self.max_instances, np.int32)
                padded[: len(kept)] = kept
                images.append(patch)
                maps.append(labels)
                classes.append(padded)
                ids.append(image_id)
        return {"image_id": np.asarray(ids), "image": np.stack(images), "instances": np.stack(maps).astype(np.int32),
                "classes": np.stack(classes)}


def read_instances(
    dataset: str,
    split: str,
    size: tuple[int, int] | None = None,
    crop: tuple[int, int] | None = None,
    augment: bool = False,
    seed: int = 0,
    fit_mode: str = "resize",
    info: DatasetInfo | None = None,
    batch_size: int | None = None,
    part: tuple[int, int] | None = None,
    augment_strength: float = 1.0,
    augment_set: tuple[str, ...] | list[str] = ("flip", "rot90", "scale", "brightness", "contrast"),
    patches_per_image: int = 1,
    max_instances: int | None = None,
    min_area: int = MIN_AREA,
) -> Any:
    """A Ray Dataset of one split of an instance dataset, in the instance batch contract.

    Args: as ``pipeline.read_split``, and
        max_instances: M, the length of each row's ``classes``; default the
            dataset's ``objects.max_instances`` (ingest set aside images with more).
        min_area: objects left with fewer pixels after fitting and cropping are dropped.

    Returns:
        ``ray.data.Dataset`` of ``image_id``, ``image`` (H, W, 3), ``instances``
        int32 (H, W) and ``classes`` int32 (M,); see the module's docstring.

    Raises:
        ValueError: the dataset is not an instance dataset.
        FileNotFoundError: not an ingested dataset, or the split is empty.
    """
    info = info or load_dataset_info(dataset)
    if info.task != "instance":
        raise ValueError(f"{dataset}: task {info.task!r}, not an instance dataset (ingest it with an instance layout: coco, instance-ids, per-instance)")
    size = tuple(size or info.size or (256, 256))
    uri = split_uri(dataset, split)
    shards = [f for f in storage.list_files(uri) if f.uri.endswith(".parquet")]
    if not shards:
        raise FileNotFoundError(f"{dataset}: split {split!r} has no shards under {uri}")
    config = PipelineConfig(size=size, crop=tuple(crop) if crop else None, augment=augment, seed=seed, fit=fit_mode,  # type: ignore[arg-type]
                            augment_strength=augment_strength, augment_set=tuple(augment_set), patches_per_image=patches_per_image)
    limit = max_instances or int((info.objects or {}).get("max_instances", 256))
    dtype = image_dtype(info)
    out = tuple(crop or size)
    batch_size = batch_size or rows_per_batch(out, dtype)
    decode = DecodeInstances(config, dtype, limit, min_area)
    cpus = cluster_cpus()
    if len(shards) < cpus:
        rows = info.splits.get(split, 0) // (part[1] if part else 1)
        batch_size = max(4, min(batch_size, -(-rows // (2 * cpus)))) if rows else batch_size
        return read_shards(shards, INSTANCE_COLUMNS, part=part).map_batches(decode, batch_size=batch_size, batch_format="numpy")
    ds = read_shards(shards, INSTANCE_COLUMNS, part=part, transform=decode, rows_per_block=batch_size, tasks=decode_tasks(shards, cpus))
    ds.context.op_resource_reservation_enabled = False  # as in pipeline.read_split
    # Rows carry an int32 id map: four times the bytes of a class mask.
    ds.context.target_max_block_size = max(1, int(0.75 * batch_size * max(1, patches_per_image if crop else 1) * (row_bytes(out, dtype) + 3 * out[0] * out[1])))
    return ds


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this driver is connected to (this machine's when none is yet)."""
    import os

    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1
