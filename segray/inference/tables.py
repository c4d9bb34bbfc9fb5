"""Per-image records and the tables made from them.

Each processed image leaves one record: its id, a status, and its confusion
matrix in sparse form (the non-zero cells ``truth * 256 + prediction`` and
their pixel counts; ignored truth pixels are not counted). Sparse cells keep
a record small whatever the number of classes, and every table is an exact
function of the records:

- ``per_image.parquet``: one row per image and class, ``tp``/``fp``/``fn``/
  ``support`` and ``iou``/``dice`` (NaN where the class is in neither truth
  nor prediction);
- ``per_class.parquet``: scores of the summed confusion matrix;
- ``confusion.parquet``: the summed C x C int64 matrix, rows truth, columns
  prediction (``pred_<id>``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from segray import storage
from segray.metrics import (
    SparseCellError,
    counts_from_sparse,
    decode_cells,
    dice,
    dice_from_counts,
    iou,
    iou_from_counts,
    mean_of_images,
    precision,
    recall,
    sparse_confusion,
    summary,
)

OK, ERROR = "ok", "error"

RECORD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("has_truth", pa.bool_()),
        ("cm_cells", pa.list_(pa.int32())),
        ("cm_counts", pa.list_(pa.int64())),
        ("run", pa.int64()),
    ]
)
PER_IMAGE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("tp", pa.int64()),
        ("fp", pa.int64()),
        ("fn", pa.int64()),
        ("support", pa.int64()),
        ("iou", pa.float64()),
        ("dice", pa.float64()),
        ("model_id", pa.string()),
    ]
)
PER_CLASS_SCHEMA = pa.schema(
    [
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("iou", pa.float64()),
        ("dice", pa.float64()),
        ("precision", pa.float64()),
        ("recall", pa.float64()),
        ("support", pa.int64()),
        ("model_id", pa.string()),
    ]
)


def ok_record(image_id: str, uri: str, height: int, width: int, truth: np.ndarray | None, pred: np.ndarray, ignore_index: int | None, run: int) -> dict[str, Any]:
    """The record of an image that was processed (``truth`` None: segmented only)."""
    if truth is None or truth.size == 0:
        cells, counts = np.zeros(0, np.int32), np.zeros(0, np.int64)
        has_truth = False
    else:
        cells, counts = sparse_confusion(truth, pred, ignore_index)
        has_truth = True
    return {
        "image_id": image_id, "uri": uri, "status": OK, "reason": "", "height": int(height), "width": int(width),
        "has_truth": has_truth, "cm_cells": cells.tolist(), "cm_counts": counts.tolist(), "run": run,
    }


def error_record(image_id: str, uri: str, reason: str, run: int) -> dict[str, Any]:
    return {
        "image_id": image_id, "uri": uri, "status": ERROR, "reason": reason, "height": 0, "width": 0,
        "has_truth": False, "cm_cells": [], "cm_counts": [], "run": run,
    }


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def latest_records(table: pa.Table) -> pa.Table:
    """One record per image: the latest run's ``ok`` record, else its latest error.

    Records repeat when an image was processed again (an error retried on a
    re-run, or a task retried by Ray); keeping one per id is what makes a
    resumed run's tables equal an uninterrupted run's.
    """
    if table.num_rows == 0:
        return table
    import pyarrow.compute as pc

    ok = pc.equal(table["status"], OK)
    order = pc.sort_indices(
        table.append_column("_ok", ok).append_column("_row", pa.array(np.arange(table.num_rows))),
        sort_keys=[("image_id", "ascending"), ("_ok", "descending"), ("run", "descending"), ("_row", "descending")],
    )
    ordered = table.take(order)
    ids = ordered["image_id"].to_numpy(zero_copy_only=False)
    first = np.ones(len(ids), bool)
    first[1:] = ids[1:] != ids[:-1]
    return ordered.filter(pa.array(first))


class RecordCells(NamedTuple):
    """The non-zero confusion cells of a table of records, one entry per (record, truth, prediction).

    Attributes:
        owner: int64 ``(K,)`` the row of each cell's record (``0 .. N-1``).
        truth, pred: int64 ``(K,)`` the cell's class ids.
        pixels: int64 ``(K,)`` its pixel count.
    """

    owner: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    pixels: np.ndarray


def record_cells(records: pa.Table) -> RecordCells:
    """The decoded ``cm_cells`` / ``cm_counts`` of ``records``: what every table, evaluate and query read them with."""
    import pyarrow.compute as pc

    def flat(values) -> np.ndarray:
        return values.to_numpy(zero_copy_only=False).astype(np.int64)

    cells_col, counts_col = records["cm_cells"].combine_chunks(), records["cm_counts"].combine_chunks()
    truth, pred = decode_cells(flat(pc.list_flatten(cells_col)))
    return RecordCells(flat(pc.list_parent_indices(cells_col)), truth, pred, flat(pc.list_flatten(counts_col)))


def dense_counts(records: pa.Table, num_classes: int) -> dict[str, np.ndarray]:
    """Per-image counts and the summed matrix from ``ok`` records with truth, in table order.

    Returns:
        ``tp``, ``fp``, ``fn``, ``support`` int64 ``(N, C)`` and ``confusion`` int64 ``(C, C)``.

    Raises:
        ValueError: a record holds a class id outside ``0 .. C-1``; names the image.
    """
    cells = record_cells(records)
    try:
        return counts_from_sparse(cells.owner, cells.truth, cells.pred, cells.pixels, records.num_rows, num_classes)
    except SparseCellError as e:
        image_id = records["image_id"][e.owner].as_py()
        raise ValueError(f"image {image_id!r}: {e}") from None


def per_image_frame(image_ids: list[str], counts: dict[str, np.ndarray], class_names: list[str], model_id: str = ""):
    """``per_image.parquet`` as a DataFrame: image x class rows, images in the given order.

    ``model_id`` (the weights' hash) is every row's lineage: rows of two
    outputs can be told apart, and joined, by the model that made them.
    """
    import pandas as pd

    n, c = counts["tp"].shape
    frame = pd.DataFrame(
        {
            "image_id": np.repeat(np.asarray(image_ids, dtype=object), c),
            "class_id": np.tile(np.arange(c, dtype=np.int32), n),
            "class_name": np.tile(np.asarray(class_names, dtype=object), n),
            "tp": counts["tp"].reshape(-1),
            "fp": counts["fp"].reshape(-1),
            "fn": counts["fn"].reshape(-1),
            "support": counts["support"].reshape(-1),
            "iou": iou_from_counts(counts["tp"], counts["fp"], counts["fn"]).reshape(-1),
            "dice": dice_from_counts(counts["tp"], counts["fp"], counts["fn"]).reshape(-1),
            "model_id": np.full(n * c, model_id, dtype=object),
        }
    )
    return frame


def per_class_frame(confusion: np.ndarray, class_names: list[str], model_id: str = ""):
    """``per_class.parquet`` as a DataFrame: dataset-level scores of the summed matrix."""
    import pandas as pd

    return pd.DataFrame(
        {
            "class_id": np.arange(len(class_names), dtype=np.int32),
            "class_name": list(class_names),
            "iou": iou(confusion),
            "dice": dice(confusion),
            "precision": precision(confusion),
            "recall": recall(confusion),
            "support": confusion.sum(axis=1).astype(np.int64),
            "model_id": [model_id] * len(class_names),
        }
    )


def confusion_frame(confusion: np.ndarray, class_names: list[str]):
    """``confusion.parquet`` as a DataFrame: ``truth``, ``truth_name``, then ``pred_<id>`` columns."""
    import pandas as pd

    frame = pd.DataFrame({"truth": np.arange(len(class_names), dtype=np.int32), "truth_name": list(class_names)})
    for k in range(len(class_names)):
        frame[f"pred_{k}"] = confusion[:, k].astype(np.int64)
    return frame


def read_confusion(uri: str) -> np.ndarray:
    """The (C, C) int64 matrix of a ``confusion.parquet`` (rows truth, columns prediction)."""
    table = storage.read_parquet(uri)
    names = sorted((n for n in table.column_names if n.startswith("pred_")), key=lambda n: int(n[5:]))
    return np.stack([table[n].to_numpy() for n in names], axis=1).astype(np.int64)


def scores(counts: dict[str, np.ndarray]) -> dict[str, Any]:
    """The dataset-level numbers of ``summary.json`` (NaN -> None, for JSON)."""
    s = summary(counts["confusion"])
    images = int(counts["tp"].shape[0])
    out = {
        "images_scored": images,
        "pixels": int(s["pixels"]),
        "pixel_accuracy": s["pixel_accuracy"],
        "miou": s["miou"],
        "mean_dice": s["mean_dice"],
        "valid_classes": s["valid_classes"],
        "miou_mean_of_images": mean_of_images(counts["tp"], counts["fp"], counts["fn"]) if images else float("nan"),
    }
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def write_frame(frame, schema: pa.Schema, uri: str) -> None:
    """Writes a DataFrame with a fixed schema (never a partial file: ``storage.write_parquet``)."""
    storage.write_parquet(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), uri)


def confusion_schema(num_classes: int) -> pa.Schema:
    fields = [("truth", pa.int32()), ("truth_name", pa.string())]
    fields += [(f"pred_{k}", pa.int64()) for k in range(num_classes)]
    return pa.schema(fields)


def score_tables(records: pa.Table, class_names: list[str], model_id: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """The scores and the three tables of the ``ok`` records with truth.

    Args:
        model_id: the pinned weights' hash, written into every per-image and
            per-class row (empty when no segray model made the masks).

    Returns:
        (the scores for summary.json, ``{"per_image", "per_class", "confusion"}`` DataFrames).
    """
    import pyarrow.compute as pc

    scored = records.filter(pc.and_(pc.equal(records["status"], OK), records["has_truth"]))
    counts = dense_counts(scored, len(class_names))
    ids = scored["image_id"].to_pylist()
    frames = {
        "per_image": per_image_frame(ids, counts, class_names, model_id),
        "per_class": per_class_frame(counts["confusion"], class_names, model_id),
        "confusion": confusion_frame(counts["confusion"], class_names),
    }
    return scores(counts), frames


def table_schema(name: str, num_classes: int) -> pa.Schema:
    return {"per_image": PER_IMAGE_SCHEMA, "per_class": PER_CLASS_SCHEMA}.get(name) or confusion_schema(num_classes)


def empty_tables(num_classes: int) -> dict[str, Any]:
    """The three tables without rows (a source without truth)."""
    return {name: table_schema(name, num_classes).empty_table().to_pandas() for name in ("per_image", "per_class", "confusion")}


def format_per_class(df) -> str:
    """The per-class table as aligned text, with the mean over valid classes.

    Args:
        df: a ``per_class.parquet`` DataFrame (class_id, class_name, iou, dice,
            precision, recall, support).

    Returns:
        Lines like ``  1  circle      0.812  0.896      0.901  0.891    12,345``;
        NaN (a class in neither truth nor prediction) shows as ``-``.
    """

    def num(v: float) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    names = [str(n) for n in df["class_name"]]
    valid = df["iou"].notna()
    label = f"mean of {int(valid.sum())} valid"
    width = max([len("class"), len(label)] + [len(n) for n in names])
    header = f"{'id':>3}  {'class':<{width}}  {'IoU':>6}  {'Dice':>6}  {'precision':>9}  {'recall':>6}  {'support':>12}"
    lines = [header, "-" * len(header)]
    for row, name in zip(df.itertuples(index=False), names):
        lines.append(
            f"{int(row.class_id):>3}  {name:<{width}}  {num(row.iou):>6}  {num(row.dice):>6}  "
            f"{num(row.precision):>9}  {num(row.recall):>6}  {int(row.support):>12,}"
        )
    if valid.any():
        lines.append("-" * len(header))
        lines.append(
            f"{'':>3}  {label:<{width}}  {num(float(df['iou'][valid].mean())):>6}  {num(float(df['dice'][valid].mean())):>6}  "
            f"{num(float(df['precision'][valid].mean())):>9}  {num(float(df['recall'][valid].mean())):>6}  {int(df['support'].sum()):>12,}"
        )
    return "\n".join(lines)
