"""Tables of an instance model's output: one row per predicted object, and per-class AP / PQ.

- ``instances.parquet`` (``objects_table``): one row per predicted object of
  an image: ``instance_id`` (its value in ``instances/<id>.png``), class,
  score, box ``(y1, x1, y2, x2)`` in pixel edges (``y2 - y1`` is the height),
  area in pixels, and, where truth exists, the truth object it matched
  (IoU > 0.5, same class: the panoptic matching, greedy by score) and its
  best IoU with a truth object of its class.
- the instance ``per_class`` table (``instance_per_class_frame``): AP, AP50,
  AP75, AR@100, PQ, SQ, RQ and object counts of ``segray.metrics.InstanceMetrics``.

The semantic tables (per-image IoU / Dice, confusion) come from the same
objects through ``segray.metrics.semantic_from_instances``, so a semantic
record is ``ok_record(..., semantic_from_instances(truth, truth_classes),
semantic_from_instances(pred, pred_classes), ...)``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from segray.metrics import InstanceMetrics, match_image, object_boxes

OBJECTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("instance_id", pa.int32()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("score", pa.float32()),
        ("y1", pa.int32()),
        ("x1", pa.int32()),
        ("y2", pa.int32()),
        ("x2", pa.int32()),
        ("area", pa.int64()),
        ("truth_id", pa.int32()),
        ("iou", pa.float64()),
        ("model_id", pa.string()),
    ]
)

INSTANCE_PER_CLASS_SCHEMA = pa.schema(
    [
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("ap", pa.float64()),
        ("ap50", pa.float64()),
        ("ap75", pa.float64()),
        ("ar100", pa.float64()),
        ("pq", pa.float64()),
        ("sq", pa.float64()),
        ("rq", pa.float64()),
        ("truth", pa.int64()),
        ("predicted", pa.int64()),
        ("tp", pa.int64()),
        ("fp", pa.int64()),
        ("fn", pa.int64()),
        ("model_id", pa.string()),
    ]
)


def _name(class_names: list[str] | None, class_id: int) -> str:
    if class_names is not None and 0 <= class_id < len(class_names):
        return str(class_names[class_id])
    return str(class_id)


def objects_table(
    pred_map: npt.ArrayLike,
    pred_classes: npt.ArrayLike,
    pred_scores: npt.ArrayLike,
    truth_map: npt.ArrayLike | None = None,
    truth_classes: npt.ArrayLike | None = None,
    image_id: str = "",
    class_names: list[str] | None = None,
    model_id: str = "",
) -> pa.Table:
    """One row per predicted object of one image (``OBJECTS_SCHEMA``), in instance-id order.

    Args:
        pred_map: ``(H, W)`` predicted ids (object ``k`` has value ``k``).
        pred_classes: class of object ``k`` at ``k - 1``; 0 marks an unused id (no row).
        pred_scores: score of object ``k`` at ``k - 1``.
        truth_map, truth_classes: the truth objects, or None (then ``truth_id`` and ``iou`` are null).
        image_id: written in every row.
        class_names: names by class id (``class_name``; the id as text where missing).
        model_id: the weights' hash, every row's lineage.

    Returns:
        A ``pyarrow.Table``; ``truth_id`` is null for an unmatched object, ``iou`` is the best IoU
        with a truth object of the same class (0.0 when none overlaps).
    """
    pred_classes = np.asarray(pred_classes, np.int64).reshape(-1)
    pred_scores = np.asarray(pred_scores, np.float64).reshape(-1)
    pred = np.asarray(pred_map)
    if truth_map is not None and truth_classes is None:
        raise ValueError(f"image {image_id!r}: a truth map needs its truth classes")
    try:
        if truth_map is None:
            match = match_image(np.zeros(pred.shape, np.int64), np.zeros(0, np.int64), pred, pred_classes, pred_scores)
        else:
            match = match_image(truth_map, truth_classes, pred, pred_classes, pred_scores)
    except (ValueError, TypeError) as e:
        raise type(e)(f"image {image_id!r}: {e}") from None
    keep = np.flatnonzero(pred_classes > 0)
    boxes = object_boxes(pred, len(pred_classes))[keep]
    has_truth = truth_map is not None
    truth_id = match.truth_id[keep]
    columns = {
        "image_id": [str(image_id)] * len(keep),
        "instance_id": (keep + 1).astype(np.int32),
        "class_id": pred_classes[keep].astype(np.int32),
        "class_name": [_name(class_names, int(c)) for c in pred_classes[keep]],
        "score": pred_scores[keep].astype(np.float32),
        "y1": boxes[:, 0], "x1": boxes[:, 1], "y2": boxes[:, 2], "x2": boxes[:, 3],
        "area": match.pred_area[keep],
        "truth_id": pa.array(truth_id.astype(np.int32), mask=~(truth_id > 0) if has_truth else np.ones(len(keep), bool)),
        "iou": pa.array(match.best_iou[keep], mask=np.zeros(len(keep), bool) if has_truth else np.ones(len(keep), bool)),
        "model_id": [model_id] * len(keep),
    }
    return pa.table(columns, schema=OBJECTS_SCHEMA)


def instance_per_class_frame(metrics: InstanceMetrics, class_names: list[str] | None = None, model_id: str = ""):
    """The instance ``per_class`` table as a DataFrame (``INSTANCE_PER_CLASS_SCHEMA``), classes ``1..C-1``."""
    import pandas as pd

    scores = metrics.scores()
    frame = pd.DataFrame({k: v for k, v in scores.items()})
    frame.insert(1, "class_name", [_name(class_names, int(c)) for c in scores["class_id"]])
    frame["model_id"] = model_id
    return frame[INSTANCE_PER_CLASS_SCHEMA.names]
