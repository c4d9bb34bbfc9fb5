"""``segray predict`` of an instance model (a registry entry with task ``instance``, e.g. ``maskrcnn``).

Beside the semantic pipeline (``segray.inference.pipeline``), with the same
stages, OUT claiming and exactly-once resume:

    shards (image, and with truth: instances + classes) -> decode + fit (CPU tasks)
      -> normalise + Mask R-CNN + paste at each image's own size (actor pool)
      -> instances/<id>.png (16-bit ids), masks/<id>.png (classes), the
         per-object rows, the instance metric record, the semantic record (CPU tasks)
    then, on the driver: the latest record of each image, merged.

Each batch writes ``_objects/<h>.parquet`` (its objects) and
``_instance_parts/<h>.parquet`` (its ``InstanceMetrics`` records) before
``_parts/<h>.parquet`` (the semantic record, written last: the image counts
as done only then). Rows carry the run that wrote them; the driver keeps,
per image, the rows of the run of its latest ``ok`` record, so a resumed or
retried predict gives the tables of an uninterrupted one.

OUT holds predict's files plus ``instances/<id>.png`` and
``instances.parquet``; ``per_class.parquet`` has predict's IoU/Dice columns
(from ``semantic_from_instances``) and the instance columns ``ap`` ..
``rq`` (``instance_per_class_frame`` of the merged metrics).
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
from segray.config import PredictConfig, about
from segray.data import encode_png
from segray.inference.output import Output, PredictResult, claim, completed, merged_records, remove_temporaries
from segray.inference.sources import SHARDS, columns_of, display_uint8, empty_array
from segray.inference.tables import ERROR, error_record, ok_record, records_table, score_tables, table_schema, write_frame
from segray.runs import class_list

FORMAT_TASK = "instance"
INSTANCES, OBJECTS, INSTANCE_PARTS = "instances", "_objects", "_instance_parts"
READ_COLUMNS = ("image_id", "uri", "error", "height", "width", "image", "truth", "truth_classes")
OUT_COLUMNS = ("image_id", "uri", "error", "height", "width", "pred", "pred_classes", "pred_scores", "truth", "truth_classes")
LIGHT_TASK_CPUS = 0.5


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {value!r}")


def model_task(name: str) -> str:
    """The registry task of a model name (``semantic`` for names the registry does not know)."""
    from segray import models

    try:
        return models.spec(name).task
    except Exception:  # noqa: BLE001 - a saved model of an unregistered name is a semantic one
        return "semantic"


def _record_schema() -> pa.Schema:
    """The schema of ``InstanceMetrics``' per-image records."""
    from segray.metrics import InstanceMetrics

    return InstanceMetrics(2).to_arrow().schema.remove_metadata()


def instance_path(out: Output, image_id: str) -> str:
    return out.inside(INSTANCES, f"{image_id}.png")


def _side_path(out: Output, folder: str, image_ids: list[str]) -> str:
    return storage.join(out.root, folder, storage.basename(out.part(image_ids)))


class ReadInstances:
    """``map_batches`` body (Ray tasks): shard rows -> decoded image (fitted), truth instance map and classes."""

    def __init__(self, size: tuple[int, int] | None, fit: str, multiple: int, mean, skip: frozenset[str]):
        self.size, self.fit, self.multiple, self.mean, self.skip = size, fit, multiple, tuple(mean), skip

    def _row(self, batch: dict[str, Any], i: int) -> dict[str, Any]:
        from segray.data import decode_image
        from segray.data import decode_instances
        from segray.inference.geometry import fit_image, pad_to, round_up

        image_id = str(batch["image_id"][i])
        uri = f"{batch['path'][i]}#{image_id}"
        image = display_uint8(decode_image(batch["image"][i]))
        height, width = image.shape[:2]
        truth, truth_classes = empty_array(np.uint16, None), np.zeros(0, np.int32)
        if "instances" in batch:
            truth = decode_instances(batch["instances"][i]).astype(np.uint16)
            truth_classes = np.asarray(batch["classes"][i], np.int32)
            if truth.shape != (height, width):
                raise ValueError(f"instance map {uri} is {truth.shape[1]}x{truth.shape[0]}, image is {width}x{height}")
        if self.size is not None:
            image = fit_image(image, tuple(self.size), self.fit)
        m = self.multiple
        image = pad_to(image, round_up(image.shape[0], m), round_up(image.shape[1], m), self.mean).astype(np.float32)
        return {"image_id": image_id, "uri": uri, "error": "", "height": height, "width": width,
                "image": image, "truth": truth, "truth_classes": truth_classes}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for i in range(len(batch["image_id"])):
            image_id = str(batch["image_id"][i])
            if image_id in self.skip:
                continue
            try:
                rows.append(self._row(batch, i))
            except Exception as e:  # noqa: BLE001 - one unreadable row must not stop the others
                uri = f"{batch['path'][i]}#{image_id}"
                rows.append({"image_id": image_id, "uri": uri, "error": f"{uri}: {type(e).__name__}: {e}", "height": 0, "width": 0,
                             "image": empty_array(), "truth": empty_array(np.uint16, None), "truth_classes": np.zeros(0, np.int32)})
        return _columns(rows, READ_COLUMNS)


def _columns(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    arrays = {"image", "truth", "truth_classes", "pred", "pred_classes", "pred_scores"}
    out = columns_of([{k: v for k, v in r.items() if k not in arrays} for r in rows], tuple(n for n in names if n not in arrays))
    for name in names:
        if name in arrays:
            out[name] = [r[name] for r in rows]
    return {n: out[n] for n in names}


class InstancePredictor:
    """``map_batches`` actor: fitted images -> instance maps, classes and scores at each image's own size."""

    def __init__(self, model_uri: str, model_id: str, mean, std, size, fit: str, threshold: float = 0.5):
        import tensorflow as tf  # noqa: F401 - loaded once per actor

        from segray.runs import load_keras
        from segray.runs import share_gpus, weights_id

        share_gpus()
        self.model = load_keras(model_uri)
        if weights_id(self.model) != model_id:
            raise RuntimeError(f"{model_uri} changed after predict started (weights {weights_id(self.model)}, pinned {model_id}); run predict again")
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.size, self.fit, self.threshold = size, fit, threshold

    def _one(self, image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import tensorflow as tf

        from segray.inference.geometry import fit_scale, fitted_content, restore
        from segray.models import bottom_up_probabilities, instances_from_detections, instances_from_outputs, is_bottom_up, paste_instances

        # One image per call: an object does not depend on the batch it came in (a resume gives the same maps).
        outputs = self.model(tf.constant(((image - self.mean) / self.std)[None]), training=False)
        sy, sx = fit_scale(height, width, self.size, self.fit)
        if is_bottom_up(outputs):
            # The heads' probabilities back at the image's own size, then the watershed there.
            boundary, classes = bottom_up_probabilities(outputs)
            content = fitted_content(height, width, tuple(self.size), self.fit) if self.size else (height, width)
            both = restore(np.concatenate([boundary[0], classes[0]], axis=-1), content, height, width)
            found = instances_from_outputs(both[..., :3], both[..., 3:])
            return found["instances"], found["classes"], found["scores"]
        found = instances_from_detections(outputs, image.shape[0], image.shape[1], self.threshold)[0]
        boxes = found["boxes"] / np.array([sy, sx, sy, sx], np.float32)
        instance_map, keep = paste_instances(boxes, found["masks"], found["scores"], height, width, self.threshold)
        return instance_map, found["classes"][keep].astype(np.int32), found["scores"][keep].astype(np.float32)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for i in range(len(batch["image_id"])):
            row = {k: batch[k][i] for k in READ_COLUMNS if k != "image"}
            row.update(pred=empty_array(np.uint16, None), pred_classes=np.zeros(0, np.int32), pred_scores=np.zeros(0, np.float32))
            if not row["error"]:
                try:
                    row["pred"], row["pred_classes"], row["pred_scores"] = self._one(batch["image"][i], int(row["height"]), int(row["width"]))
                except Exception as e:  # noqa: BLE001 - this image fails, the rest go on
                    row["error"] = f"{row['uri']}: model failed: {type(e).__name__}: {e}"
            rows.append(row)
        return _columns(rows, OUT_COLUMNS)


class WriteInstances:
    """``map_batches`` body (Ray tasks): instance maps -> PNGs, object rows, metric records, semantic records (last)."""

    def __init__(self, out: Output, class_names: list[str], num_classes: int, model_id: str, run: int):
        self.out, self.class_names, self.num_classes, self.model_id, self.run = out, class_names, num_classes, model_id, run

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from segray.inference.objects import objects_table
        from segray.metrics import semantic_from_instances
        from segray.metrics import image_record

        records, objects, metric_rows = [], [], []
        for i in range(len(batch["image_id"])):
            image_id, uri, error = str(batch["image_id"][i]), str(batch["uri"][i]), str(batch["error"][i])
            if error:
                records.append(error_record(image_id, uri, error, self.run))
                continue
            pred, classes, scores = batch["pred"][i], batch["pred_classes"][i], batch["pred_scores"][i]
            truth = batch["truth"][i] if batch["truth"][i].size else None
            truth_classes = batch["truth_classes"][i] if truth is not None else None
            storage.write_bytes(instance_path(self.out, image_id), encode_png(pred.astype(np.uint16)))
            semantic = semantic_from_instances(pred, classes).astype(np.uint8)
            storage.write_bytes(self.out.mask(image_id), encode_png(semantic))
            table = objects_table(pred, classes, scores, truth, truth_classes, image_id, self.class_names, self.model_id)
            objects.append(table.append_column("run", pa.array([self.run] * table.num_rows, pa.int64())))
            truth_semantic = None
            if truth is not None:
                metric_rows.append({**image_record(image_id, truth, truth_classes, pred, classes, scores), "run": self.run})
                truth_semantic = semantic_from_instances(truth, truth_classes).astype(np.uint8)
            records.append(ok_record(image_id, uri, batch["height"][i], batch["width"][i], truth_semantic, semantic, None, self.run))
        if records:
            ids = [r["image_id"] for r in records]
            if objects:
                storage.write_parquet(pa.concat_tables(objects), _side_path(self.out, OBJECTS, ids))
            schema = _record_schema().append(pa.field("run", pa.int64()))
            storage.write_parquet(pa.Table.from_pylist(metric_rows, schema=schema), _side_path(self.out, INSTANCE_PARTS, ids))
            storage.write_parquet(records_table(records), self.out.part(ids))
        return {
            "image_id": np.asarray([r["image_id"] for r in records], dtype=object),
            "status": np.asarray([r["status"] for r in records], dtype=object),
        }


def _read_side(out: Output, folder: str, schema: pa.Schema) -> pa.Table:
    import pyarrow.parquet as pq

    root = storage.join(out.root, folder)
    files = [f.uri for f in storage.list_files(root) if f.uri.endswith(".parquet")]
    if not files:
        return schema.empty_table()
    fs, _ = storage.filesystem(out.root)
    return pq.read_table([storage.filesystem(f)[1] for f in files], filesystem=fs, schema=schema)


def _latest(table: pa.Table, records: pa.Table) -> pa.Table:
    """The rows of ``table`` written by the run of each image's kept ``ok`` record (one copy per image and run)."""
    ok = records.filter(pc.equal(records["status"], "ok")).select(["image_id", "run"])
    if table.num_rows == 0 or ok.num_rows == 0:
        return table.slice(0, 0)
    def keys(t: pa.Table) -> pa.Array:
        return pc.binary_join_element_wise(t["image_id"], pc.cast(t["run"], pa.string()), "\x00")

    # A file rewritten by a retried task has the same name, so one run leaves one copy of an image's rows.
    return table.filter(pc.is_in(keys(table), keys(ok)))


def predict_instances(cfg: PredictConfig, spec, started: float, run: int) -> PredictResult:
    """``segray.predict`` for an instance model; ``spec`` from ``resolve_model``.

    Raises:
        ValueError: the input is not Parquet shards (raw instance layouts: ingest them first), or a flag predict's instance path does not take.
    """
    import ray

    from segray.data import read_shards, write_errors
    from segray.inference.instance_tables import instance_per_class, write_image_quality
    from segray.inference.objects import OBJECTS_SCHEMA
    from segray.inference.sources import list_source
    from segray.metrics import InstanceMetrics
    from segray.ownership import canonical
    from segray.runtime import bounded_retries

    for name, value, default in (("tile", cfg.tile, None), ("tta", cfg.tta, "none"), ("backend", cfg.backend, "tensorflow")):
        if value != default:
            raise about(name, ValueError(f"{name} {value}: not available for the instance model {spec.uri} ({spec.name}); leave `{name}` out"))
    source = list_source(cfg.input, cfg.split, cfg.layout, cfg.classes, cfg.class_order, cfg.priority, cfg.images_dir)
    if source.kind != SHARDS:
        raise about("input", ValueError(f"input {cfg.input}: an instance model {spec.uri} reads ingested Parquet shards; run `segray ingest --task instance` first"))
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(source.shards[0].uri)
    has_truth = all("instances" in pq.read_schema(storage.filesystem(s.uri)[1], filesystem=fs).names for s in source.shards)
    names = [c.name for c in spec.classes]
    out = Output(cfg.output)
    identity = {
        "format": "segray-predict/1", "task": FORMAT_TASK, "model_id": spec.model_id, "source": canonical(source.uri),
        "source_fingerprint": source.fingerprint, "size": list(spec.size) if spec.size else None, "fit": spec.fit,
        "classes": names, "mean": list(spec.mean), "std": list(spec.std),
    }
    claim(out, identity)
    storage.write_text(out.classes, json.dumps(class_list(spec.classes), indent=2))
    # Done: an ok record, its class mask and its instance map in place.
    maps = {storage.basename(f.uri)[: -len(".png")] for f in storage.list_files(storage.join(out.root, INSTANCES)) if f.uri.endswith(".png")}
    finished = completed(out) & maps
    todo = [i for i in source.ids if i not in finished]
    processed = 0
    if todo:
        columns = ["image_id", "image"] + (["instances", "classes"] if has_truth else [])
        ds = read_shards(source.shards, columns, include_path=True)
        reader = ReadInstances(spec.size, spec.fit, spec.multiple, spec.mean, frozenset(finished))
        with bounded_retries() as retries:
            ds = ds.map_batches(reader, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=LIGHT_TASK_CPUS, **retries)
        ds = ds.map_batches(
            InstancePredictor,
            fn_constructor_kwargs={"model_uri": spec.uri, "model_id": spec.model_id, "mean": tuple(spec.mean), "std": tuple(spec.std),
                                   "size": tuple(spec.size) if spec.size else None, "fit": spec.fit},
            batch_size=cfg.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.workers),
            num_cpus=1, **({"num_gpus": cfg.gpus_per_worker} if cfg.gpus_per_worker > 0 else {}),
        )
        writer = WriteInstances(out, names, len(names), spec.model_id, run)
        with bounded_retries() as retries:
            ds = ds.map_batches(writer, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=LIGHT_TASK_CPUS, **retries)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            processed += len(batch["image_id"])

    remove_temporaries(out)
    records = merged_records(out, source.ids)
    errors = list(source.errors)
    failed = records.filter(pc.equal(records["status"], ERROR)).select(["uri", "reason"])
    errors += [(r["uri"], r["reason"]) for r in failed.to_pylist()]
    seen = set(records["image_id"].to_pylist())
    for image_id in sorted(set(source.ids) - seen):
        errors.append((image_id, f"{image_id}: no result was written (the pipeline lost the image; re-run to retry it)"))

    objects_schema = OBJECTS_SCHEMA.append(pa.field("run", pa.int64()))
    objects = _latest(_read_side(out, OBJECTS, objects_schema), records).sort_by([("image_id", "ascending"), ("instance_id", "ascending")])
    storage.write_parquet(objects.select(OBJECTS_SCHEMA.names).cast(OBJECTS_SCHEMA), storage.join(out.root, "instances.parquet"))

    scores: dict[str, Any] = {}
    frames = None
    if has_truth:
        scores, frames = score_tables(records, names, spec.model_id)
        metric_schema = _record_schema().append(pa.field("run", pa.int64()))
        parts = _latest(_read_side(out, INSTANCE_PARTS, metric_schema), records)
        metrics = InstanceMetrics(len(names))
        for record in parts.to_pylist():
            metrics.add_record(record)
        instance_summary = metrics.summary()
        write_image_quality(out.root, metrics.records)  # per-image PQ (segray report's worst images)
        per_class, per_class_schema = instance_per_class(frames["per_class"], metrics, names, spec.model_id)
        frames["per_class"] = per_class
        scores.update({k: v for k, v in instance_summary.items() if k != "images"})
    write_errors(out.root, errors)
    if frames is not None:
        for name, frame in frames.items():
            schema = per_class_schema if name == "per_class" else table_schema(name, len(names))
            write_frame(frame, schema, out.table(name))
    wall = time.time() - started
    summary = {
        "task": FORMAT_TASK,
        "images": records.num_rows - failed.num_rows,
        **scores,
        "objects": objects.num_rows,
        "errors": len(errors),
        "model_id": spec.model_id,
        "model": spec.uri,
        "source": source.uri,
        "source_kind": source.kind,
        "has_truth": has_truth,
        "config": {**cfg.to_dict(), "resolved": {"model": spec.describe()}},
        "images_this_run": processed,
        "wall_time_s": round(wall, 3),
        "warnings": list(spec.warnings),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    summary = json.loads(json.dumps(summary, default=_json_value))
    storage.write_text(out.summary, json.dumps(summary, indent=2))
    if frames is None:
        from segray.inference.tables import empty_tables

        frames = empty_tables(len(names))
    return PredictResult(out.root, summary, frames["per_class"], frames["per_image"], frames["confusion"], errors)
