"""``segray evaluate``: predict's tables from masks that already exist.

PRED and TRUTH are folders of ``<id>.png`` class-id masks paired by id (the
same rules as a raw layout). Ray tasks decode each pair and keep its sparse
confusion matrix; the driver merges the small records into the same tables
``predict`` writes, so any model's output is scored the same way.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segray import storage
from segray.config import EvaluateConfig, about
from segray.data.imageio import BadInput, decode_mask
from segray.data.info import IGNORE_INDEX, load_classes
from segray.data.layouts import index_folder
from segray.inference.output import PredictResult, claim, write_results
from segray.inference.pipeline import LIGHT_TASK_CPUS
from segray.inference.tables import (
    ERROR,
    OK,
    RECORD_SCHEMA,
    error_record,
    latest_records,
    ok_record,
    records_table,
    score_tables,
)
from segray.metrics import CELL_BASE
from segray.ownership import canonical
from segray.runtime import bounded_retries

FORMAT = "segray-evaluate/1"


class ScorePairs:
    """``map_batches`` body (Ray tasks): (pred, truth) mask URIs -> records."""

    def __init__(self, num_classes: int | None, ignore_index: int, run: int):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.run = run

    def _record(self, image_id: str, pred_uri: str, truth_uri: str) -> dict[str, Any]:
        try:
            pred = decode_mask(storage.read_bytes(pred_uri))
        except BadInput as e:
            return error_record(image_id, pred_uri, f"{pred_uri}: {e}", self.run)
        try:
            truth = decode_mask(storage.read_bytes(truth_uri))
        except BadInput as e:
            return error_record(image_id, truth_uri, f"{truth_uri}: {e}", self.run)
        if pred.shape != truth.shape:
            reason = f"prediction {pred_uri} is {pred.shape[1]}x{pred.shape[0]}, truth {truth_uri} is {truth.shape[1]}x{truth.shape[0]}"
            return error_record(image_id, pred_uri, reason, self.run)
        counted = truth != self.ignore_index
        limit = self.num_classes if self.num_classes is not None else self.ignore_index
        for uri, values, what in ((truth_uri, truth[counted], "truth"), (pred_uri, pred[counted], "prediction")):
            bad = values >= limit
            if bad.any():
                found = sorted(int(v) for v in np.unique(values[bad]))
                allowed = f"0..{limit - 1}" + (f" (or {self.ignore_index} in truth)" if what == "truth" else "")
                return error_record(image_id, uri, f"{uri}: {what} values {found} outside the classes {allowed} in {int(bad.sum())} counted pixels", self.run)
        return ok_record(image_id, pred_uri, truth.shape[0], truth.shape[1], truth, pred, self.ignore_index, self.run)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = []
        for row in batch.to_pylist():
            try:
                records.append(self._record(row["image_id"], row["pred_uri"], row["truth_uri"]))
            except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the others
                records.append(error_record(row["image_id"], row["pred_uri"], f"{row['pred_uri']}: {type(e).__name__}: {e}", self.run))
        return records_table(records)


def _pairs(pred: str, truth: str) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    errors: list[tuple[str, str]] = []
    preds = index_folder(pred, "pred", errors, lossless=True)
    truths = index_folder(truth, "truth", errors, lossless=True)
    pairs = []
    for image_id in sorted(set(preds) | set(truths)):
        if image_id not in truths:
            errors.append((preds[image_id].uri, f"{preds[image_id].uri}: prediction has no truth mask (id {image_id!r} not in {truth})"))
        elif image_id not in preds:
            errors.append((truths[image_id].uri, f"{truths[image_id].uri}: truth mask has no prediction (id {image_id!r} not in {pred})"))
        else:
            pairs.append({"image_id": image_id, "pred_uri": preds[image_id].uri, "truth_uri": truths[image_id].uri})
    return pairs, errors


def _inferred_classes(records: pa.Table) -> int:
    """1 + the largest class id in truth or prediction among the records (0 when none)."""
    if records.num_rows == 0:
        return 0
    cells = pc.list_flatten(records["cm_cells"]).to_numpy()
    if cells.size == 0:
        return 0
    return int(max((cells // CELL_BASE).max(), (cells % CELL_BASE).max())) + 1


def _model_of(pred: str) -> str:
    """The weights' hash of the predict run whose ``masks/`` folder ``pred`` is, else ''."""
    parent = storage.parent(pred)
    if storage.basename(pred.rstrip("/")) != "masks" or not storage.exists(storage.join(parent, "summary.json")):
        return ""
    try:
        model_id = json.loads(storage.read_text(storage.join(parent, "summary.json"))).get("model_id")
    except (ValueError, AttributeError):
        return ""
    return model_id if isinstance(model_id, str) else ""


def evaluate(cfg: EvaluateConfig) -> PredictResult:
    """Scores existing prediction masks against truth masks (see ``EvaluateConfig``).

    Returns:
        The result, as ``predict`` returns it.

    Raises:
        FileNotFoundError: PRED or TRUTH holds no masks.
        FileExistsError: OUT holds results of another run.
    """
    import ray

    started, run = time.time(), time.time_ns()
    pred, truth, output, classes = cfg.pred, cfg.truth, cfg.output, cfg.classes
    if not storage.is_dir(pred):
        raise about("pred", FileNotFoundError(f"pred {pred}: no such folder of masks"))
    if not storage.is_dir(truth):
        raise about("truth", FileNotFoundError(f"truth {truth}: no such folder of masks"))
    declared = None
    if classes:
        if not storage.exists(classes):
            raise about("classes", FileNotFoundError(f"classes {classes}: no such file"))
        declared = [c for c in load_classes(classes) if c.id != IGNORE_INDEX]
    pairs, errors = _pairs(pred, truth)
    if not pairs:
        raise FileNotFoundError(f"no prediction and truth masks share an id between `pred` {pred} and `truth` {truth} ({len(errors)} unpaired files)")
    claim(output, {"format": FORMAT, "pred": canonical(pred), "truth": canonical(truth), "classes": canonical(classes) if classes else None})

    per_block = 64
    ds = ray.data.from_items(pairs, override_num_blocks=max(1, math.ceil(len(pairs) / per_block)))
    scorer = ScorePairs(len(declared) if declared else None, IGNORE_INDEX, run)
    with bounded_retries() as retries:
        ds = ds.map_batches(scorer, batch_size=per_block, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS, **retries)
    parts = [pa.Table.from_batches([b], schema=RECORD_SCHEMA) if isinstance(b, pa.RecordBatch) else b.cast(RECORD_SCHEMA) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    records = latest_records(pa.concat_tables(parts) if parts else RECORD_SCHEMA.empty_table()).sort_by("image_id")

    for rec in records.filter(pc.equal(records["status"], ERROR)).to_pylist():
        errors.append((rec["uri"], rec["reason"]))
    if declared:
        names = [c.name for c in declared]
    else:
        ok = records.filter(pc.equal(records["status"], OK))
        names = [f"class_{k}" for k in range(_inferred_classes(ok))]
    model_id = _model_of(pred)
    scores, frames = score_tables(records, names, model_id) if names else ({}, None)
    wall = time.time() - started
    scored = int(scores.get("images_scored", 0))
    summary = {
        "images": scored,
        **scores,
        "errors": len(errors),
        "pred": pred,
        "truth": truth,
        "model_id": model_id or None,
        "classes": classes,
        "class_names": names,
        "config": cfg.to_dict(),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(scored / wall, 3) if scored else None,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return write_results(output, frames, len(names), summary, errors)
