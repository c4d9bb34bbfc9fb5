"""``segray ingest``: raw layout -> checked Parquet shards + dataset.json.

The driver lists and pairs files (listings only), groups the pairs into chunks
of about ``shard_mb`` of source bytes, and a Ray Data pipeline processes the
chunks in parallel: each task reads its pairs, checks them, and writes one
Parquet shard per split. Only small per-pair metadata comes back to the
driver, so memory does not grow with the dataset. ``dataset.json`` is written
last: a DST without it is not a dataset, whatever else it holds.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from segray import storage
from segray.config import IngestConfig, about
from segray.data.imageio import BadInput, check_pixels, decode_image, encode_png
from segray.data.info import IGNORE_INDEX, ClassInfo, DatasetInfo, default_color
from segray.data.layouts import Plan, build_mask, list_pairs
from segray.data.quarantine import ERRORS_FILE, errors_uri, write_errors
from segray.data.shards import stable_hash
from segray.ownership import claim_folder, clear_owned, refuse_overlap, write_marker
from segray.runtime import bounded_retries

DATASET_FILE = "dataset.json"

SPLITS = ("train", "val")

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source_image", pa.string()),
        ("source_mask", pa.string()),
    ]
)


class IngestError(RuntimeError):
    """Ingest cannot produce a dataset (no valid pair, DST in the way)."""


def split_of(image_id: str, val_fraction: float) -> str:
    """A stable split for ``image_id``: the same id always lands in the same split.

    The id's hash, read as a number in [0, 1), is compared with the fraction,
    so growing the dataset or re-running never moves an earlier id.
    """
    return "val" if stable_hash(image_id) / 2.0**64 < val_fraction else "train"


@dataclass(frozen=True)
class IngestResult:
    """What ``segray.ingest`` returns.

    Attributes:
        dst: the dataset's URI (the config's ``destination``).
        info: the ``DatasetInfo`` written to ``dataset.json``.
        errors: the rejected inputs, ``(uri, reason)``, as in ``_errors.parquet``.
    """

    dst: str
    info: DatasetInfo
    errors: list[tuple[str, str]]


def _chunks(plan: Plan, shard_mb: float, min_chunks: int) -> list[list[dict[str, Any]]]:
    """Groups pairs into chunks of about ``shard_mb`` source bytes, at least ``min_chunks``."""
    total = sum(p.nbytes for p in plan.pairs)
    n_chunks = max(math.ceil(total / (shard_mb * 2**20)), min(min_chunks, len(plan.pairs)), 1)
    target = total / n_chunks
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    per_chunk = math.ceil(len(plan.pairs) / n_chunks)
    for pair in plan.pairs:
        if chunks[-1] and (size + pair.nbytes > target * 1.05 or len(chunks[-1]) >= per_chunk):
            chunks.append([])
            size = 0
        chunks[-1].append({"image_id": pair.image_id, "image_uri": pair.image_uri, "mask_uris": list(pair.mask_uris)})
        size += pair.nbytes
    return chunks


class _ChunkWriter:
    """Ray task body: checks the pairs of one chunk and writes its shards."""

    def __init__(self, dst: str, layout: str, classes: list[ClassInfo] | None, val_fraction: float, run_id: str, max_pixels: int):
        self.max_pixels = max_pixels
        self.dst = dst
        self.layout = layout
        self.classes = classes
        self.val_fraction = val_fraction
        self.run_id = run_id

    def _process_pair(self, pair: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        image_bytes = storage.read_bytes(pair["image_uri"])
        try:
            image = decode_image(image_bytes, self.max_pixels)
        except BadInput as e:
            raise BadInput(f"{pair['image_uri']}: {e}") from None
        blobs = []
        for uri in pair["mask_uris"]:
            blob = storage.read_bytes(uri)
            try:
                check_pixels(blob, self.max_pixels)
            except BadInput as e:
                raise BadInput(f"{uri}: {e}") from None
            blobs.append((uri, blob))
        try:
            mask = build_mask(self.layout, blobs, self.classes, self.max_pixels)
        except BadInput as e:
            raise BadInput(f"{pair['mask_uris'][0]}: {e}") from None
        if mask.shape != image.shape[:2]:
            raise BadInput(
                f"mask {pair['mask_uris'][0]} is {mask.shape[1]}x{mask.shape[0]}, "
                f"image {pair['image_uri']} is {image.shape[1]}x{image.shape[0]}"
            )
        row = {
            "image_id": pair["image_id"],
            "image": image_bytes,
            "mask": encode_png(mask),
            "height": image.shape[0],
            "width": image.shape[1],
            "source_image": pair["image_uri"],
            "source_mask": "\n".join(pair["mask_uris"]),
        }
        return row, image, mask

    def __call__(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        meta = []
        for pair in json.loads(item["pairs"]):
            split = split_of(pair["image_id"], self.val_fraction)
            try:
                row, image, mask = self._process_pair(pair)
            except BadInput as e:
                meta.append(_meta(pair["image_id"], split, pair["image_uri"], str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
                meta.append(_meta(pair["image_id"], split, pair["image_uri"], f"{pair['image_uri']}: {type(e).__name__}: {e}"))
                continue
            rows[split].append(row)
            pixels = image.reshape(-1, 3).astype(np.float64)
            m = _meta(pair["image_id"], split, pair["image_uri"], "")
            m.update(
                height=int(image.shape[0]),
                width=int(image.shape[1]),
                class_counts=np.bincount(mask.ravel(), minlength=256).astype(np.int64).tolist(),
                channel_sum=pixels.sum(0).tolist(),
                channel_sumsq=(pixels**2).sum(0).tolist(),
            )
            meta.append(m)
        for split, split_rows in rows.items():
            if split_rows:
                table = pa.Table.from_pylist(split_rows, schema=SHARD_SCHEMA)
                storage.write_parquet(table, storage.join(self.dst, split, f"part-{item['chunk']:05d}-{self.run_id}.parquet"), row_group_size=64)
        return meta


def _meta(image_id: str, split: str, uri: str, reason: str) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "split": split,
        "uri": uri,
        "reason": reason,
        "height": 0,
        "width": 0,
        "class_counts": [0] * 256,
        "channel_sum": [0.0, 0.0, 0.0],
        "channel_sumsq": [0.0, 0.0, 0.0],
    }


def _prepare_dst(dst: str, overwrite: bool, run_id: str) -> None:
    """An empty destination, or one segray ingested before (with ``overwrite``): only its own files are deleted."""
    if storage.list_files(dst, limit=1):
        if not overwrite:
            raise about("destination", IngestError(f"destination {dst} already holds files; set `overwrite` to replace it whole (nothing was written)"))
        clear_owned(dst, "dataset", "destination", required=(DATASET_FILE,))
    # What this run may leave even if it stops before it lists its files.
    patterns = [rf"(train|val)/part-\d+-{run_id}\.parquet", re.escape(ERRORS_FILE), re.escape(DATASET_FILE)]
    claim_folder(dst, "dataset", "destination", patterns)


def ingest(cfg: IngestConfig, command: str = "") -> IngestResult:
    """Checks every pair under ``cfg.source`` and writes the dataset to ``cfg.destination``.

    Args:
        cfg: what to ingest and how.
        command: the command line that asked for it, recorded in dataset.json.

    Raises:
        IngestError: no valid pair, or the destination holds files and ``overwrite`` is off.
        ConfigError: a layout, classes.json or folder that does not fit.
    """
    import ray

    src, dst, layout, val_fraction = cfg.source, cfg.destination, cfg.layout, cfg.val_fraction
    refuse_overlap(src, "source", dst, "destination")
    if not storage.is_dir(src):
        raise about("source", IngestError(f"source {src} does not exist or is empty"))
    plan = list_pairs(src, layout, cfg.classes, cfg.num_classes, cfg.class_order, cfg.priority, cfg.images_dir)
    if not plan.pairs:
        raise IngestError(f"{src}: no image/mask pairs found ({len(plan.errors)} rejected inputs); expected the {layout} layout")
    run_id = uuid.uuid4().hex[:8]
    _prepare_dst(dst, cfg.overwrite, run_id)

    start = time.time()
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 2
    chunks = _chunks(plan, cfg.shard_mb, min_chunks=2 * max(cpus, 1))
    items = [{"chunk": i, "pairs": json.dumps(c)} for i, c in enumerate(chunks)]
    writer = _ChunkWriter(dst, layout, plan.classes, val_fraction, run_id, cfg.max_pixels)
    # A bad file is an error row, never a task failure; what still fails a task
    # (a lost node, storage down) is retried a bounded number of times.
    with bounded_retries() as retries:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(writer, num_cpus=1, **retries)
    meta = ds.to_pandas()

    good = meta[meta["reason"] == ""]
    bad = meta[meta["reason"] != ""]
    errors = list(plan.errors) + list(zip(bad["uri"], bad["reason"]))
    write_errors(dst, errors)
    if good.empty:
        raise IngestError(f"{src}: no valid pair among {len(plan.pairs)} ({len(errors)} rejected; see {errors_uri(dst)})")

    counts = np.zeros(256, np.int64)  # pixel statistics come from the train split
    seen = np.zeros(256, np.int64)  # the classes from every split
    train_rows = good["split"] == "train"
    stats_rows = good[train_rows] if train_rows.any() else good
    for c, is_train in zip(good["class_counts"], train_rows if train_rows.any() else [True] * len(good)):
        c = np.asarray(c, np.int64)
        seen += c
        if is_train:
            counts += c
    classes = plan.classes
    if classes is None:
        # Over all splits: a class seen only in val must still be a class the model
        # predicts, or scoring it would fail after the first epoch.
        present = np.nonzero(seen[:IGNORE_INDEX])[0]
        top = int(present.max()) if present.size else 0
        classes = [ClassInfo(k, "background" if k == 0 else f"class_{k}", tuple(default_color(k))) for k in range(top + 1)]
    real = [c for c in classes if c.id != IGNORE_INDEX]
    n_pix = float(sum(stats_rows["height"] * stats_rows["width"]))
    csum = np.sum(np.stack(stats_rows["channel_sum"].to_numpy()), axis=0)
    csq = np.sum(np.stack(stats_rows["channel_sumsq"].to_numpy()), axis=0)
    mean = csum / n_pix
    std = np.sqrt(np.maximum(csq / n_pix - mean**2, 1e-12))
    labelled = counts[: len(real)].sum()
    sizes = set(zip(good["height"], good["width"]))
    info = DatasetInfo(
        classes=classes,
        splits={s: int((good["split"] == s).sum()) for s in SPLITS},
        pixel_counts=[int(x) for x in counts[: len(real)]],
        pixel_frequency={c.name: float(counts[c.id] / labelled) if labelled else 0.0 for c in real},
        mean=[float(x) for x in mean],
        std=[float(x) for x in std],
        layout=layout,
        source=src,
        command=command,
        size=[int(x) for x in next(iter(sizes))] if len(sizes) == 1 else None,
        errors=len(errors),
        priority=plan.priority,
        val_fraction=val_fraction,
        extra={"ignored_pixels": int(counts[IGNORE_INDEX]), "seconds": round(time.time() - start, 2), "shards": len(chunks)},
        config=cfg.to_dict(),
    )
    storage.write_text(storage.join(dst, DATASET_FILE), info.to_json())
    write_marker(dst, "dataset")
    return IngestResult(dst, info, errors)
