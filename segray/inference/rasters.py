"""``segray predict`` on rasters larger than memory: one Ray Data row per output chunk.

An ``--input`` that is a TIFF / OME-TIFF or Zarr raster, or a folder whose top
level holds such rasters (and no ``images/`` folder or ingested dataset), is
streamed: each raster is cut into ``chunk`` x ``chunk`` output chunks, and
the driver plans them from the rasters' shapes alone (a row is a number; the
task finds its raster and chunk from it). A chunk's task reads the chunk plus
the halo its windows need, runs every window of the raster's *global* window
grid (``geometry.window_starts``, the same grid, weights and blending as the
in-memory sliding window) that overlaps the chunk, blends them in the same
order, and writes only its own chunk. So the masks equal the in-memory
prediction's; windows that straddle a chunk border are computed by both
chunks (``border_overhead``).

Outputs, under OUT:

    OUT/masks/<id>.ome.zarr        NGFF 0.4 label image, a nearest-neighbour pyramid
                                   whose zarr chunks are the output chunks (no two tasks
                                   write one zarr chunk)
    OUT/masks/<id>.ome.tif         with ``mask_format`` tiff: a tiled pyramidal BigTIFF
                                   made from the zarr (kept in OUT/_zarr) once every chunk is done
    OUT/_chunks/<id>/<r>_<c>.parquet  a chunk's record, written last and atomically:
                                   a chunk is done when its record is there
    OUT/raster_chunks.parquet      per chunk and class: predicted pixels, and tp/fp/fn/iou/dice with truth
    OUT/per_image.parquet, per_class.parquet, confusion.parquet, summary.json  as predict's
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from segray import storage
from segray.config import about
from segray.data import ZARR_SUFFIXES, is_raster_name, open_raster, raster_id, zarr_store
from segray.inference.geometry import Geometry, pad_to, window_starts, window_weights

CHUNKS, ZARRS = "_chunks", "_zarr"
# The coarsest pyramid level keeps zarr chunks at least this many pixels on a side.
MIN_LEVEL_CHUNK = 64

CHUNK_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("chunk_row", pa.int32()),
        ("chunk_col", pa.int32()),
        ("y", pa.int64()),
        ("x", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("pixels", pa.list_(pa.int64())),
        ("has_truth", pa.bool_()),
        ("cm_cells", pa.list_(pa.int32())),
        ("cm_counts", pa.list_(pa.int64())),
        ("run", pa.int64()),
        ("worker_peak_rss", pa.int64()),
        # Which worker wrote the chunk (lineage: on a cluster, which node did the work).
        ("node_id", pa.string()),
        ("pid", pa.int64()),
    ]
)


# --- which inputs are rasters ----------------------------------------------------------


def raster_inputs(uri: str) -> list[str] | None:
    """The rasters ``--input`` names, or None when it is one of today's inputs (a layout, an ingested dataset).

    The rule: a TIFF or Zarr named directly, or a folder whose top level holds
    TIFF / Zarr rasters and neither an ``images/`` folder nor Parquet shards,
    or a comma-separated list of rasters.
    """
    if "," in uri:
        # Each made absolute, as config does for one path: Ray workers run in other folders.
        listed = [storage.absolute(u.strip()) for u in uri.split(",") if u.strip()]
        if listed and all(is_raster_name(u) for u in listed):
            return listed
        return None
    if is_raster_name(uri):
        return [uri]
    if not storage.is_dir(uri) or storage.exists(storage.join(uri, "images")):
        return None
    files = [f.uri for f in storage.list_files(uri, recursive=False)]
    if any(f.endswith(".parquet") for f in files):
        return None
    found = [f for f in files if is_raster_name(f)]
    found += [d for d in storage.list_dirs(uri) if storage.basename(d).lower().endswith(ZARR_SUFFIXES)]
    return sorted(found) or None


def truth_for(truth: str | None, image_uri: str) -> str | None:
    """The truth raster of ``image_uri``: ``truth`` itself when it is a raster, else the one with its id in the folder ``truth``.

    Raises:
        FileNotFoundError: a truth folder without this raster's id.
    """
    if truth is None:
        return None
    if is_raster_name(truth):
        return truth
    wanted = raster_id(image_uri)
    candidates = [f.uri for f in storage.list_files(truth, recursive=False) if is_raster_name(f.uri)]
    candidates += [d for d in storage.list_dirs(truth) if storage.basename(d).lower().endswith(ZARR_SUFFIXES)]
    for c in candidates:
        if raster_id(c) == wanted:
            return c
    raise FileNotFoundError(f"truth {truth}: no raster named {wanted} (with a .tif, .ome.tif or .zarr suffix) for the input {image_uri}")


# --- planning ------------------------------------------------------------------------


@dataclass(frozen=True)
class RasterEntry:
    """One raster of the run: where it is, its size, its truth."""

    image_id: str
    uri: str
    height: int
    width: int
    truth_uri: str | None = None


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks of every raster, numbered 0..total-1 raster by raster, row by row.

    Only the rasters' shapes are kept: a chunk is found from its number.
    """

    rasters: tuple[RasterEntry, ...]
    chunk: int
    offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        counts = [self.grid(r)[0] * self.grid(r)[1] for r in self.rasters]
        object.__setattr__(self, "offsets", tuple(np.cumsum([0] + counts).tolist()))

    def grid(self, raster: RasterEntry) -> tuple[int, int]:
        return -(-raster.height // self.chunk), -(-raster.width // self.chunk)

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[RasterEntry, int, int]:
        """(raster, chunk row, chunk column) of chunk ``index``."""
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        raster = self.rasters[k]
        rows, cols = divmod(index - self.offsets[k], self.grid(raster)[1])
        return raster, rows, cols

    def box(self, raster: RasterEntry, row: int, col: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of a chunk, clipped to the raster."""
        y0, x0 = row * self.chunk, col * self.chunk
        return y0, min(y0 + self.chunk, raster.height), x0, min(x0 + self.chunk, raster.width)


def pyramid_levels(height: int, width: int, chunk: int) -> int:
    """How many levels the mask pyramid has: halving while the level is over one chunk and its zarr chunks keep ``MIN_LEVEL_CHUNK``."""
    levels = 1
    while max(height, width) >> levels >= MIN_LEVEL_CHUNK and (chunk >> levels) >= MIN_LEVEL_CHUNK and chunk % (1 << levels) == 0 \
            and max(-(-height // (1 << (levels - 1))), -(-width // (1 << (levels - 1)))) > chunk >> (levels - 1):
        levels += 1
    return levels


def border_overhead(chunk: int, tile: tuple[int, int], overlap: tuple[int, int], height: int, width: int) -> float:
    """Window evaluations of the chunked run over those of one in-memory pass, minus 1 (0.25: 25% more).

    A window is evaluated once by every chunk it overlaps.
    """
    def axis(length: int, t: int, o: int) -> tuple[int, int]:
        starts = window_starts(max(length, t), t, o)
        per_chunk = 0
        for c0 in range(0, length, chunk):
            c1 = min(c0 + chunk, length)
            per_chunk += sum(1 for s in starts if s < c1 and s + t > c0)
        return per_chunk, len(starts)

    ry, ny = axis(height, tile[0], overlap[0])
    rx, nx = axis(width, tile[1], overlap[1])
    return ry * rx / (ny * nx) - 1.0


# --- one chunk -------------------------------------------------------------------------


def chunk_logits(
    predict, read, height: int, width: int, box: tuple[int, int, int, int], geometry: Geometry, batch_size: int, fill=None,
) -> np.ndarray:
    """Blended logits ``(y1 - y0, x1 - x0, C)`` of one chunk, equal to the whole raster's sliding window there.

    Args:
        predict: ``(N, th, tw, 3) -> (N, th, tw, C)`` logits.
        read: ``(y0, y1, x0, x1) -> (h, w, 3)`` a window of the raster.
        box: ``(y0, y1, x0, x1)`` of the chunk.
        fill: padding of a raster smaller than a window (as ``tiled_logits``).
    """
    th, tw = geometry.tile
    oh, ow = geometry.overlap
    ys_all = window_starts(max(height, th), th, oh)
    xs_all = window_starts(max(width, tw), tw, ow)
    wy_all, wx_all = window_weights(ys_all, th, geometry.weighting), window_weights(xs_all, tw, geometry.weighting)
    y0, y1, x0, x1 = box
    rows = [i for i, s in enumerate(ys_all) if s < y1 and s + th > y0]
    cols = [j for j, s in enumerate(xs_all) if s < x1 and s + tw > x0]
    top, left = ys_all[rows[0]], xs_all[cols[0]]
    bottom, right = ys_all[rows[-1]] + th, xs_all[cols[-1]] + tw
    region = read(top, min(bottom, height), left, min(right, width))
    region = pad_to(region, bottom - top, right - left, fill)
    acc: np.ndarray | None = None
    wsum = np.zeros((bottom - top, right - left), np.float32)
    # Raster order, as tiled_logits adds them: each pixel sums its windows in the same order, so in the same float32 rounding.
    windows = [(i, j) for i in rows for j in cols]
    for first in range(0, len(windows), batch_size):
        group = windows[first : first + batch_size]
        batch = np.stack([region[ys_all[i] - top : ys_all[i] - top + th, xs_all[j] - left : xs_all[j] - left + tw] for i, j in group])
        logits = np.asarray(predict(batch), np.float32)
        if acc is None:
            acc = np.zeros((bottom - top, right - left, logits.shape[-1]), np.float32)
        for (i, j), out in zip(group, logits):
            weight = wy_all[i][:, None] * wx_all[j][None, :]
            r, c = slice(ys_all[i] - top, ys_all[i] - top + th), slice(xs_all[j] - left, xs_all[j] - left + tw)
            acc[r, c] += out * weight[..., None]
            wsum[r, c] += weight
    r, c = slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)
    return acc[r, c] / np.maximum(wsum[r, c], 1e-12)[..., None]


def model_input(window: np.ndarray) -> np.ndarray:
    """A raster window ``(h, w, C)`` as the model takes it: 3 channels, uint8 or float32 on the 0..255 scale."""
    if window.shape[-1] == 1:
        window = np.repeat(window, 3, axis=-1)
    elif window.shape[-1] == 4:
        window = window[..., :3]
    if window.dtype == np.uint8:
        return window
    if np.issubdtype(window.dtype, np.integer):
        return window.astype(np.float32) * (255.0 / np.iinfo(window.dtype).max)
    return window.astype(np.float32)


# --- outputs ---------------------------------------------------------------------------


def mask_uri(out_root: str, image_id: str, mask_format: str) -> str:
    """Where the mask of a raster goes: ``masks/<id>.ome.zarr``, or ``masks/<id>.ome.tif`` (its zarr in ``_zarr``)."""
    from segray.inference.output import Output

    out = Output(out_root)
    if mask_format == "tiff":
        return out.inside(ZARRS, f"{image_id}.ome.zarr")
    return out.inside("masks", f"{image_id}.ome.zarr")


def chunk_part(out_root: str, image_id: str, row: int, col: int) -> str:
    from segray.inference.output import Output

    return Output(out_root).inside(CHUNKS, image_id, f"{row:05d}_{col:05d}.parquet")


def create_label_image(uri: str, height: int, width: int, chunk: int, colors: list[tuple[int, int, int]], name: str) -> int:
    """Creates the empty NGFF 0.4 label image (zarr v2) with its pyramid; keeps one already there. Returns its levels."""
    import zarr

    levels = pyramid_levels(height, width, chunk)
    store = zarr_store(uri, read_only=False)
    attrs = storage.join(uri, ".zattrs")
    if storage.exists(attrs):
        # A resumed run: the done chunks are in it (never re-created, which would empty them).
        multiscales = json.loads(storage.read_text(attrs)).get("multiscales")
        if not multiscales:
            raise ValueError(f"{uri} exists and is not a label image segray wrote (no multiscales in {attrs}); remove it or use another output")
        return len(multiscales[0]["datasets"])
    group = zarr.open_group(store, mode="w", zarr_format=2)
    for k in range(levels):
        s = 1 << k
        group.create_array(
            str(k), shape=(-(-height // s), -(-width // s)), chunks=(chunk >> k, chunk >> k), dtype="uint8", fill_value=0,
        )
    group.attrs.update(
        {
            "multiscales": [
                {
                    "version": "0.4",
                    "name": name,
                    "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                    "datasets": [
                        {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [float(1 << k), float(1 << k)]}]}
                        for k in range(levels)
                    ],
                    "type": "nearest",
                    "metadata": {"method": "numpy stride (nearest neighbour: class ids are never averaged)"},
                }
            ],
            "image-label": {
                "version": "0.4",
                "colors": [{"label-value": k, "rgba": [int(c) for c in color] + [255]} for k, color in enumerate(colors)],
            },
        }
    )
    return levels


def write_chunk_levels(uri: str, levels: int, y0: int, x0: int, pred: np.ndarray) -> None:
    """Writes a chunk's class ids into every pyramid level (level k: every 2**k-th pixel, which aligns as chunks are multiples of 2**k)."""
    import zarr

    store = zarr_store(uri, read_only=False)
    for k in range(levels):
        s = 1 << k
        level = pred[::s, ::s]
        array = zarr.open_array(store, path=str(k), mode="r+", zarr_format=2)
        array[y0 // s : y0 // s + level.shape[0], x0 // s : x0 // s + level.shape[1]] = level


def write_tiff_mask(zarr_uri: str, tiff_uri: str, tile: int = 512) -> None:
    """The zarr pyramid as a tiled pyramidal BigTIFF (SubIFDs), tile by tile; uploaded when ``tiff_uri`` is a bucket's."""
    import tempfile

    import tifffile
    import zarr

    group = zarr.open_group(zarr_store(zarr_uri), mode="r")
    paths = [d["path"] for d in group.attrs["multiscales"][0]["datasets"]]

    def tiles(array):
        h, w = array.shape
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                t = np.zeros((tile, tile), np.uint8)
                part = np.asarray(array[y : y + tile, x : x + tile])
                t[: part.shape[0], : part.shape[1]] = part
                yield t

    with tempfile.TemporaryDirectory() as tmp:
        local = storage.filesystem(tiff_uri)[1] if storage.is_local(tiff_uri) else os.path.join(tmp, "mask.ome.tif")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        part = local + ".partial"
        with tifffile.TiffWriter(part, bigtiff=True, ome=True) as tif:
            base = group[paths[0]]
            options = {"tile": (tile, tile), "dtype": np.uint8, "compression": "zlib", "photometric": "minisblack"}
            tif.write(tiles(base), shape=base.shape, subifds=len(paths) - 1, metadata={"axes": "YX"}, **options)
            for p in paths[1:]:
                level = group[p]
                tif.write(tiles(level), shape=level.shape, subfiletype=1, **options)
        os.replace(part, local)
        if not storage.is_local(tiff_uri):
            storage.upload_file(local, tiff_uri)


# --- the actor -------------------------------------------------------------------------


class PredictChunks:
    """``map_batches`` callable class of the actor pool: chunk numbers in, done chunks written.

    Loads the model once per actor (``Predictor``, TensorFlow or ONNX Runtime)
    and keeps the rasters it has opened.
    """

    def __init__(self, plan: ChunkPlan, predictor_kwargs: dict[str, Any], out_root: str, mask_format: str,
                 levels: dict[str, int], num_classes: int, ignore_index: int | None, run: int):
        from segray.inference.predictor import Predictor

        self.predictor = Predictor(**predictor_kwargs)
        self.plan, self.out_root, self.mask_format = plan, out_root, mask_format
        self.levels, self.num_classes, self.ignore_index, self.run = levels, num_classes, ignore_index, run
        self.open: dict[str, Any] = {}
        import ray

        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def _raster(self, uri: str):
        if uri not in self.open:
            self.open[uri] = open_raster(uri)
        return self.open[uri]

    def chunk(self, index: int) -> str:
        """Predicts and writes chunk ``index``; returns its part's URI (nothing is done when the part exists).

        Raises:
            RuntimeError: naming the raster and the chunk, when reading, predicting or writing fails.
        """
        raster, row, col = self.plan.locate(index)
        part = chunk_part(self.out_root, raster.image_id, row, col)
        if storage.exists(part):
            return ""
        y0, y1, x0, x1 = self.plan.box(raster, row, col)
        try:
            self._predict_chunk(raster, row, col, (y0, y1, x0, x1), part)
        except Exception as e:
            raise RuntimeError(f"{raster.uri}: chunk ({row}, {col}) at y {y0}, x {x0} ({y1 - y0}x{x1 - x0}) failed: {type(e).__name__}: {e}") from e
        return part

    def _predict_chunk(self, raster: RasterEntry, row: int, col: int, box: tuple[int, int, int, int], part: str) -> None:
        from segray.metrics import sparse_confusion

        y0, y1, x0, x1 = box
        source = self._raster(raster.uri)
        g = self.predictor.geometry
        read = lambda a, b, c, d: model_input(source.read(a, b, c, d))  # noqa: E731
        logits = chunk_logits(self.predictor.logits, read, raster.height, raster.width, (y0, y1, x0, x1), g,
                              self.predictor.batch_size, self.predictor.mean)
        pred = logits.argmax(axis=-1).astype(np.uint8)
        del logits
        write_chunk_levels(mask_uri(self.out_root, raster.image_id, self.mask_format), self.levels[raster.image_id], y0, x0, pred)
        cells, counts = np.zeros(0, np.int32), np.zeros(0, np.int64)
        if raster.truth_uri is not None:
            truth = self._raster(raster.truth_uri).read(y0, y1, x0, x1)[..., 0].astype(np.uint8)
            cells, counts = sparse_confusion(truth, pred, self.ignore_index)
        record = {
            "image_id": raster.image_id, "chunk_row": row, "chunk_col": col, "y": y0, "x": x0, "height": y1 - y0, "width": x1 - x0,
            "pixels": np.bincount(pred.ravel(), minlength=self.num_classes).tolist(), "has_truth": raster.truth_uri is not None,
            "cm_cells": cells.tolist(), "cm_counts": counts.tolist(), "run": self.run,
            # The actor's peak so far: memory per worker should depend on the chunk and window, not the raster.
            "worker_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "node_id": self.node_id, "pid": os.getpid(),
        }
        # Last, and atomic: the part is what says the chunk is done.
        storage.write_parquet(pa.Table.from_pylist([record], schema=CHUNK_SCHEMA), part)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written = [self.chunk(int(i)) for i in batch["id"]]
        return {"id": np.asarray(batch["id"]), "written": np.asarray([bool(w) for w in written])}


# --- the driver ------------------------------------------------------------------------


def _entries(uris: list[str], truth: str | None) -> list[RasterEntry]:
    entries = []
    seen: dict[str, str] = {}
    for uri in uris:
        raster = open_raster(uri)
        try:
            height, width = raster.shape
        finally:
            raster.close()
        image_id = raster_id(uri)
        if image_id in seen:
            raise about("input", ValueError(f"input: {seen[image_id]} and {uri} have one id {image_id}; rename one"))
        seen[image_id] = uri
        truth_uri = truth_for(truth, uri)
        if truth_uri is not None:
            t = open_raster(truth_uri)
            try:
                if t.shape != (height, width):
                    raise about("truth", ValueError(f"truth {truth_uri} is {t.shape[1]}x{t.shape[0]}, the raster {uri} is {width}x{height}"))
            finally:
                t.close()
        entries.append(RasterEntry(image_id, uri, height, width, truth_uri))
    return entries


def read_chunk_records(out_root: str) -> pa.Table:
    """Every chunk record under ``OUT/_chunks`` (empty when none)."""
    import pyarrow.parquet as pq

    from segray.inference.output import Output

    root = Output(out_root).inside(CHUNKS)
    files = [f.uri for f in storage.list_files(root) if f.uri.endswith(".parquet")] if storage.exists(root) else []
    if not files:
        return CHUNK_SCHEMA.empty_table()
    fs, _ = storage.filesystem(out_root)
    return pq.read_table([storage.filesystem(f)[1] for f in files], filesystem=fs, schema=CHUNK_SCHEMA)


def _dense(chunks: pa.Table, num_classes: int) -> np.ndarray:
    """(N, C, C) int64 confusion of each chunk record."""
    from segray.metrics import decode_cells

    out = np.zeros((chunks.num_rows, num_classes, num_classes), np.int64)
    for n, (cells, counts) in enumerate(zip(chunks["cm_cells"].to_pylist(), chunks["cm_counts"].to_pylist())):
        if cells:
            t, p = decode_cells(np.asarray(cells, np.int32))
            np.add.at(out[n], (t, p), np.asarray(counts, np.int64))
    return out


def raster_tables(chunks: pa.Table, entries: list[RasterEntry], class_names: list[str], model_id: str):
    """(per-chunk DataFrame, per-image records (RECORD_SCHEMA), predicted pixels per raster and class).

    Per-image confusion matrices are sums of the chunks' (never means of their scores).
    """
    import pandas as pd

    from segray.metrics import dice_from_counts, iou_from_counts

    c = len(class_names)
    chunks = chunks.sort_by([("image_id", "ascending"), ("chunk_row", "ascending"), ("chunk_col", "ascending")])
    cms = _dense(chunks, c)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    fp, fn = cms.sum(axis=1) - tp, cms.sum(axis=2) - tp
    pixels = np.asarray(chunks["pixels"].to_pylist(), np.int64).reshape(-1, c)
    n = chunks.num_rows
    rep = lambda name: np.repeat(chunks[name].to_numpy(zero_copy_only=False), c)  # noqa: E731
    per_chunk = pd.DataFrame({
        "image_id": rep("image_id"), "chunk_row": rep("chunk_row"), "chunk_col": rep("chunk_col"), "y": rep("y"), "x": rep("x"),
        "class_id": np.tile(np.arange(c, dtype=np.int32), n), "class_name": np.tile(np.asarray(class_names, object), n),
        "pixels": pixels.reshape(-1), "has_truth": rep("has_truth"), "tp": tp.reshape(-1), "fp": fp.reshape(-1), "fn": fn.reshape(-1),
        "iou": iou_from_counts(tp, fp, fn).reshape(-1), "dice": dice_from_counts(tp, fp, fn).reshape(-1), "model_id": model_id,
        # Lineage: the Ray node and process that predicted the chunk.
        "node_id": rep("node_id"), "pid": rep("pid"),
    })
    ids = chunks["image_id"].to_numpy(zero_copy_only=False)
    has_truth = chunks["has_truth"].to_numpy(zero_copy_only=False)
    records, counts = [], {}
    for e in entries:
        mine = ids == e.image_id
        counts[e.image_id] = pixels[mine].sum(axis=0).tolist() if mine.any() else [0] * c
        cm = cms[mine].sum(axis=0)
        t, p = np.nonzero(cm)
        scored = bool(e.truth_uri is not None and mine.any() and has_truth[mine].all())
        records.append({
            "image_id": e.image_id, "uri": e.uri, "status": "ok", "reason": "", "height": e.height, "width": e.width,
            "has_truth": scored, "cm_cells": (t * 256 + p).astype(np.int32).tolist() if scored else [],
            "cm_counts": cm[t, p].astype(np.int64).tolist() if scored else [], "run": int(chunks["run"][0].as_py()) if n else 0,
        })
    return per_chunk, records, counts


def predict_rasters(cfg, uris: list[str], spec, geometry: Geometry, run_format: str, settings: dict[str, Any], convert) -> Any:
    """Predicts each raster chunk by chunk on Ray Data (see the module docstring) and writes the tables.

    Args:
        run_format: ``_run.json``'s format (predict's).
        settings: summary.json's ``inference`` (``pipeline.inference_settings``).
        convert: ``() -> ConvertedModel``, the ONNX conversion (``pipeline.converted``) for ``onnxruntime``.

    Raises:
        ValueError: settings that cannot be chunked (no window, component removal), a bad chunk size.
    """
    import datetime

    import ray

    from segray.inference.output import Output, claim, write_results
    from segray.inference.tables import records_table, score_tables, write_frame
    from segray.runs import class_list
    from segray.ownership import canonical

    started, run = time.time(), time.time_ns()
    if geometry.tile is None or geometry.mode != "tile":
        raise about("tile", ValueError(
            f"input {cfg.input} is streamed as a raster, which needs a sliding window at the raster's resolution; "
            f"the model {spec.uri} {'fits images to ' + 'x'.join(map(str, geometry.size)) if geometry.mode == 'fit' else 'has no window'}: give `tile` (e.g. --tile 256)"))
    if geometry.min_component:
        raise about("min_component", ValueError("min_component: removing small components needs whole components; a raster is streamed in chunks: leave it at 0"))
    chunk = cfg.chunk
    if chunk < 64 or chunk % 16:
        raise about("chunk", ValueError(f"chunk {chunk}: expected a multiple of 16, at least 64"))
    entries = _entries(uris, cfg.truth)
    plan = ChunkPlan(tuple(entries), chunk)
    out = Output(cfg.output)
    names = [c.name for c in spec.classes]
    identity = {
        "format": run_format, "model_id": spec.model_id, "source": [canonical(u) for u in uris],
        "truth": [canonical(e.truth_uri) if e.truth_uri else None for e in entries], "geometry": geometry.lineage(),
        "classes": names, "mean": list(spec.mean), "std": list(spec.std), "ignore_index": spec.ignore_index,
        "chunk": chunk, "mask_format": cfg.mask_format, "raster_shapes": [[e.height, e.width] for e in entries],
        **({"backend": cfg.backend} if cfg.backend != "tensorflow" else {}),
    }
    claim(out, identity)
    storage.write_text(out.classes, json.dumps(class_list(spec.classes), indent=2))
    colors = [tuple(c.color) for c in spec.classes]
    levels = {e.image_id: create_label_image(mask_uri(out.root, e.image_id, cfg.mask_format), e.height, e.width, chunk, colors, e.image_id)
              for e in entries}
    done_before = read_chunk_records(out.root).num_rows
    predictor_kwargs: dict[str, Any] = {
        "model_uri": spec.uri, "geometry": geometry, "batch_size": cfg.batch_size, "model_id": spec.model_id,
        "mean": tuple(spec.mean), "std": tuple(spec.std),
    }
    if cfg.backend == "onnxruntime":
        onnx = convert()
        predictor_kwargs.update(onnx_model=ray.put(onnx.data), onnx_id=onnx.onnx_id)
    written = 0
    if done_before < plan.total:
        options: dict[str, Any] = {"num_cpus": 1}
        if cfg.gpus_per_worker > 0:
            options["num_gpus"] = cfg.gpus_per_worker
        ds = ray.data.range(plan.total, override_num_blocks=min(plan.total, max(1, cfg.workers * 4)))
        ds = ds.map_batches(
            PredictChunks, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.workers),
            fn_constructor_kwargs={"plan": plan, "predictor_kwargs": predictor_kwargs, "out_root": out.root, "mask_format": cfg.mask_format,
                                   "levels": levels, "num_classes": len(names), "ignore_index": spec.ignore_index, "run": run},
            **options,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            written += int(np.sum(batch["written"]))
    chunks = read_chunk_records(out.root)
    errors: list[tuple[str, str]] = []
    done = {(r["image_id"], r["chunk_row"], r["chunk_col"]) for r in chunks.select(["image_id", "chunk_row", "chunk_col"]).to_pylist()}
    for e in entries:
        rows, cols = plan.grid(e)
        missing = rows * cols - sum(1 for i, _, _ in done if i == e.image_id)
        if missing:
            errors.append((e.uri, f"{e.uri}: {missing} of {rows * cols} chunks have no result (re-run to finish them)"))
        elif cfg.mask_format == "tiff":
            write_tiff_mask(mask_uri(out.root, e.image_id, "tiff"), out.inside("masks", f"{e.image_id}.ome.tif"))
    per_chunk, records, pixels = raster_tables(chunks, entries, names, spec.model_id)
    write_frame(per_chunk, pa.Schema.from_pandas(per_chunk, preserve_index=False), out.inside("raster_chunks.parquet"))
    table = records_table(records)
    has_truth = any(r["has_truth"] for r in records)
    scores, frames = score_tables(table, names, spec.model_id) if has_truth else ({}, None)
    wall = time.time() - started
    megapixels = sum(e.height * e.width for e in entries) / 1e6
    th, tw = geometry.tile
    summary = {
        "images": len(entries), **scores, "errors": len(errors), "model_id": spec.model_id, "model": spec.uri, "source": cfg.input,
        "source_kind": "rasters", "has_truth": has_truth,
        "config": {**cfg.to_dict(), "resolved": {"geometry": geometry.lineage(), "model": spec.describe()}},
        "inference": settings,
        "rasters": [
            {"image_id": e.image_id, "uri": e.uri, "height": e.height, "width": e.width, "chunks": plan.grid(e)[0] * plan.grid(e)[1],
             "pyramid_levels": levels[e.image_id], "mask": mask_uri(out.root, e.image_id, cfg.mask_format) if cfg.mask_format != "tiff"
             else out.inside("masks", f"{e.image_id}.ome.tif"), "pixels_per_class": dict(zip(names, pixels[e.image_id])),
             "border_overhead": round(border_overhead(chunk, (th, tw), geometry.overlap, e.height, e.width), 4)}
            for e in entries
        ],
        "chunk": chunk, "chunks": plan.total, "chunks_this_run": written,
        "wall_time_s": round(wall, 3), "megapixels_per_s": round(megapixels / wall, 3) if written else None,
        "backend": cfg.backend,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return write_results(out, frames, len(names), summary, errors)


__all__ = ["ChunkPlan", "PredictChunks", "border_overhead", "chunk_logits", "predict_rasters", "raster_inputs", "read_chunk_records"]
