"""``segray ingest``: raw layout -> checked Parquet shards + dataset.json.

The driver lists and pairs files (listings only), groups the pairs into chunks
of about ``shard_mb`` of source bytes, and a Ray Data pipeline processes the
chunks in parallel: each task reads its pairs, checks them, and writes one
Parquet shard per split. Only small per-pair metadata comes back to the
driver, so memory does not grow with the dataset. ``dataset.json`` is written
last: a DST without it is not a dataset, whatever else it holds.
"""

from __future__ import annotations

import heapq
import io
import json
import math
import re
import time
import uuid
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from segray import storage
from segray.config import ConfigError, IngestConfig, about
from segray.data.imageio import VALUE_RANGE, VALUE_RULE, BadInput, check_pixels, decode_image, encode_png, to_common_range
from segray.data.info import IGNORE_INDEX, ClassInfo, DatasetInfo, default_color
from segray.data.layouts import PaintedLayers, Plan, build_mask, list_pairs, paint_layers
from segray.data.quarantine import ERRORS_FILE, errors_uri, write_errors
from segray.data.shards import stable_hash
from segray.ownership import MARKER, canonical, claim_folder, clear_owned, read_marker, refuse_overlap, write_marker
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


def val_count(n: int, fraction: float) -> int:
    """How many of ``n`` ids go to val: ``round(fraction x n)`` (halves up).

    At least 1 when ``fraction`` is above 0 and ``n`` is 2 or more, and at
    most ``n - 1``, so neither split is emptied by rounding.
    """
    if n < 2 or fraction <= 0:
        return 0
    return min(max(math.floor(fraction * n + 0.5), 1), n - 1)


def split_rank(image_id: str, seed: int = 0) -> int:
    """An id's place in the split draw: its stable hash (salted by ``seed``, 0 being the plain hash)."""
    return stable_hash(image_id if seed == 0 else f"{seed}\x00{image_id}")


def choose_val(image_ids: Iterable[str], fraction: float, seed: int = 0) -> set[str]:
    """The val ids: the ``val_count`` ids of lowest ``split_rank``.

    The same ids (and seed) always give the same split, in any order and in
    any process. Adding ids can move an earlier id between splits: the
    cut-off rank moves with the count (see the README; pin a split with
    ``val_ids``).
    """
    ids = list(image_ids)
    k = val_count(len(ids), fraction)
    return set(heapq.nsmallest(k, ids, key=lambda i: (split_rank(i, seed), i)))


def read_val_ids(uri: str) -> list[str]:
    """The ids of a ``val_ids`` file: one a line; blank lines and lines starting with '#' are skipped.

    Raises:
        ConfigError: the file is missing or lists no id.
    """
    if not storage.exists(uri):
        raise ConfigError(f"val_ids {uri}: no such file", field="val_ids")
    ids = [line.strip() for line in storage.read_text(uri).splitlines()]
    ids = list(dict.fromkeys(i for i in ids if i and not i.startswith("#")))
    if not ids:
        raise ConfigError(f"val_ids {uri}: lists no image id (one id a line)", field="val_ids")
    return ids


def split_plan(cfg: IngestConfig, image_ids: Sequence[str]) -> tuple[set[str], dict[str, Any]]:
    """(the val ids, the record of how they were chosen) for the listed ids.

    ``val_ids`` pins the split (its ids found in the listing are val, every
    other id is train); else ``choose_val`` draws ``val_fraction`` of the ids.
    """
    if cfg.val_ids:
        pinned = read_val_ids(cfg.val_ids)
        listed = set(image_ids)
        val = {i for i in pinned if i in listed}
        missing = [i for i in pinned if i not in listed]
        record: dict[str, Any] = {"rule": "pinned", "val_ids_file": cfg.val_ids, "pinned": len(pinned), "pinned_missing": len(missing)}
        if not val:
            raise ConfigError(f"val_ids {cfg.val_ids}: none of its {len(pinned)} ids is in the source {cfg.source}", field="val_ids")
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            warnings.warn(f"val_ids {cfg.val_ids}: {len(missing)} of its {len(pinned)} ids are not in the source {cfg.source} ({shown}); the others are the val split", UserWarning, stacklevel=3)
    else:
        val = choose_val(image_ids, cfg.val_fraction, cfg.split_seed)
        record = {"rule": "hash-rank", "fraction": cfg.val_fraction, "seed": cfg.split_seed}
    record.update(listed=len(image_ids), assigned_val=len(val))
    return val, record


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


def plan_chunks(plan: Plan, shard_mb: float, min_chunks: int) -> list[tuple[int, int]]:
    """Splits the pairs into ``(start, stop)`` runs of about ``shard_mb`` source bytes, at least ``min_chunks``."""
    pairs = plan.pairs
    total = sum(p.nbytes for p in pairs)
    n_chunks = max(math.ceil(total / (shard_mb * 2**20)), min(min_chunks, len(pairs)), 1)
    target = total / n_chunks
    per_chunk = math.ceil(len(pairs) / n_chunks)
    bounds, start, size = [], 0, 0
    for k, pair in enumerate(pairs):
        if k > start and (size + pair.nbytes > target * 1.05 or k - start >= per_chunk):
            bounds.append((start, k))
            start, size = k, 0
        size += pair.nbytes
    if len(pairs) > start:
        bounds.append((start, len(pairs)))
    return bounds


def chunk_items(plan: Plan, src: str, bounds: list[tuple[int, int]], val: Collection[str] = frozenset(),
                extra: Callable[[Any], list[Any]] | None = None) -> list[dict[str, Any]]:
    """One Ray item per chunk: its pairs as compact JSON, file names relative to ``src``.

    ``[[image_id, image, [mask, ...], in_val, *extra(pair)], ...]`` (``in_val``
    1 for the ids in ``val``, else 0; ``extra`` adds a layout's own fields, as
    a COCO image's annotations): a million pairs take about 70 MB of text on
    the driver, not a dict per pair.
    """
    root = src.rstrip("/") + "/"

    def rel(uri: str) -> str:
        return uri[len(root):] if uri.startswith(root) else uri

    items = []
    for number, (start, stop) in enumerate(bounds):
        text = io.StringIO()  # pair by pair: no list of a whole chunk's pairs
        text.write("[")
        for k in range(start, stop):
            p = plan.pairs[k]
            row = [p.image_id, rel(p.image_uri), [rel(m) for m in p.mask_uris], int(p.image_id in val), *(extra(p) if extra else ())]
            text.write(("," if k > start else "") + json.dumps(row, separators=(",", ":")))
        text.write("]")
        items.append({"chunk": number, "root": root, "pairs": text.getvalue()})
    return items


def _pairs_of(item: dict[str, Any]) -> list[dict[str, Any]]:
    root = item["root"]

    def uri(name: str) -> str:
        return name if storage.is_absolute(name) else root + name

    pairs = []
    for image_id, image, masks, *in_val in json.loads(item["pairs"]):
        split = "val" if in_val and in_val[0] else "train"
        pairs.append({"image_id": image_id, "image_uri": uri(image), "mask_uris": [uri(m) for m in masks], "split": split})
    return pairs


class _ChunkWriter:
    """Ray task body: checks the pairs of one chunk and writes its shards."""

    def __init__(self, dst: str, layout: str, classes: list[ClassInfo] | None, run_id: str, max_pixels: int):
        self.max_pixels = max_pixels
        self.dst = dst
        self.layout = layout
        self.classes = classes
        self.run_id = run_id

    def _process_pair(self, pair: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray, str, PaintedLayers | None]:
        """(shard row, image on the common 0..255 scale, class-id mask, the file's dtype, per-class: the painted layers)."""
        image_bytes = storage.read_bytes(pair["image_uri"])
        try:
            stored = decode_image(image_bytes, self.max_pixels, keep_dtype=True)
        except BadInput as e:
            raise BadInput(f"{pair['image_uri']}: {e}") from None
        image = to_common_range(stored)
        blobs = []
        for uri in pair["mask_uris"]:
            blob = storage.read_bytes(uri)
            try:
                check_pixels(blob, self.max_pixels)
            except BadInput as e:
                raise BadInput(f"{uri}: {e}") from None
            blobs.append((uri, blob))
        painted = None
        try:
            if self.layout == "per-class":
                painted = paint_layers(blobs, self.classes or [], self.max_pixels)
                mask = painted.mask
            else:
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
        return row, image, mask, str(stored.dtype), painted

    def __call__(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per rejected pair, then one row of the chunk's statistics.

        The statistics are sums (class pixels per split, channel sums, image
        counts, sizes, dtypes), so the driver adds a row per chunk: its
        memory does not grow with the number of images.
        """
        rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        stats = _Stats()
        out = []
        for pair in _pairs_of(item):
            split = pair["split"]
            try:
                row, image, mask, dtype, painted = self._process_pair(pair)
            except BadInput as e:
                out.append(_error(pair["image_uri"], str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
                out.append(_error(pair["image_uri"], f"{pair['image_uri']}: {type(e).__name__}: {e}"))
                continue
            rows[split].append(row)
            stats.add(split, image, mask, dtype, painted)
            if split == "val":
                stats.val_ids.append(pair["image_id"])
        for split, split_rows in rows.items():
            if split_rows:
                table = pa.Table.from_pylist(split_rows, schema=SHARD_SCHEMA)
                storage.write_parquet(table, storage.join(self.dst, split, f"part-{item['chunk']:05d}-{self.run_id}.parquet"), row_group_size=64)
        out.append(stats.row())
        return out


class _Stats:
    """Sums of one chunk's (or the whole dataset's) good pairs."""

    def __init__(self) -> None:
        self.images = {s: 0 for s in SPLITS}
        self.class_pixels = {s: np.zeros(256, np.int64) for s in SPLITS}
        self.channel_sum = {s: np.zeros(3, np.float64) for s in SPLITS}
        self.channel_sumsq = {s: np.zeros(3, np.float64) for s in SPLITS}
        self.pixels = {s: 0 for s in SPLITS}
        self.sizes: set[tuple[int, int]] = set()
        self.dtypes: dict[str, int] = {}
        # The val split's ids (recorded in dataset.json), and per-class layers:
        # pixels per layer and pixels of a layer another class took ("lost,winner").
        self.val_ids: list[str] = []
        self.layer_pixels = np.zeros(256, np.int64)
        self.covered: dict[str, int] = {}

    def add(self, split: str, image: np.ndarray, mask: np.ndarray, dtype: str, painted: PaintedLayers | None = None) -> None:
        pixels = image.reshape(-1, 3).astype(np.float64)
        self.images[split] += 1
        self.class_pixels[split] += np.bincount(mask.ravel(), minlength=256).astype(np.int64)
        self.channel_sum[split] += pixels.sum(0)
        self.channel_sumsq[split] += (pixels**2).sum(0)
        self.pixels[split] += int(image.shape[0] * image.shape[1])
        if len(self.sizes) < 2:  # one shared size or "mixed": two are enough to tell
            self.sizes.add((int(image.shape[0]), int(image.shape[1])))
        self.dtypes[dtype] = self.dtypes.get(dtype, 0) + 1
        if painted is not None:
            for class_id, count in painted.layer_pixels.items():
                self.layer_pixels[class_id] += count
            for (lost, winner), count in painted.covered.items():
                key = f"{lost},{winner}"
                self.covered[key] = self.covered.get(key, 0) + count

    def row(self) -> dict[str, Any]:
        return {
            "uri": "",
            "reason": "",
            "stats": json.dumps(
                {
                    "images": self.images,
                    "class_pixels": {s: v.tolist() for s, v in self.class_pixels.items()},
                    "channel_sum": {s: v.tolist() for s, v in self.channel_sum.items()},
                    "channel_sumsq": {s: v.tolist() for s, v in self.channel_sumsq.items()},
                    "pixels": self.pixels,
                    "sizes": sorted(self.sizes),
                    "dtypes": self.dtypes,
                    "val_ids": self.val_ids,
                    "layer_pixels": self.layer_pixels.tolist(),
                    "covered": self.covered,
                }
            ),
        }

    def merge(self, text: str) -> None:
        other = json.loads(text)
        for s in SPLITS:
            self.images[s] += other["images"][s]
            self.class_pixels[s] += np.asarray(other["class_pixels"][s], np.int64)
            self.channel_sum[s] += np.asarray(other["channel_sum"][s], np.float64)
            self.channel_sumsq[s] += np.asarray(other["channel_sumsq"][s], np.float64)
            self.pixels[s] += other["pixels"][s]
        if len(self.sizes) < 2:
            self.sizes.update(tuple(x) for x in other["sizes"])
        for kind, n in other["dtypes"].items():
            self.dtypes[kind] = self.dtypes.get(kind, 0) + n
        self.val_ids.extend(other.get("val_ids", []))
        self.layer_pixels += np.asarray(other.get("layer_pixels", np.zeros(256)), np.int64)
        for key, n in other.get("covered", {}).items():
            self.covered[key] = self.covered.get(key, 0) + n


# A class that keeps less of its layer than this, because other classes lie
# on it, is named in a warning: its class-order or priority is likely wrong.
SURVIVAL_WARNING = 0.5


def layer_survival(stats: _Stats, classes: list[ClassInfo]) -> dict[str, dict[str, Any]]:
    """Per class of a per-class layout: its layer's pixels, the share the priority order kept, and who took the rest.

    Returns:
        ``{class: {"layer_pixels": n, "kept": share, "covered_by": {class: share}}}``,
        the ``covered_by`` shares of the layer's pixels, largest first.
    """
    names = {c.id: c.name for c in classes}
    lost: dict[int, dict[int, int]] = {}
    for key, count in stats.covered.items():
        loser, winner = (int(x) for x in key.split(","))
        lost.setdefault(loser, {})[winner] = count
    out = {}
    for c in classes:
        if c.id == 0 or c.id == IGNORE_INDEX:
            continue
        n = int(stats.layer_pixels[c.id])
        taken = lost.get(c.id, {})
        covered = {names.get(w, str(w)): count / n for w, count in sorted(taken.items(), key=lambda kv: -kv[1])} if n else {}
        out[c.name] = {"layer_pixels": n, "kept": (n - sum(taken.values())) / n if n else 1.0, "covered_by": covered}
    return out


def survival_warnings(info: DatasetInfo) -> list[str]:
    """One line per class that keeps under ``SURVIVAL_WARNING`` of its layer, naming the class on top of it."""
    lines = []
    for name, s in info.extra.get("layer_survival", {}).items():
        if s["layer_pixels"] and s["kept"] < SURVIVAL_WARNING and s["covered_by"]:
            top, share = next(iter(s["covered_by"].items()))
            lines.append(
                f"class {name!r} keeps {s['kept']:.2%} of its layer's {s['layer_pixels']:,} pixels: {top!r} lies on {share:.2%} of it "
                f"and comes first in the overlap priority ({', '.join(info.priority or [])}); if {name!r} is meant to show, "
                f"list it before {top!r} in `priority` (`class_order` sets the priority when `priority` is not given)"
            )
    return lines


def _error(uri: str, reason: str) -> dict[str, Any]:
    return {"uri": uri, "reason": reason, "stats": ""}


def _sweep_other_runs(dst: str, run_id: str) -> None:
    """Deletes shards of another ingest run in ``dst``: a killed run's task that wrote after it was replaced.

    Only names of segray's own pattern (``part-NNNNN-<run id>.parquet``)
    with another run id are deleted; a dataset then holds one run's shards.
    """
    own = re.compile(r"part-\d+-([0-9a-f]{8})\.parquet")
    for split in SPLITS:
        for entry in storage.list_files(storage.join(dst, split)):
            match = own.fullmatch(storage.basename(entry.uri))
            if match and match.group(1) != run_id:
                storage.delete_file(entry.uri)


def _unfinished(dst: str, src: str, command: str) -> IngestError | None:
    """The refusal for a DST that holds an ingest stopped before its end (its claim, no finished marker), else None."""
    marker = read_marker(dst, "dataset")
    if marker is None or marker.get("complete"):
        return None
    run = marker.get("run") if isinstance(marker.get("run"), dict) else {}
    theirs = run.get("source") if isinstance(run.get("source"), str) else None
    rerun = f"`{command} --overwrite`" if command else "the same ingest with `overwrite`"
    if theirs is not None and canonical(theirs) == canonical(src):
        what = f"an interrupted ingest of the same `source` {src}"
    else:
        what = f"an interrupted ingest of {'another source, ' + theirs if theirs else 'an unrecorded source'} (not `source` {src})"
    return IngestError(
        f"destination {dst} holds {what}: its claim {MARKER} is there but it never finished (no {DATASET_FILE}; it was killed, "
        f"or is still running: make sure no ingest writes there); nothing was written: to replace it, run {rerun}"
    )


def _prepare_dst(dst: str, src: str, overwrite: bool, run_id: str, command: str = "") -> None:
    """An empty destination, or one segray ingested before (with ``overwrite``): only its own files are deleted."""
    if storage.list_files(dst, limit=1):
        if not overwrite:
            unfinished = _unfinished(dst, src, command)
            if unfinished is not None:
                raise about("destination", unfinished)
            raise about("destination", IngestError(f"destination {dst} already holds files; set `overwrite` to replace it whole (nothing was written)"))
        clear_owned(dst, "dataset", "destination", required=(DATASET_FILE,))
    # What this run may leave even if it stops before it lists its files.
    patterns = [rf"(train|val)/part-\d+-{run_id}\.parquet", re.escape(ERRORS_FILE), re.escape(DATASET_FILE)]
    claim_folder(dst, "dataset", "destination", patterns, run={"source": canonical(src), "run_id": run_id})


def ingest(cfg: IngestConfig, command: str = "") -> IngestResult:
    """Checks every pair under ``cfg.source`` and writes the dataset to ``cfg.destination``.

    Args:
        cfg: what to ingest and how.
        command: the command line that asked for it, recorded in dataset.json.

    Raises:
        IngestError: no valid pair, or the destination holds files and ``overwrite`` is off.
        ConfigError: a layout, classes.json or folder that does not fit.
    """
    if cfg.instance_layout:
        raise ConfigError(f"layout {cfg.layout} (task instance) is ingested by segray.data.ingest_instances (segray.ingest picks it)", field="layout")
    src, dst, layout = cfg.source, cfg.destination, cfg.layout
    check_source(cfg)
    plan = list_pairs(src, layout, cfg.classes, cfg.num_classes, cfg.class_order, cfg.priority, cfg.images_dir)
    if not plan.pairs:
        raise IngestError(f"{src}: no image/mask pairs found ({len(plan.errors)} rejected inputs); expected the {layout} layout")
    total_pairs = len(plan.pairs)
    plan_errors, classes, priority, colors, without_mask = list(plan.errors), plan.classes, plan.priority, plan.colors, plan.images_without_mask
    ds, run = start_pipeline(cfg, plan, command, partial(_ChunkWriter, dst, layout, classes, max_pixels=cfg.max_pixels))
    del plan  # the listing is not needed while the pipeline runs
    stats = _Stats()
    found = []
    # Rows stream in: a chunk's statistics are added and dropped, so the
    # driver holds sums and the rejected files, never a row per image.
    for batch in ds.iter_batches(batch_size=256, batch_format="pyarrow"):
        for uri, reason, chunk_stats in zip(*(batch.column(c).to_pylist() for c in ("uri", "reason", "stats"))):
            if chunk_stats:
                stats.merge(chunk_stats)
            else:
                found.append((uri, reason))
    errors = plan_errors + sorted(found)
    write_errors(dst, errors)
    good = sum(stats.images.values())
    if not good:
        raise IngestError(f"{src}: no valid pair among {total_pairs} ({len(errors)} rejected; see {errors_uri(dst)})")

    # Classes come from every split, pixel statistics from the train split
    # (info_from_stats).
    if classes is None:
        # Over all splits: a class seen only in val must still be a class the model
        # predicts, or scoring it would fail after the first epoch.
        seen = sum(stats.class_pixels[s] for s in SPLITS)
        present = np.nonzero(seen[:IGNORE_INDEX])[0]
        top = int(present.max()) if present.size else 0
        classes = [ClassInfo(k, "background" if k == 0 else f"class_{k}", tuple(colors[k] if colors and k < len(colors) else default_color(k))) for k in range(top + 1)]
    info = info_from_stats(
        stats, classes, cfg, run, layout=layout, command=command, errors=len(errors),
        priority=priority,
        extra={
            "ignored_pixels": int(sum(stats.class_pixels[s][IGNORE_INDEX] for s in stats_splits(stats))),
            **({"layer_survival": layer_survival(stats, classes)} if layout == "per-class" else {}),
            **({"images_without_mask": without_mask} if without_mask else {}),
        },
    )
    for message in survival_warnings(info):
        warnings.warn(message, UserWarning, stacklevel=2)
    return finish_dataset(dst, run.run_id, info, errors)


def check_source(cfg: IngestConfig) -> None:
    """The source exists and does not overlap the destination.

    Raises:
        IngestError: the source does not exist or is empty.
        ValueError: source and destination overlap.
    """
    refuse_overlap(cfg.source, "source", cfg.destination, "destination")
    if not storage.is_dir(cfg.source):
        raise about("source", IngestError(f"source {cfg.source} does not exist or is empty"))


@dataclass(frozen=True)
class IngestRun:
    """One ingest run, started: its id, its chunks' count, how the split was made, when it started."""

    run_id: str
    shards: int
    split_record: dict[str, Any]
    start: float


def start_pipeline(cfg: IngestConfig, plan: Any, command: str, writer: Callable[[str], Any],
                   extra: Callable[[Any], list[Any]] | None = None) -> tuple[Any, IngestRun]:
    """Splits the listed pairs, claims the destination and starts the Ray Data pipeline that writes the chunks.

    Args:
        cfg: the ingest's config.
        plan: the listing (``layouts.Plan`` or ``instance_layouts.InstancePlan``): ``pairs``, ``image_id`` and sizes.
        command: the command line, recorded in the destination's claim.
        writer: makes the chunk writer (a ``flat_map`` callable class) for the run's id.
        extra: a pair's fields beyond the common ones (``chunk_items``).

    Returns:
        The pipeline's dataset (one row per rejected pair, one of statistics per chunk), and the run.
    """
    import ray

    val, split_record = split_plan(cfg, [p.image_id for p in plan.pairs])
    run_id = uuid.uuid4().hex[:8]
    _prepare_dst(cfg.destination, cfg.source, cfg.overwrite, run_id, command)
    start = time.time()
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 2
    bounds = plan_chunks(plan, cfg.shard_mb, min_chunks=2 * max(cpus, 1))
    items = chunk_items(plan, cfg.source, bounds, val, extra)
    # A bad file is an error row, never a task failure; what still fails a task
    # (a lost node, storage down) is retried a bounded number of times.
    with bounded_retries() as retries:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(writer(run_id), num_cpus=1, **retries)
    return ds, IngestRun(run_id, len(bounds), split_record, start)


def stats_splits(stats: _Stats) -> list[str]:
    """The splits pixel statistics come from: train, or every split when train is empty."""
    return ["train"] if stats.images["train"] else list(SPLITS)


def info_from_stats(
    stats: _Stats,
    classes: list[ClassInfo],
    cfg: IngestConfig,
    run: IngestRun,
    *,
    layout: str,
    command: str,
    errors: int,
    extra: dict[str, Any],
    **fields: Any,
) -> DatasetInfo:
    """The ``dataset.json`` of an ingest from its summed statistics (semantic and instance ingest).

    Args:
        stats: the sums of every good pair.
        classes: the dataset's classes (an ignore class with id 255 may be among them).
        cfg: the ingest's config (source, val fraction, recorded as ``config``).
        run: the ingest run (``start_pipeline``): its id, chunks, split, start time.
        layout: the layout's name as recorded.
        command: the command line that asked for the ingest.
        errors: how many inputs were rejected.
        extra: entries added to ``extra`` after the common ones.
        **fields: other ``DatasetInfo`` fields (``priority``, ``task``, ``objects``).
    """
    splits = stats_splits(stats)
    counts = sum(stats.class_pixels[s] for s in splits)
    real = [c for c in classes if c.id != IGNORE_INDEX]
    n_pix = float(sum(stats.pixels[s] for s in splits))
    mean = sum(stats.channel_sum[s] for s in splits) / n_pix
    std = np.sqrt(np.maximum(sum(stats.channel_sumsq[s] for s in splits) / n_pix - mean**2, 1e-12))
    labelled = counts[: len(real)].sum()
    return DatasetInfo(
        classes=classes,
        splits={s: int(stats.images[s]) for s in SPLITS},
        pixel_counts=[int(x) for x in counts[: len(real)]],
        pixel_frequency={c.name: float(counts[c.id] / labelled) if labelled else 0.0 for c in real},
        mean=[float(x) for x in mean],
        std=[float(x) for x in std],
        layout=layout,
        source=cfg.source,
        command=command,
        size=[int(x) for x in next(iter(stats.sizes))] if len(stats.sizes) == 1 else None,
        errors=errors,
        val_fraction=cfg.val_fraction,
        val_ids=sorted(stats.val_ids),
        extra={
            # How the split was made; ``val_ids`` above is what it gave.
            "split": {**run.split_record, "val": int(stats.images["val"]), "train": int(stats.images["train"])},
            "seconds": round(time.time() - run.start, 2),
            "shards": run.shards,
            "run_id": run.run_id,
            # Files of every dtype are put on one scale before the statistics
            # and the model; the dtypes seen and the rule are recorded.
            "value_range": VALUE_RANGE,
            "value_rule": VALUE_RULE,
            "dtypes": dict(sorted(stats.dtypes.items())),
            **extra,
        },
        config=cfg.to_dict(),
        **fields,
    )


def finish_dataset(dst: str, run_id: str, info: DatasetInfo, errors: list[tuple[str, str]]) -> IngestResult:
    """Removes other runs' shards, then writes ``dataset.json`` and the marker: DST is a dataset from here on."""
    _sweep_other_runs(dst, run_id)
    storage.write_text(storage.join(dst, DATASET_FILE), info.to_json())
    write_marker(dst, "dataset")
    return IngestResult(dst, info, errors)


# Shared with instance ingest (segray.data.instance_ingest), which writes the
# same destination, claim and statistics in its own shard schema.
PixelStats = _Stats
prepare_destination = _prepare_dst
