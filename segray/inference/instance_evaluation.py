"""``segray evaluate`` of instance outputs: predict's instance tables from instance maps that already exist.

PRED is a folder of 16-bit ``<id>.png`` instance-id maps (0 background, each
other value one object), such as a predict's ``OUT/instances``. Each object's
class and score come from ``instances.parquet`` beside that folder (predict
writes it); without one, every object is class 1 with score 1 (AP then ranks
objects by id only: PQ, SQ and RQ do not depend on scores).

TRUTH is an ingested instance dataset (its ``split``), or a raw folder of one
of ingest's instance layouts (``coco``, ``instance-ids``, ``per-instance``),
whose objects are read as ingest reads them (renumbered ``1..K``).

Ray tasks decode each pair and return its semantic record, its
``InstanceMetrics`` record and its object rows; the driver merges them into
the tables predict writes for an instance model: ``instances.parquet``,
``per_class.parquet`` (IoU / Dice and ``ap`` .. ``rq``), ``per_image``,
``confusion``, ``instance_images.parquet`` (per-image PQ) and ``summary.json``.
The same images scored by predict and by evaluate give the same numbers.
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segray import storage
from segray.config import EvaluateConfig, about
from segray.data import IGNORE_INDEX, BadInput, ClassInfo, index_folder, load_classes
from segray.inference.instance_tables import INSTANCES_FILE, instance_per_class, write_image_quality
from segray.inference.objects import OBJECTS_SCHEMA, objects_table
from segray.inference.output import Output, PredictResult, claim, json_plain
from segray.inference.tables import ERROR, OK, RECORD_SCHEMA, error_record, latest_records, ok_record, score_tables, table_schema, write_frame
from segray.ownership import canonical
from segray.runtime import bounded_retries

FORMAT = "segray-evaluate/1"
TASK = "instance"
PREDICT_INSTANCES = "instances"  # predict's folder of instance maps (segray.inference.instance_pipeline.INSTANCES)
LIGHT_TASK_CPUS = 0.5
PAIRS_PER_TASK = 32
_ROW_SCHEMA = RECORD_SCHEMA.append(pa.field("instance_record", pa.string())).append(pa.field("objects", pa.string()))

__all__ = ["evaluate_instances", "is_instance_evaluation"]


def _predict_output(pred: str) -> Output | None:
    """The predict output whose ``instances/`` folder ``pred`` is, else None."""
    if storage.basename(pred.rstrip("/")) != PREDICT_INSTANCES:
        return None
    parent = storage.parent(pred.rstrip("/"))
    return Output(parent) if parent and storage.exists(Output(parent).run_file) else None


def _json_file(uri: str) -> dict[str, Any]:
    try:
        value = json.loads(storage.read_text(uri))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_instance_dataset(truth: str) -> bool:
    uri = storage.join(truth, "dataset.json")
    return storage.exists(uri) and _json_file(uri).get("task") == TASK


def is_instance_evaluation(cfg: EvaluateConfig) -> bool:
    """Whether ``cfg`` scores instance maps: ``task``, else inferred (see ``EvaluateConfig``)."""
    if cfg.task is not None:
        return cfg.task == TASK
    if cfg.layout is not None:
        return False
    if cfg.instance_layout is not None or cfg.split is not None:
        return True
    parent = _predict_output(cfg.pred)
    if parent is not None and _json_file(parent.run_file).get("task") == TASK:
        return True
    return _is_instance_dataset(cfg.truth)


def _truth_layout(cfg: EvaluateConfig) -> str | None:
    """The raw instance layout TRUTH is read in, or None for an ingested dataset."""
    from segray.data import COCO_FILE, INSTANCES_DIR

    if cfg.instance_layout is not None:
        return cfg.instance_layout
    if storage.exists(storage.join(cfg.truth, "dataset.json")):
        if not _is_instance_dataset(cfg.truth):
            raise about("truth", ValueError(f"truth {cfg.truth} is a semantic dataset; instance maps are scored against an instance dataset "
                                            "(`segray ingest --task instance`) or a raw instance folder (`instance_layout`)"))
        return None
    if storage.exists(storage.join(cfg.truth, COCO_FILE)):
        return "coco"
    if storage.is_dir(storage.join(cfg.truth, INSTANCES_DIR)):
        return "instance-ids"
    raise about("instance_layout", ValueError(
        f"truth {cfg.truth}: no dataset.json, {COCO_FILE} or {INSTANCES_DIR}/ there; name its layout with `instance_layout` (per-instance, ...)"))


def _split(cfg: EvaluateConfig, parent: Output | None) -> str:
    if cfg.split is not None:
        return cfg.split
    split = _json_file(parent.summary).get("config", {}).get("split") if parent is not None else None
    if not isinstance(split, str) or not split:
        raise about("split", ValueError(f"truth {cfg.truth} is an ingested dataset; name the split the predictions are of with `split`"))
    return split


class ScoreInstances:
    """``map_batches`` body (Ray tasks): one item (a shard of truth, or raw pairs) -> rows of ``_ROW_SCHEMA``."""

    def __init__(self, layout: str | None, classes: list[ClassInfo], class_names: list[str], objects: dict[str, list[list[float]]] | None,
                 model_id: str, run: int):
        self.layout, self.classes, self.class_names = layout, classes, class_names
        self.objects, self.model_id, self.run = objects, model_id, run

    def _truth_of(self, pair: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        from segray.data import MAX_OBJECTS, labels_from_coco, labels_from_ids, labels_from_masks

        if self.layout == "coco":
            coco = pair["coco"]
            labels = labels_from_coco(coco, int(coco["height"]), int(coco["width"]), pair["truth"][0], MAX_OBJECTS)
        else:
            blobs = [(uri, storage.read_bytes(uri)) for uri in pair["truth"]]
            if self.layout == "instance-ids":
                labels = labels_from_ids(blobs, self.classes, None, MAX_OBJECTS)
            else:
                labels = labels_from_masks(blobs, None, MAX_OBJECTS)
        return labels.ids, labels.classes

    def _pred_of(self, image_id: str, uri: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from segray.data import decode_instances

        pred = decode_instances(storage.read_bytes(uri)).astype(np.uint16)
        n = int(pred.max()) if pred.size else 0
        classes, scores = np.zeros(n, np.int64), np.zeros(n, np.float32)
        if self.objects is None:
            present = np.unique(pred)
            present = present[present > 0].astype(np.int64)
            classes[present - 1], scores[present - 1] = 1, 1.0
            return pred, classes, scores
        rows = self.objects.get(image_id, [])
        for instance_id, class_id, score in rows:
            if not 1 <= int(instance_id) <= n:
                raise BadInput(f"{uri}: instances.parquet lists object {int(instance_id)} of {image_id!r}, the map holds ids up to {n}")
            classes[int(instance_id) - 1], scores[int(instance_id) - 1] = int(class_id), score
        missing = sorted(set(np.unique(pred).tolist()) - {0} - {int(r[0]) for r in rows})
        if missing:
            raise BadInput(f"{uri}: object(s) {missing[:5]} have no row in instances.parquet (their class and score)")
        return pred, classes, scores

    def _row(self, image_id: str, pred_uri: str, truth: np.ndarray, truth_classes: np.ndarray) -> dict[str, Any]:
        from segray.metrics import image_record, semantic_from_instances

        pred, classes, scores = self._pred_of(image_id, pred_uri)
        if pred.shape != truth.shape:
            raise BadInput(f"prediction {pred_uri} is {pred.shape[1]}x{pred.shape[0]}, truth is {truth.shape[1]}x{truth.shape[0]}")
        limit = len(self.class_names)
        for what, values in (("prediction", classes), ("truth", truth_classes)):
            if len(values) and int(np.max(values)) >= limit:
                raise BadInput(f"{pred_uri}: {what} class {int(np.max(values))} outside the object classes 1..{limit - 1}")
        table = objects_table(pred, classes, scores, truth, truth_classes, image_id, self.class_names, self.model_id)
        record = image_record(image_id, truth, truth_classes, pred, classes, scores)
        semantic = ok_record(image_id, pred_uri, truth.shape[0], truth.shape[1], semantic_from_instances(truth, truth_classes).astype(np.uint8),
                             semantic_from_instances(pred, classes).astype(np.uint8), None, self.run)
        return {**semantic, "instance_record": json.dumps(record), "objects": json.dumps(table.to_pylist())}

    def _pairs(self, item: dict[str, Any]):
        """(image_id, pred_uri, truth loader) of each pair of the item."""
        from segray.data import decode_instances

        pairs = json.loads(item["pairs"])
        if item["shard"]:
            import pyarrow.parquet as pq

            fs, path = storage.filesystem(item["shard"])
            ids = [p["image_id"] for p in pairs]
            table = pq.read_table(path, filesystem=fs, columns=["image_id", "instances", "classes"], filters=[("image_id", "in", ids)])
            found = {r["image_id"]: r for r in table.to_pylist()}
            for p in pairs:
                row = found.get(p["image_id"])

                def load(row=row, p=p):
                    if row is None:
                        raise BadInput(f"{item['shard']}: no row {p['image_id']!r}")
                    return decode_instances(row["instances"]).astype(np.uint16), np.asarray(row["classes"], np.int64)

                yield p["image_id"], p["pred_uri"], f"{item['shard']}#{p['image_id']}", load
        else:
            for p in pairs:
                yield p["image_id"], p["pred_uri"], p["truth"][0], (lambda p=p: self._truth_of(p))

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        rows = []
        for k in range(len(batch["pairs"])):
            item = {"shard": str(batch["shard"][k]), "pairs": str(batch["pairs"][k])}
            for image_id, pred_uri, truth_uri, load in self._pairs(item):
                try:
                    truth, truth_classes = load()
                except BadInput as e:
                    rows.append({**error_record(image_id, truth_uri, str(e) if truth_uri in str(e) else f"{truth_uri}: {e}", self.run),
                                 "instance_record": "", "objects": "[]"})
                    continue
                try:
                    rows.append(self._row(image_id, pred_uri, truth, truth_classes))
                except Exception as e:  # noqa: BLE001 - one unreadable pair must not stop the others
                    reason = str(e) if isinstance(e, BadInput) and pred_uri in str(e) else f"{pred_uri}: {type(e).__name__}: {e}"
                    rows.append({**error_record(image_id, pred_uri, reason, self.run), "instance_record": "", "objects": "[]"})
        return pa.Table.from_pylist(rows, schema=_ROW_SCHEMA)


def _predicted_objects(parent: Output | None, pred: str) -> dict[str, list[list[float]]] | None:
    """image id -> ``[instance_id, class_id, score]`` rows of ``instances.parquet`` beside PRED, or None where there is none."""
    uri = storage.join(parent.root if parent is not None else storage.parent(pred.rstrip("/")) or pred, INSTANCES_FILE)
    if not storage.exists(uri):
        return None
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    table = pq.read_table(path, filesystem=fs, columns=["image_id", "instance_id", "class_id", "score"])
    objects: dict[str, list[list[float]]] = {}
    for r in table.to_pylist():
        objects.setdefault(r["image_id"], []).append([int(r["instance_id"]), int(r["class_id"]), float(r["score"])])
    return objects


def _classes(cfg: EvaluateConfig, declared: list[ClassInfo] | None, parent: Output | None) -> list[ClassInfo]:
    """The truth's classes (background first), checked against the predict output's and ``classes``."""
    predicted = [c for c in load_classes(parent.classes) if c.id != IGNORE_INDEX] if parent is not None and storage.exists(parent.classes) else None
    given = [c for c in load_classes(cfg.classes) if c.id != IGNORE_INDEX] if cfg.classes else None
    classes = declared or given or predicted
    if classes is None:
        from segray.data import ClassInfo as Info, default_color

        classes = [Info(0, "background", tuple(default_color(0))), Info(1, "object", tuple(default_color(1)))]
    if predicted is not None and [c.name for c in predicted] != [c.name for c in classes]:
        raise about("truth", ValueError(
            f"truth {cfg.truth} has the classes [{', '.join(c.name for c in classes)}]; the predictions in {cfg.pred} are of "
            f"[{', '.join(c.name for c in predicted)}]"))
    return classes


def _items(cfg: EvaluateConfig, parent: Output | None, errors: list[tuple[str, str]]) -> tuple[list[dict[str, str]], list[ClassInfo] | None, dict[str, Any]]:
    """Ray items (``shard``, ``pairs`` JSON), the truth's declared classes, and the identity fields of the truth."""
    from segray.data import list_instances
    from segray.inference.sources import list_source

    preds = index_folder(cfg.pred, "pred", errors, lossless=True)
    layout = _truth_layout(cfg)
    items: list[dict[str, str]] = []
    if layout is None:
        split = _split(cfg, parent)
        source = list_source(cfg.truth, split)
        errors += source.errors
        truth_ids = set(source.ids)
        import pyarrow.parquet as pq

        fs, _ = storage.filesystem(cfg.truth)
        for shard in source.shards:
            ids = pq.read_table(storage.filesystem(shard.uri)[1], filesystem=fs, columns=["image_id"])["image_id"].to_pylist()
            pairs = [{"image_id": i, "pred_uri": preds[i].uri} for i in sorted(ids) if i in preds]
            if pairs:
                items.append({"shard": shard.uri, "pairs": json.dumps(pairs)})
        declared, identity = source.classes, {"split": split}
    else:
        plan = list_instances(cfg.truth, layout, cfg.classes)
        errors += plan.errors
        truth_ids = {p.image_id for p in plan.pairs}
        pairs = [{"image_id": p.image_id, "pred_uri": preds[p.image_id].uri, "truth": list(p.mask_uris),
                  "coco": (plan.annotations or {}).get(p.image_id)} for p in plan.pairs if p.image_id in preds]
        for start in range(0, len(pairs), PAIRS_PER_TASK):
            items.append({"shard": "", "pairs": json.dumps(pairs[start: start + PAIRS_PER_TASK])})
        declared, identity = plan.classes, {"instance_layout": layout}
    for image_id in sorted(set(preds) - truth_ids):
        errors.append((preds[image_id].uri, f"{preds[image_id].uri}: prediction has no truth objects (id {image_id!r} not in {cfg.truth})"))
    for image_id in sorted(truth_ids - set(preds)):
        errors.append((image_id, f"{image_id}: truth has no prediction (no {image_id}.png in {cfg.pred})"))
    return items, declared, identity


def evaluate_instances(cfg: EvaluateConfig) -> PredictResult:
    """Scores instance maps against truth objects (see the module docstring); returns what ``predict`` returns.

    Raises:
        FileNotFoundError: PRED or TRUTH is missing, or no map has truth.
        FileExistsError: OUT holds results of another run.
        ValueError: TRUTH's classes differ from those of the predict output PRED belongs to.
    """
    import ray

    from segray.data import write_errors
    from segray.metrics import InstanceMetrics

    started, run = time.time(), time.time_ns()
    pred, truth, out = cfg.pred, cfg.truth, Output(cfg.output)
    if not storage.is_dir(pred):
        raise about("pred", FileNotFoundError(f"pred {pred}: no such folder of instance maps"))
    if not storage.is_dir(truth):
        raise about("truth", FileNotFoundError(f"truth {truth}: no such folder"))
    parent = _predict_output(pred)
    errors: list[tuple[str, str]] = []
    items, declared, identity = _items(cfg, parent, errors)
    classes = _classes(cfg, [c for c in declared if c.id != IGNORE_INDEX] if declared else None, parent)
    names = [c.name for c in classes]
    if len(names) < 2:
        raise about("classes", ValueError(f"truth {truth}: instance scores need background and at least one object class, got {names}"))
    if not items:
        raise FileNotFoundError(f"no instance map and truth share an id between `pred` {pred} and `truth` {truth} ({len(errors)} unpaired files)")
    summary_of_pred = _json_file(parent.summary) if parent is not None else {}
    model_id = summary_of_pred.get("model_id") if isinstance(summary_of_pred.get("model_id"), str) else ""
    claim(out, {"format": FORMAT, "task": TASK, "pred": canonical(pred), "truth": canonical(truth), "classes": names, **identity})
    from segray.runs import class_list

    storage.write_text(out.classes, json.dumps(class_list(classes), indent=2))

    objects = _predicted_objects(parent, pred)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    scorer = ScoreInstances(identity.get("instance_layout"), classes, names, objects, model_id, run)
    with bounded_retries() as retries:
        ds = ds.map_batches(scorer, batch_size=1, batch_format="numpy", num_cpus=LIGHT_TASK_CPUS, **retries)
    parts = [b if isinstance(b, pa.Table) else pa.Table.from_batches([b]) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    rows = pa.concat_tables([p.cast(_ROW_SCHEMA) for p in parts]) if parts else _ROW_SCHEMA.empty_table()
    records = latest_records(rows.select(RECORD_SCHEMA.names)).sort_by("image_id")
    for rec in records.filter(pc.equal(records["status"], ERROR)).to_pylist():
        errors.append((rec["uri"], rec["reason"]))
    ok_rows = rows.filter(pc.equal(rows["status"], OK)).sort_by("image_id")

    metrics = InstanceMetrics(len(names))
    object_rows: list[dict[str, Any]] = []
    for row in ok_rows.select(["instance_record", "objects"]).to_pylist():
        metrics.add_record(json.loads(row["instance_record"]))
        object_rows += json.loads(row["objects"])
    object_table = pa.Table.from_pylist(object_rows, schema=OBJECTS_SCHEMA).sort_by([("image_id", "ascending"), ("instance_id", "ascending")])
    storage.write_parquet(object_table, storage.join(out.root, INSTANCES_FILE))
    write_image_quality(out.root, metrics.records)

    scores, frames = score_tables(records, names, model_id)
    per_class, per_class_schema = instance_per_class(frames["per_class"], metrics, names, model_id)
    frames["per_class"] = per_class
    instance_summary = metrics.summary()
    scores.update({k: v for k, v in instance_summary.items() if k != "images"})
    write_errors(out.root, errors)
    for name, frame in frames.items():
        write_frame(frame, per_class_schema if name == "per_class" else table_schema(name, len(names)), out.table(name))
    wall = time.time() - started
    scored = int(scores.get("images_scored", 0))
    summary = {
        "task": TASK,
        "images": scored,
        **scores,
        "objects": object_table.num_rows,
        "errors": len(errors),
        "pred": pred,
        "truth": truth,
        "model_id": model_id or None,
        "classes": cfg.classes,
        "class_names": names,
        "has_truth": True,
        "config": cfg.to_dict(),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(scored / wall, 3) if scored else None,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    summary = json.loads(json.dumps(summary, default=json_plain))
    storage.write_text(out.summary, json.dumps(summary, indent=2))
    return PredictResult(out.root, summary, frames["per_class"], frames["per_image"], frames["confusion"], errors)


