"""``segray predict``: a Ray Data streaming pipeline from storage to masks and tables.

    list (driver, names only) -> read + decode + fit, uint8 (CPU tasks)
      -> normalise in-graph + predict + map back to each image's size (actor pool, GPUs if any)
      -> overlays, masks, one record part per batch (CPU tasks)
    then, on the driver: merge the parts into the tables and summary.json.

Ray Data streams blocks through the stages with bounded buffers, so memory
stays flat however many images there are; the driver keeps only names and
the small per-image records. Re-running the same command after a crash skips
the images whose mask and record are in place and merges again.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import time
from typing import Any

import pyarrow.compute as pc

from segray import storage
from segray.config import ConfigError, PredictConfig, about
from segray.inference.geometry import Geometry
from segray.inference.output import Output, PredictResult, claim, completed, merged_records, remove_temporaries, write_results
from segray.inference.sources import SHARDS, Source, list_source
from segray.inference.tables import ERROR, score_tables
from segray.ownership import canonical
from segray.runs import ModelSpec, class_list, resolve_model
from segray.runtime import bounded_retries

FORMAT = "segray-predict/1"

# Bytes of decoded images Ray Data may hold in the object store at once, per
# actor: a few batches queued ahead of each model, never the dataset.
BATCHES_IN_FLIGHT = 8
MIN_IN_FLIGHT_BYTES = 64 * 2**20
UNKNOWN_IMAGE_BYTES = 1024 * 1024 * 13  # an image of unknown size: 1024x1024 float32 RGB (16-bit files) + mask

# Read/decode and write tasks ask for half a CPU: they are light next to the
# model, and a resource request different from the predictor's keeps Ray Data
# from fusing the decoding into the actor (which would serialise it with the
# model instead of overlapping the two).
LIGHT_TASK_CPUS = 0.5


def resolve_geometry(cfg: PredictConfig, spec: ModelSpec) -> Geometry:
    """How images reach the model, from the flags and the model (``geometry_of``).

    Raises:
        ValueError: ``tile`` or ``tta`` does not suit the model, naming the valid values.
    """
    return geometry_of(spec, cfg.tile, cfg.overlap, cfg.weighting, cfg.tta, cfg.min_component)


def geometry_of(
    spec: ModelSpec, tile=None, overlap: float = 0.5, weighting: str = "gaussian", tta: str = "none", min_component: int = 0,
) -> Geometry:
    """How images reach the model: shared by predict and serve, so both give the same masks.

    - ``tile`` given: windows of ``tile`` at each image's own resolution.
    - else the model's ``window`` (a patch-trained model): that window slides
      over each image, fitted to the trained ``size`` first when there is one.
    - else fitted to the trained ``size``, or whole images.

    Args:
        overlap: fraction of a window shared by neighbouring windows, per axis.
        weighting, tta, min_component: as ``Geometry``'s.

    Raises:
        ValueError: ``tile`` or ``tta`` does not suit the model, naming the valid values.
    """
    m = spec.multiple
    post = {"weighting": weighting, "tta": tta, "min_component": min_component}
    if tile:
        th, tw = tile
        if spec.static_size and (th, tw) != spec.static_size:
            raise about("tile", ValueError(f"tile {th}x{tw}: the model {spec.uri} only takes {spec.static_size[0]}x{spec.static_size[1]} inputs; use `tile` {spec.static_size[0]}x{spec.static_size[1]}"))
        if th % m or tw % m:
            near = lambda n: " or ".join(str(v) for v in sorted({max(m, n // m * m), -(-n // m) * m}))  # noqa: E731
            raise about("tile", ValueError(f"tile {th}x{tw}: the model ({spec.name}) needs sides divisible by {m}; nearest valid height {near(th)}, width {near(tw)}"))
        geometry = Geometry("tile", multiple=m, tile=(th, tw), overlap=_overlap_pixels((th, tw), overlap), **post)
    elif spec.window and spec.size and tuple(spec.window) == tuple(spec.size):
        geometry = Geometry("fit", size=tuple(spec.size), fit=spec.fit, multiple=m, **post)  # one window is the fitted image
    elif spec.window:
        window = tuple(spec.window)
        size = {"size": tuple(spec.size), "fit": spec.fit} if spec.size else {}
        geometry = Geometry("fit" if spec.size else "tile", multiple=m, tile=window, overlap=_overlap_pixels(window, overlap), **size, **post)
    elif spec.size:
        geometry = Geometry("fit", size=tuple(spec.size), fit=spec.fit, multiple=m, **post)
    else:
        geometry = Geometry("whole", multiple=m, **post)
    if tta == "flip8":
        side = geometry.tile or geometry.size
        if side and side[0] != side[1]:
            what = f"{'tile' if geometry.tile else 'size'} {side[0]}x{side[1]}"
            raise about("tta", ValueError(f"tta flip8: the transposed views need a square model input, the {what} is not; use `tta` flip"))
    return geometry


def _overlap_pixels(window: tuple[int, int], overlap: float) -> tuple[int, int]:
    return min(window[0] - 1, round(window[0] * overlap)), min(window[1] - 1, round(window[1] * overlap))


def _identity(spec: ModelSpec, source: Source, geometry: Geometry, backend: str) -> dict[str, Any]:
    """What the results depend on; written to OUT/_run.json before anything else."""
    # The backend is named only when it is not TensorFlow, so OUTs written before it existed still resume;
    # so is a layout other than ids (its truth depends on the classes and priority read).
    extra = {"backend": backend} if backend != "tensorflow" else {}
    if source.layout != "ids":
        extra.update(layout=source.layout, truth_classes=[c.name for c in source.truth_classes or []], priority=source.priority)
    return {
        **extra,
        "format": FORMAT,
        "model_id": spec.model_id,
        "source": canonical(source.uri),
        "source_fingerprint": source.fingerprint,
        "geometry": geometry.lineage(),
        "classes": [c.name for c in spec.classes],
        "mean": list(spec.mean),
        "std": list(spec.std),
        "ignore_index": spec.ignore_index,
    }


def layout_options(cfg: PredictConfig, spec: ModelSpec) -> tuple[list[str] | None, list[str] | None]:
    """(class_order, priority) to read a per-class input with: the flags', else the model's.

    The model's classes after background are its class order, and its
    recorded priority (``preprocessing.json``) the priority, so a held-out
    folder of the training data's layout is read the way the model was trained.
    """
    if cfg.layout != "per-class":
        return cfg.class_order, cfg.priority
    order = cfg.class_order or [c.name for c in spec.classes[1:]]
    priority = cfg.priority or (list(spec.priority) if spec.priority else None)
    return order, priority


def _check_layout_classes(cfg: PredictConfig, source: Source, spec: ModelSpec) -> None:
    """A raw palette or per-class input must give the model's classes in its order, and a per-class one its priority.

    Raises:
        ValueError: naming both orders.
    """
    if source.layout == "ids" or spec.preprocessing_uri is None:  # no class names to compare (ids: counts are checked)
        return
    read = [c.name for c in source.classes or []]
    model = [c.name for c in spec.classes]
    if read != model:
        field = "class_order" if source.layout == "per-class" else "classes"
        how = "`class_order` (ids 1.. after background)" if source.layout == "per-class" else "the classes file"
        raise about(field, ValueError(
            f"{field}: {source.uri} read with {how} gives the classes [{', '.join(read)}]; "
            f"the model {spec.uri} predicts [{', '.join(model)}] (ids 0..{len(model) - 1}); give the model's classes in its order"
        ))
    if source.layout == "per-class" and spec.priority and list(source.priority or []) != list(spec.priority):
        raise about("priority", ValueError(
            f"priority [{', '.join(source.priority or [])}] differs from the overlap priority the model {spec.uri} was trained with "
            f"[{', '.join(spec.priority)}]: the truth would be painted otherwise than in training; leave `priority` out to use the model's"
        ))


def _check_classes(source: Source, spec: ModelSpec) -> None:
    if source.classes is not None and len(source.classes) != spec.num_classes:
        raise about("input", ValueError(
            f"input {source.uri} declares {len(source.classes)} classes ({', '.join(c.name for c in source.classes)}); "
            f"the model {spec.uri} predicts {spec.num_classes} ({', '.join(c.name for c in spec.classes)})"
        ))


def _check_gpus(cfg: PredictConfig) -> None:
    import ray

    if cfg.gpus_per_worker > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        import warnings

        # Not an error: an autoscaling cluster adds GPU nodes on demand.
        warnings.warn(f"gpus_per_worker {cfg.gpus_per_worker:g}: the cluster has no GPU now; predict waits until one joins", UserWarning, stacklevel=3)


def in_flight_bytes(cfg: PredictConfig, geometry: Geometry) -> int:
    """The object-store budget of the pipeline: it bounds memory whatever the number of images."""
    if geometry.mode == "fit":
        h, w = geometry.size
        per_image = h * w * 13  # RGB input (float32 for 16-bit files, else uint8) + uint8 truth, at about the model's size
    else:
        per_image = UNKNOWN_IMAGE_BYTES
    return max(MIN_IN_FLIGHT_BYTES, BATCHES_IN_FLIGHT * cfg.batch_size * cfg.workers * per_image)


def _run_pipeline(
    cfg: PredictConfig, out: Output, spec: ModelSpec, source: Source, geometry: Geometry, finished: set[str], run: int
) -> tuple[int, float | None]:
    """Streams the images not yet ``finished`` through the stages into ``out``.

    Returns:
        (images processed, steady-state images/s: see ``steady_rate``).
    """
    import ray

    from segray.inference.predictor import Predictor
    from segray.inference.sources import ReadDecode, dataset_of
    from segray.inference.writer import WriteResults

    _check_gpus(cfg)
    overlay_ids = frozenset(source.ids[: cfg.overlays])
    skip = frozenset(finished) if source.kind == SHARDS else frozenset()
    reader = ReadDecode(source.kind, geometry, spec.num_classes, skip, overlay_ids, cfg.max_pixels, source.layout, source.truth_classes)
    writer = WriteResults(out, spec.ignore_index, [tuple(c.color) for c in spec.classes], run)
    predictor_args: dict[str, Any] = {"num_cpus": 1}
    predictor_kwargs: dict[str, Any] = {
        "model_uri": spec.uri, "geometry": geometry, "batch_size": cfg.batch_size, "model_id": spec.model_id,
        "mean": tuple(spec.mean), "std": tuple(spec.std),
    }
    if cfg.backend == "onnxruntime":
        converted_model = converted(spec, geometry)
        # A reference, not the bytes: Ray warns about large constructor arguments of restartable actors.
        predictor_kwargs.update(onnx_model=ray.put(converted_model.data), onnx_id=converted_model.onnx_id)
    if cfg.gpus_per_worker > 0:
        predictor_args["num_gpus"] = cfg.gpus_per_worker
    ds = dataset_of(source, finished, cfg.batch_size)
    # Bad files are error rows, not task failures; a task that still fails (a lost
    # node, storage down) is retried a bounded number of times, not forever.
    with bounded_retries() as retries:
        ds = ds.map_batches(reader, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=LIGHT_TASK_CPUS, **retries)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs=predictor_kwargs,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        **predictor_args,
    )
    with bounded_retries() as retries:
        ds = ds.map_batches(writer, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=LIGHT_TASK_CPUS, **retries)
    # Without a budget Ray Data lets decoded images pile up ahead of a slower
    # model up to half the object store, so memory would grow with the input.
    options = copy.deepcopy(ds.context.execution_options)
    options.resource_limits = options.resource_limits.copy(object_store_memory=in_flight_bytes(cfg, geometry))
    ds.context.execution_options = options
    done = 0
    marks: list[tuple[float, int]] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if len(batch["image_id"]):
            done += len(batch["image_id"])
            marks.append((time.perf_counter(), done))
    return done, steady_rate(marks, done)


def converted(spec: ModelSpec, geometry: Geometry):
    """The pinned model converted to ONNX on the driver (``segray.export.session.convert``).

    With windows, or in ``fit`` mode, every input has one size, which the conversion fixes.

    Raises:
        RuntimeError: the file's weights are no longer the pinned ones.
    """
    import tensorflow as tf

    from segray.export import convert
    from segray.runs import load_keras, weights_id

    with tf.device("/CPU:0"):
        net = load_keras(spec.uri)
        if weights_id(net) != spec.model_id:
            raise RuntimeError(f"{spec.uri} changed after predict started (weights {weights_id(net)}, pinned {spec.model_id}); run predict again")
        size = geometry.tile or geometry.size
        return convert(net, tuple(size) if size else None)


def inference_settings(geometry: Geometry) -> dict[str, Any]:
    """The settings that make the masks, as summary.json's ``inference`` reports them."""
    from segray.inference.tta import VIEWS

    windowed = geometry.tile is not None
    return {
        "mode": geometry.mode,
        "window": list(geometry.tile) if windowed else None,
        "overlap": list(geometry.overlap) if windowed else None,
        "weighting": geometry.weighting if windowed else None,
        "tta": geometry.tta,
        "tta_views": len(VIEWS[geometry.tta]),
        "min_component": geometry.min_component,
    }


def steady_rate(marks: list[tuple[float, int]], total: int) -> float | None:
    """Images/s between 10% and 90% of the images done (start-up and tail left out).

    Args:
        marks: (time, images done so far) at each finished batch.
        total: images done in all.

    Returns:
        The rate, or None with fewer than 4 batches (too few to tell).
    """
    if len(marks) < 4:
        return None
    lo = next(m for m in marks if m[1] >= 0.1 * total)
    hi = next(m for m in marks if m[1] >= 0.9 * total)
    if hi[0] <= lo[0]:
        return None
    return (hi[1] - lo[1]) / (hi[0] - lo[0])


def predict(cfg: PredictConfig) -> PredictResult:
    """Segments every image of ``cfg.input`` and, where truth masks come with them, scores them.

    Leaves in ``cfg.output``: ``masks/<id>.png``, ``overlays/<id>.png`` (first
    ``cfg.overlays`` ids), ``per_image.parquet``, ``per_class.parquet``,
    ``confusion.parquet`` (with truth), ``summary.json``, ``_errors.parquet``,
    ``classes.json`` and ``_run.json``. Re-running after a crash processes only
    what is missing.

    Raises:
        FileNotFoundError: no model or no input where the flags point.
        FileExistsError: OUT holds results of another model, source or settings.
        ValueError: a flag or file that cannot work, named in the message.
    """
    started, run = time.time(), time.time_ns()
    spec = resolve_model(cfg.model)
    from segray.inference.instance_pipeline import model_task, predict_instances

    if model_task(spec.name) == "instance":
        return predict_instances(cfg, spec, started, run)
    geometry = resolve_geometry(cfg, spec)
    from segray.inference.rasters import predict_rasters, raster_inputs

    rasters = raster_inputs(cfg.input)
    if rasters is not None:
        return predict_rasters(cfg, rasters, spec, geometry, FORMAT, inference_settings(geometry), lambda: converted(spec, geometry))
    class_order, priority = layout_options(cfg, spec)
    try:
        source = list_source(cfg.input, cfg.split, cfg.layout, cfg.classes, class_order, priority, cfg.images_dir)
    except ConfigError as e:
        if e.field != "class_order" or cfg.class_order:
            raise
        # The order came from the model: say so, or the message blames a flag the user never gave.
        detail = str(e).removeprefix("class_order: ")
        raise ConfigError(f"class_order (the model's classes after background, {', '.join(class_order or [])}): {detail}", field="class_order") from None
    _check_layout_classes(cfg, source, spec)
    _check_classes(source, spec)
    if not source.ids and not source.errors:
        raise about("input", FileNotFoundError(f"input {cfg.input}: no images found"))
    out = Output(cfg.output)
    claim(out, _identity(spec, source, geometry, cfg.backend))
    storage.write_text(out.classes, json.dumps(class_list(spec.classes), indent=2))

    finished = completed(out)
    todo = any(i not in finished for i in source.ids)
    processed, steady = _run_pipeline(cfg, out, spec, source, geometry, finished, run) if todo else (0, None)

    remove_temporaries(out)
    records = merged_records(out, source.ids)
    errors = list(source.errors)
    seen = set(records["image_id"].to_pylist())
    failed = records.filter(pc.equal(records["status"], ERROR)).select(["uri", "reason"])
    errors += [(r["uri"], r["reason"]) for r in failed.to_pylist()]
    for image_id in sorted(set(source.ids) - seen):
        errors.append((image_id, f"{image_id}: no result was written (the pipeline lost the image; re-run to retry it)"))
    names = [c.name for c in spec.classes]
    scores, frames = score_tables(records, names, spec.model_id) if source.has_truth else ({}, None)
    wall = time.time() - started
    segmented = records.num_rows - failed.num_rows
    summary = {
        "images": segmented,
        **scores,
        "errors": len(errors),
        "model_id": spec.model_id,
        "model": spec.uri,
        "source": source.uri,
        "source_kind": source.kind,
        "has_truth": source.has_truth,
        "config": {**cfg.to_dict(), "resolved": {"geometry": dataclasses.asdict(geometry), "model": spec.describe()}},
        "inference": inference_settings(geometry),
        "images_this_run": processed,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(processed / wall, 3) if processed else None,
        "steady_images_per_s": round(steady, 3) if steady else None,
        "backend": cfg.backend,
        "warnings": list(spec.warnings),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return write_results(out, frames, len(names), summary, errors)
