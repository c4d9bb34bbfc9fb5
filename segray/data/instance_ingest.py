"""``segray ingest`` of an instance dataset: raw layout -> Parquet shards with instance maps + dataset.json.

The same steps as the semantic ingest (``segray.data.ingest``): the driver
lists and pairs (``instance_layouts``), Ray tasks check and write one shard
per chunk and split, only sums come back. A shard row holds the columns of a
semantic shard (``mask`` is the class-id map of the same pixels, so every
semantic reader works on an instance dataset) and two more:

- ``instances``: the instance map, a 16-bit PNG (0 background, objects 1..K);
- ``classes``: list<int32>, the class of object k at index k - 1.

``dataset.json`` gains ``task: "instance"`` and ``objects``: objects per
image, and per class the distribution of object sides (sqrt of the area) and
aspects (box height / width) as histograms on fixed log bins, so that chunks
merge by adding counts, and percentiles read from them (``segray plan``
chooses anchors, RoI and mask sizes and the detection limit from them).
"""

from __future__ import annotations

import json
import math
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from segray import storage
from segray.config import IngestConfig, about
from segray.data.imageio import BadInput, check_pixels, decode_image, encode_png, to_common_range
from segray.data.info import IGNORE_INDEX, ClassInfo
from segray.data.ingest import SPLITS, IngestError, IngestResult, PixelStats, check_source, finish_dataset, info_from_stats, start_pipeline, stats_splits
from segray.data.instance_layouts import ObjectLabels, list_instances, labels_from_coco, labels_from_ids, labels_from_masks
from segray.data.quarantine import errors_uri, write_errors

INSTANCE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("instances", pa.binary()),
        ("classes", pa.list_(pa.int32())),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source_image", pa.string()),
        ("source_mask", pa.string()),
    ]
)

# Histogram bins: object side sqrt(area) in quarter octaves from 1 px (bin i
# covers 2^(i/4) .. 2^((i+1)/4), 64 bins up to 65536 px); aspect h / w in
# quarter octaves from 1/16 to 16 (bin j covers 2^((j-16)/4) .. 2^((j-15)/4)).
SIDE_BINS = 64
ASPECT_BINS = 32
ASPECT_OFFSET = 16


def side_bin(side: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(4 * np.log2(np.maximum(side, 1.0))), 0, SIDE_BINS - 1).astype(np.int64)


def aspect_bin(aspect: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(4 * np.log2(aspect)) + ASPECT_OFFSET, 0, ASPECT_BINS - 1).astype(np.int64)


def object_geometry(ids: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per object 1..K: (area in pixels, box height, box width), each (K,)."""
    area = np.bincount(ids.ravel(), minlength=count + 1)[1:].astype(np.int64)
    ys, xs = np.nonzero(ids)
    labels = ids[ys, xs].astype(np.int64)
    big = np.iinfo(np.int64).max
    y0, x0 = np.full(count + 1, big), np.full(count + 1, big)
    y1, x1 = np.full(count + 1, -1), np.full(count + 1, -1)
    np.minimum.at(y0, labels, ys)
    np.minimum.at(x0, labels, xs)
    np.maximum.at(y1, labels, ys)
    np.maximum.at(x1, labels, xs)
    return area, (y1 - y0 + 1)[1:], (x1 - x0 + 1)[1:]


def _quantile(hist: np.ndarray, q: float, edge) -> float:
    """The ``q`` quantile of a histogram: the geometric middle of the bin where the cumulative count passes it."""
    total = hist.sum()
    if total == 0:
        return 0.0
    k = int(np.searchsorted(np.cumsum(hist), q * total, side="left"))
    return float(math.sqrt(edge(k) * edge(k + 1)))


class ObjectStats:
    """Sums of the objects of one chunk (or of the whole dataset), per split: they merge by adding."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.side = {s: np.zeros((num_classes, SIDE_BINS), np.int64) for s in SPLITS}
        self.aspect = {s: np.zeros((num_classes, ASPECT_BINS), np.int64) for s in SPLITS}
        self.side_sum = {s: np.zeros(num_classes) for s in SPLITS}
        self.side_min = {s: np.full(num_classes, np.inf) for s in SPLITS}
        self.side_max = {s: np.zeros(num_classes) for s in SPLITS}
        self.per_image: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
        self.overlap_pixels = 0
        self.crowd = 0
        self.dropped = 0
        self.clipped = 0

    def add(self, split: str, labels: ObjectLabels) -> None:
        k = labels.count
        self.per_image[split][str(k)] = self.per_image[split].get(str(k), 0) + 1
        self.overlap_pixels += labels.overlap_pixels
        self.crowd += labels.crowd
        self.clipped += labels.clipped
        self.dropped += len(labels.dropped)
        if not k:
            return
        area, height, width = object_geometry(labels.ids, k)
        side = np.sqrt(area)
        classes = labels.classes.astype(np.int64)
        np.add.at(self.side[split], (classes, side_bin(side)), 1)
        np.add.at(self.aspect[split], (classes, aspect_bin(height / width)), 1)
        np.add.at(self.side_sum[split], classes, side)
        np.minimum.at(self.side_min[split], classes, side)
        np.maximum.at(self.side_max[split], classes, side)

    def to_json(self) -> str:
        return json.dumps({
            "side": {s: v.tolist() for s, v in self.side.items()},
            "aspect": {s: v.tolist() for s, v in self.aspect.items()},
            "side_sum": {s: v.tolist() for s, v in self.side_sum.items()},
            "side_min": {s: [x if math.isfinite(x) else None for x in v.tolist()] for s, v in self.side_min.items()},
            "side_max": {s: v.tolist() for s, v in self.side_max.items()},
            "per_image": self.per_image,
            "overlap_pixels": self.overlap_pixels, "crowd": self.crowd, "dropped": self.dropped, "clipped": self.clipped,
        })

    def merge(self, text: str) -> None:
        other = json.loads(text)
        for s in SPLITS:
            self.side[s] += np.asarray(other["side"][s], np.int64)
            self.aspect[s] += np.asarray(other["aspect"][s], np.int64)
            self.side_sum[s] += np.asarray(other["side_sum"][s])
            self.side_min[s] = np.minimum(self.side_min[s], np.asarray([np.inf if x is None else x for x in other["side_min"][s]]))
            self.side_max[s] = np.maximum(self.side_max[s], np.asarray(other["side_max"][s]))
            for k, n in other["per_image"][s].items():
                self.per_image[s][k] = self.per_image[s].get(k, 0) + n
        self.overlap_pixels += other["overlap_pixels"]
        self.crowd += other["crowd"]
        self.dropped += other["dropped"]
        self.clipped += other["clipped"]

    def summary(self, class_names: list[str], splits: list[str], max_instances: int) -> dict[str, Any]:
        """``dataset.json``'s ``objects``: statistics of ``splits`` (the train split, or all when it is empty)."""
        side = sum(self.side[s] for s in splits)
        aspect = sum(self.aspect[s] for s in splits)
        side_sum = sum(self.side_sum[s] for s in splits)
        side_min = np.min([self.side_min[s] for s in splits], axis=0)
        side_max = np.max([self.side_max[s] for s in splits], axis=0)
        per_image: dict[int, int] = {}
        for s in splits:
            for k, n in self.per_image[s].items():
                per_image[int(k)] = per_image.get(int(k), 0) + n
        counts = np.zeros(max(per_image, default=0) + 1, np.int64)
        for k, n in per_image.items():
            counts[k] = n
        images = int(counts.sum())

        def count_quantile(q: float) -> float:
            return float(np.searchsorted(np.cumsum(counts), q * images, side="left")) if images else 0.0

        def side_edge(i: int) -> float:
            return 2.0 ** (i / 4)

        def aspect_edge(j: int) -> float:
            return 2.0 ** ((j - ASPECT_OFFSET) / 4)

        def distribution(s_hist: np.ndarray, a_hist: np.ndarray, n: int, total: float, lo: float, hi: float) -> dict[str, Any]:
            clip = (lambda v: float(min(max(v, lo), hi))) if n else (lambda v: 0.0)
            return {
                "count": n,
                "side": {"min": float(lo) if n else 0.0, "max": float(hi), "mean": total / n if n else 0.0,
                         **{f"p{q}": clip(_quantile(s_hist, q / 100, side_edge)) for q in (5, 10, 50, 90, 95)}},
                "aspect": {f"p{q}": _quantile(a_hist, q / 100, aspect_edge) if n else 1.0 for q in (5, 50, 95)},
                "side_histogram": s_hist.tolist(),
                "aspect_histogram": a_hist.tolist(),
            }

        classes = {}
        for k, name in enumerate(class_names):
            if k == 0:
                continue
            n = int(side[k].sum())
            classes[name] = distribution(side[k], aspect[k], n, float(side_sum[k]), float(side_min[k]) if n else 0.0, float(side_max[k]))
        n_all = int(side[1:].sum())
        seen = side[1:].sum(axis=1) > 0
        everything = distribution(side[1:].sum(axis=0), aspect[1:].sum(axis=0), n_all, float(side_sum[1:].sum()),
                                  float(side_min[1:][seen].min()) if seen.any() else 0.0, float(side_max[1:].max(initial=0.0)))
        return {
            "splits": splits,
            "images": images,
            "count": n_all,
            "per_image": {"mean": float((np.arange(len(counts)) * counts).sum() / images) if images else 0.0,
                          "p50": count_quantile(0.5), "p90": count_quantile(0.9), "p99": count_quantile(0.99),
                          "max": int(len(counts) - 1), "histogram": {str(k): int(n) for k, n in enumerate(counts) if n}},
            "all": everything,
            "classes": classes,
            "max_instances": max_instances,
            "overlap_pixels": self.overlap_pixels,
            "crowd_skipped": self.crowd,
            "dropped": self.dropped,
            "clipped": self.clipped,
            "bins": {"side": "bin i: 2^(i/4) .. 2^((i+1)/4) px, side = sqrt(area)",
                     "aspect": f"bin j: 2^((j-{ASPECT_OFFSET})/4) .. 2^((j-{ASPECT_OFFSET - 1})/4), aspect = box height / width"},
        }


class InstanceChunkWriter:
    """Ray task body: checks the images of one chunk, builds their instance maps, writes their shards."""

    def __init__(self, dst: str, layout: str, classes: list[ClassInfo], run_id: str, max_pixels: int, max_instances: int):
        self.dst, self.layout, self.classes = dst, layout, classes
        self.num_classes = sum(1 for c in classes if c.id != IGNORE_INDEX)
        self.run_id, self.max_pixels, self.max_instances = run_id, max_pixels, max_instances

    def _labels(self, pair: dict[str, Any], height: int, width: int) -> ObjectLabels:
        if self.layout == "coco":
            return labels_from_coco(pair["coco"], height, width, pair["mask_uris"][0], self.max_instances)
        blobs = []
        for uri in pair["mask_uris"]:
            blob = storage.read_bytes(uri)
            if not uri.endswith(".json"):
                try:
                    check_pixels(blob, self.max_pixels)
                except BadInput as e:
                    raise BadInput(f"{uri}: {e}") from None
            blobs.append((uri, blob))
        if self.layout == "instance-ids":
            return labels_from_ids(blobs, self.classes, self.max_pixels, self.max_instances)
        return labels_from_masks(blobs, self.max_pixels, self.max_instances)

    def _process(self, pair: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray, str, ObjectLabels]:
        image_bytes = storage.read_bytes(pair["image_uri"])
        try:
            stored = decode_image(image_bytes, self.max_pixels, keep_dtype=True)
        except BadInput as e:
            raise BadInput(f"{pair['image_uri']}: {e}") from None
        image = to_common_range(stored)
        try:
            labels = self._labels(pair, image.shape[0], image.shape[1])
        except BadInput as e:
            # Name the file the problem is in: the label file, or the image (coco).
            text = str(e)
            where = pair["image_uri"] if self.layout == "coco" else pair["mask_uris"][0]
            raise BadInput(text if where in text or pair["image_uri"] in text else f"{where}: {text}") from None
        if labels.ids.shape != image.shape[:2]:
            raise BadInput(f"instances {pair['mask_uris'][0]} are {labels.ids.shape[1]}x{labels.ids.shape[0]}, "
                           f"image {pair['image_uri']} is {image.shape[1]}x{image.shape[0]}")
        mask = labels.class_map()
        row = {
            "image_id": pair["image_id"],
            "image": image_bytes,
            "mask": encode_png(mask),
            "instances": encode_png(labels.ids.astype(np.uint16)),
            "classes": labels.classes.astype(np.int32).tolist(),
            "height": image.shape[0],
            "width": image.shape[1],
            "source_image": pair["image_uri"],
            "source_mask": "\n".join(pair["mask_uris"]),
        }
        return row, image, mask, str(stored.dtype), labels

    def __call__(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        pixels = PixelStats()
        objects = ObjectStats(self.num_classes)
        out = []
        for pair in _pairs_of(item):
            try:
                row, image, mask, dtype, labels = self._process(pair)
            except BadInput as e:
                out.append({"uri": pair["image_uri"], "reason": str(e), "stats": ""})
                continue
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
                out.append({"uri": pair["image_uri"], "reason": f"{pair['image_uri']}: {type(e).__name__}: {e}", "stats": ""})
                continue
            split = pair["split"]
            rows[split].append(row)
            pixels.add(split, image, mask, dtype)
            objects.add(split, labels)
            out += [{"uri": uri, "reason": reason, "stats": ""} for uri, reason in labels.dropped]
            if split == "val":
                pixels.val_ids.append(pair["image_id"])
        for split, split_rows in rows.items():
            if split_rows:
                table = pa.Table.from_pylist(split_rows, schema=INSTANCE_SCHEMA)
                storage.write_parquet(table, storage.join(self.dst, split, f"part-{item['chunk']:05d}-{self.run_id}.parquet"), row_group_size=64)
        row = pixels.row()
        row["stats"] = json.dumps({"pixels": row["stats"], "objects": objects.to_json()})
        out.append(row)
        return out


def _pairs_of(item: dict[str, Any]) -> list[dict[str, Any]]:
    root = item["root"]

    def uri(name: str) -> str:
        return name if storage.is_absolute(name) else root + name

    return [{"image_id": image_id, "image_uri": uri(image), "mask_uris": [uri(m) for m in masks], "split": "val" if in_val else "train", "coco": coco}
            for image_id, image, masks, in_val, coco in json.loads(item["pairs"])]


def ingest_instances(cfg: IngestConfig, command: str = "") -> IngestResult:
    """Checks every image and its objects under ``cfg.source`` and writes the instance dataset to ``cfg.destination``.

    Raises:
        IngestError: no valid image, or the destination holds files and ``overwrite`` is off.
        ConfigError: a layout, classes file or annotation file that does not fit.
    """
    layout = cfg.instance_layout
    if layout is None:
        raise about("layout", IngestError(f"layout {cfg.layout} is a semantic layout; instance layouts: coco, instance-ids, per-instance"))
    src, dst = cfg.source, cfg.destination
    check_source(cfg)
    plan = list_instances(src, layout, cfg.classes)
    if not plan.pairs:
        raise IngestError(f"{src}: no images with objects found ({len(plan.errors)} rejected inputs); expected the {layout} layout")
    classes = plan.classes
    num_classes = sum(1 for c in classes if c.id != IGNORE_INDEX)
    writer = partial(InstanceChunkWriter, dst, layout, classes, max_pixels=cfg.max_pixels, max_instances=cfg.max_instances)
    annotations = plan.annotations or {}  # a COCO image's own annotations go with it to its chunk
    ds, run = start_pipeline(cfg, plan, command, writer, extra=lambda p: [annotations.get(p.image_id)])
    total_pairs, plan_errors, category_ids = len(plan.pairs), list(plan.errors), plan.category_ids
    del plan, annotations  # the listing is not needed while the pipeline runs
    pixels, objects, found = PixelStats(), ObjectStats(num_classes), []
    for batch in ds.iter_batches(batch_size=256, batch_format="pyarrow"):
        for uri, reason, chunk_stats in zip(*(batch.column(c).to_pylist() for c in ("uri", "reason", "stats"))):
            if chunk_stats:
                both = json.loads(chunk_stats)
                pixels.merge(both["pixels"])
                objects.merge(both["objects"])
            else:
                found.append((uri, reason))
    errors = plan_errors + sorted(found)
    write_errors(dst, errors)
    if not sum(pixels.images.values()):
        raise IngestError(f"{src}: no valid image among {total_pairs} ({len(errors)} rejected; see {errors_uri(dst)})")

    real_names = [c.name for c in classes if c.id != IGNORE_INDEX]
    info = info_from_stats(
        pixels, classes, cfg, run, layout=layout, command=command, errors=len(errors),
        task="instance",
        objects=objects.summary(real_names, stats_splits(pixels), cfg.max_instances),
        extra={"coco_category_ids": category_ids} if category_ids else {},
    )
    return finish_dataset(dst, run.run_id, info, errors)
