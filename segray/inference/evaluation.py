"""``segray evaluate``: predict's tables from masks that already exist.

PRED and TRUTH are folders of ``<id>.png`` class-id masks paired by id (the
same rules as a raw layout), or TRUTH is a raw folder of one of ingest's
layouts (``layout``), whose masks are read as ingest reads them (a pair's
``truth_uri`` then lists its mask files, one a line). Ray tasks decode each pair and keep its sparse
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
from segray.config import ConfigError, EvaluateConfig, about
from segray.data import IGNORE_INDEX, BadInput, ClassInfo, Plan, build_mask, decode_mask, index_folder, list_pairs, load_classes
from segray.inference.output import MASKS, Output, PredictResult, claim, write_results
from segray.inference.pipeline import LIGHT_TASK_CPUS
from segray.inference.tables import (
    ERROR,
    OK,
    RECORD_SCHEMA,
    error_record,
    latest_records,
    ok_record,
    record_cells,
    records_table,
    score_tables,
)
from segray.ownership import canonical
from segray.runtime import bounded_retries

FORMAT = "segray-evaluate/1"


class ScorePairs:
    """``map_batches`` body (Ray tasks): (pred, truth) mask URIs -> records."""

    def __init__(self, num_classes: int | None, ignore_index: int, run: int, layout: str | None = None, truth_classes: list[ClassInfo] | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.run = run
        self.layout = layout
        self.truth_classes = truth_classes

    def _truth(self, truth_uris: str) -> np.ndarray:
        if self.layout is None:
            return decode_mask(storage.read_bytes(truth_uris))
        return build_mask(self.layout, [(u, storage.read_bytes(u)) for u in truth_uris.split("\n")], self.truth_classes)

    def _record(self, image_id: str, pred_uri: str, truth_uri: str) -> dict[str, Any]:
        try:
            pred = decode_mask(storage.read_bytes(pred_uri))
        except BadInput as e:
            return error_record(image_id, pred_uri, f"{pred_uri}: {e}", self.run)
        truth_uris, truth_uri = truth_uri, truth_uri.split("\n")[0]
        try:
            truth = self._truth(truth_uris)
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


def _pairs(pred: str, truth: str, plan: Plan | None = None) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    """Prediction and truth pairs by id; ``plan``: the truth's listing in its layout (else TRUTH's masks)."""
    errors: list[tuple[str, str]] = []
    preds = index_folder(pred, "pred", errors, lossless=True)
    if plan is None:
        truths = {i: e.uri for i, e in index_folder(truth, "truth", errors, lossless=True).items()}
    else:
        errors += plan.errors
        truths = {p.image_id: "\n".join(p.mask_uris) for p in plan.pairs}
    pairs = []
    for image_id in sorted(set(preds) | set(truths)):
        if image_id not in truths:
            errors.append((preds[image_id].uri, f"{preds[image_id].uri}: prediction has no truth mask (id {image_id!r} not in {truth})"))
        elif image_id not in preds:
            first = truths[image_id].split("\n")[0]
            errors.append((first, f"{first}: truth mask has no prediction (id {image_id!r} not in {pred})"))
        else:
            pairs.append({"image_id": image_id, "pred_uri": preds[image_id].uri, "truth_uri": truths[image_id]})
    return pairs, errors


def _inferred_classes(records: pa.Table) -> int:
    """1 + the largest class id in truth or prediction among the records (0 when none)."""
    cells = record_cells(records)
    if cells.truth.size == 0:
        return 0
    return int(max(cells.truth.max(), cells.pred.max())) + 1


def _summary_of(pred: str) -> dict[str, Any]:
    """``summary.json`` of the predict run whose ``masks/`` folder ``pred`` is, else {}."""
    parent = _output_of(pred)
    if parent is None or not storage.exists(parent.summary):
        return {}
    try:
        summary = json.loads(storage.read_text(parent.summary))
    except ValueError:
        return {}
    return summary if isinstance(summary, dict) else {}


def _output_of(pred: str) -> Output | None:
    """The predict output whose ``masks/`` folder ``pred`` is, else None."""
    if storage.basename(pred.rstrip("/")) != MASKS:
        return None
    parent = storage.parent(pred.rstrip("/"))
    return Output(parent) if parent else None


def _predicted_classes(pred: str, summary: dict[str, Any]) -> tuple[list[str] | None, list[str] | None]:
    """(class names, per-class priority) of the model of the predict output ``pred`` belongs to; None where unknown.

    ``summary`` is that output's ``summary.json`` (``_summary_of``).
    """
    parent = _output_of(pred)
    names = None
    if parent is not None and storage.exists(parent.classes):
        try:
            names = [c.name for c in load_classes(parent.classes) if c.id != IGNORE_INDEX]
        except ConfigError:
            names = None
    model = summary.get("config", {}).get("resolved", {}).get("model", {})
    priority = model.get("priority") if isinstance(model, dict) else None
    return names, priority if isinstance(priority, list) else None


def _truth_plan(cfg: EvaluateConfig, summary: dict[str, Any]) -> tuple[Plan, list[ClassInfo]]:
    """TRUTH listed in its layout, with the classes and priority the predictions were made with.

    ``summary`` is the ``summary.json`` of the predict output PRED belongs to ({} when none).

    Raises:
        ValueError: the layout's classes or priority differ from those of the
            predict output PRED belongs to, naming both.
    """
    names, model_priority = _predicted_classes(cfg.pred, summary)
    order, priority = cfg.class_order, cfg.priority
    if cfg.layout == "per-class":
        order = order or (names[1:] if names else None)
        priority = priority or model_priority
    plan = list_pairs(cfg.truth, cfg.layout, cfg.classes, None, order, priority, cfg.images_dir)
    read = [c for c in plan.classes or [] if c.id != IGNORE_INDEX]
    if names is not None and plan.classes is not None and [c.name for c in read] != names:
        field = "class_order" if cfg.layout == "per-class" else "classes"
        raise about(field, ValueError(
            f"{field}: truth {cfg.truth} read as {cfg.layout} gives the classes [{', '.join(c.name for c in read)}]; "
            f"the predictions in {cfg.pred} are of [{', '.join(names)}] (ids 0..{len(names) - 1}); give their classes in their order"
        ))
    if cfg.layout == "per-class" and model_priority and list(plan.priority or []) != list(model_priority):
        raise about("priority", ValueError(
            f"priority [{', '.join(plan.priority or [])}] differs from the overlap priority the model of {cfg.pred} was trained with "
            f"[{', '.join(model_priority)}]; leave `priority` out to use it"
        ))
    return plan, read


def evaluate(cfg: EvaluateConfig) -> PredictResult:
    """Scores existing prediction masks against truth masks (see ``EvaluateConfig``).

    Instance maps (``task`` instance, or inferred) go to ``evaluate_instances``.

    Returns:
        The result, as ``predict`` returns it.

    Raises:
        FileNotFoundError: PRED or TRUTH holds no masks.
        FileExistsError: OUT holds results of another run.
    """
    import ray

    from segray.inference.instance_evaluation import evaluate_instances, is_instance_evaluation

    if is_instance_evaluation(cfg):
        return evaluate_instances(cfg)
    started, run = time.time(), time.time_ns()
    pred, truth, out, classes = cfg.pred, cfg.truth, Output(cfg.output), cfg.classes
    if not storage.is_dir(pred):
        raise about("pred", FileNotFoundError(f"pred {pred}: no such folder of masks"))
    if not storage.is_dir(truth):
        raise about("truth", FileNotFoundError(f"truth {truth}: no such folder of masks"))
    declared = None
    if classes:
        if not storage.exists(classes):
            raise about("classes", FileNotFoundError(f"classes {classes}: no such file"))
        declared = [c for c in load_classes(classes) if c.id != IGNORE_INDEX]
    # The predict run's summary.json, read once: its model's id, classes and priority.
    pred_summary = _summary_of(pred)
    plan, truth_classes, identity = None, None, {}
    if cfg.layout is not None:
        plan, layout_classes = _truth_plan(cfg, pred_summary)
        declared = layout_classes or declared
        truth_classes = plan.classes if cfg.layout != "ids" else None
        # Named only with a layout, so OUTs written before layouts existed still resume.
        identity = {"layout": cfg.layout, "truth_classes": [c.name for c in layout_classes], "priority": plan.priority}
    pairs, errors = _pairs(pred, truth, plan)
    if not pairs:
        raise FileNotFoundError(f"no prediction and truth masks share an id between `pred` {pred} and `truth` {truth} ({len(errors)} unpaired files)")
    claim(out, {"format": FORMAT, "pred": canonical(pred), "truth": canonical(truth), "classes": canonical(classes) if classes else None, **identity})

    per_block = 64
    ds = ray.data.from_items(pairs, override_num_blocks=max(1, math.ceil(len(pairs) / per_block)))
    scorer = ScorePairs(len(declared) if declared else None, IGNORE_INDEX, run, cfg.layout, truth_classes)
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
    model_id = pred_summary.get("model_id")
    model_id = model_id if isinstance(model_id, str) else ""
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
    return write_results(out, frames, len(names), summary, errors)
