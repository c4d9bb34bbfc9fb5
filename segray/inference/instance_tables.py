"""Tables of an instance output that predict and evaluate write alike.

- ``per_class.parquet`` of an instance output (``instance_per_class``): the
  semantic IoU / Dice columns with the instance columns (``ap`` .. ``rq``,
  object counts) joined by class id.
- ``instance_images.parquet`` (``image_quality_table``): one row per scored
  image with its object counts and its panoptic quality over all classes
  (``pq = sum of matched IoUs / (tp + fp / 2 + fn / 2)``, NaN for an image
  with neither truth nor predicted objects): what ``segray report`` ranks
  the worst images by.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from segray import storage

INSTANCES_FILE = "instances.parquet"
INSTANCE_IMAGES_FILE = "instance_images.parquet"
# predict's per_class names the object counts so, beside the semantic columns.
RENAMED = {"truth": "truth_objects", "predicted": "predicted_objects", "tp": "tp_objects", "fp": "fp_objects", "fn": "fn_objects"}

INSTANCE_IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("truth_objects", pa.int64()),
        ("predicted_objects", pa.int64()),
        ("tp", pa.int64()),
        ("fp", pa.int64()),
        ("fn", pa.int64()),
        ("pq", pa.float64()),
        ("sq", pa.float64()),
        ("rq", pa.float64()),
    ]
)


def instance_per_class(semantic, metrics, class_names: list[str], model_id: str):
    """(per_class DataFrame, its Arrow schema): ``semantic`` (predict's IoU / Dice frame) with the instance columns of ``metrics``.

    Background has no instance scores (NaN), so the object counts are float columns.
    """
    from segray.inference.objects import INSTANCE_PER_CLASS_SCHEMA, instance_per_class_frame
    from segray.inference.tables import table_schema

    inst = instance_per_class_frame(metrics, class_names, model_id).drop(columns=["class_name", "model_id"]).rename(columns=RENAMED)
    merged = semantic.merge(inst, on="class_id", how="left")
    fields = list(table_schema("per_class", len(class_names)))
    for f in INSTANCE_PER_CLASS_SCHEMA:
        if f.name not in ("class_id", "class_name", "model_id"):
            fields.append(pa.field(RENAMED.get(f.name, f.name), pa.float64()))
    return merged[[f.name for f in fields]], pa.schema(fields)


def image_quality(record: dict[str, Any]) -> dict[str, Any]:
    """One image's row of ``instance_images`` from its ``InstanceMetrics`` record."""
    tp, fp, fn = len(record["tp_class"]), len(record["fp_class"]), len(record["fn_class"])
    iou_sum = math.fsum(record["tp_iou"])
    denominator = tp + 0.5 * fp + 0.5 * fn
    nan = float("nan")
    return {
        "image_id": record["image_id"], "truth_objects": len(record["truth_classes"]), "predicted_objects": tp + fp,
        "tp": tp, "fp": fp, "fn": fn,
        "pq": iou_sum / denominator if denominator else nan,
        "sq": (iou_sum / tp if tp else 0.0) if denominator else nan,
        "rq": tp / denominator if denominator else nan,
    }


def image_quality_table(records: list[dict[str, Any]]) -> pa.Table:
    """``instance_images`` of ``InstanceMetrics`` records, sorted by image id."""
    rows = sorted((image_quality(r) for r in records), key=lambda r: r["image_id"])
    return pa.Table.from_pylist(rows, schema=INSTANCE_IMAGES_SCHEMA)


def write_image_quality(root: str, records: list[dict[str, Any]]) -> str:
    """Writes ``ROOT/instance_images.parquet``; returns its URI."""
    uri = storage.join(root, INSTANCE_IMAGES_FILE)
    storage.write_parquet(image_quality_table(records), uri)
    return uri
