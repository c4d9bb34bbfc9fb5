"""Rasters larger than memory: windows read from BigTIFF / OME-TIFF and Zarr, synthetic ones written tile by tile.

A raster is one image of any size in a chunked format: a (Big)TIFF or
OME-TIFF, tiled or striped, pyramidal or not (read through tifffile's Zarr
store, so a window decodes only the tiles or strips it touches), or a Zarr /
OME-Zarr array. ``open_raster`` gives a ``Raster`` whose ``read`` returns one
window as ``(h, w, C)``; nothing else is decoded.

``write_synthetic_raster`` writes a tiled OME-TIFF and its truth of any size
from a generator of tiles: shapes of each class lie inside the cells of a
fixed grid, on a smooth texture with noise, so a window's content depends only
on its position and a tiny model can learn the classes by colour.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from segray import storage

TIFF_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff")
ZARR_SUFFIXES = (".ome.zarr", ".zarr")
# Always streamed whatever their size: the formats made for rasters.
STREAMED_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.zarr", ".zarr")
# The grid the synthetic shapes live in: a shape never leaves its cell.
CELL = 128


def raster_id(uri: str) -> str:
    """The name of a raster less its suffix (``scan.ome.tif`` -> ``scan``)."""
    name = storage.basename(uri)
    for suffix in sorted(TIFF_SUFFIXES + ZARR_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_raster_name(uri: str) -> bool:
    """A name whose suffix is a raster format's (TIFF or Zarr)."""
    return storage.basename(uri).lower().endswith(TIFF_SUFFIXES + ZARR_SUFFIXES)


@dataclass
class Raster:
    """One raster opened for window reads.

    Attributes:
        uri: where it is.
        levels: per pyramid level, a zarr array and the axes of its dimensions
            (``Y``, ``X``, ``C`` for channels/samples, ``1`` for a singleton axis).
    """

    uri: str
    levels: list[tuple[Any, str]]
    handle: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.level_shape(0)

    def level_shape(self, level: int) -> tuple[int, int]:
        array, axes = self.levels[level]
        return int(array.shape[axes.index("Y")]), int(array.shape[axes.index("X")])

    @property
    def channels(self) -> int:
        array, axes = self.levels[0]
        return int(array.shape[axes.index("C")]) if "C" in axes else 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.levels[0][0].dtype)

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """The window ``[y0:y1, x0:x1]`` as ``(h, w, C)`` (C = 1 for a single-channel raster)."""
        array, axes = self.levels[level]
        index = []
        for axis, n in zip(axes, array.shape):
            index.append(slice(y0, y1) if axis == "Y" else slice(x0, x1) if axis == "X" else slice(None) if axis == "C" else 0)
        window = np.asarray(array[tuple(index)])
        kept = [a for a in axes if a in "YXC"]
        if "C" not in kept:
            return window[..., None]
        return np.moveaxis(window, kept.index("C"), -1) if kept.index("C") != 2 else window

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _axes_of(shape: tuple[int, ...], names: str | None) -> str:
    """Our axes (``Y``, ``X``, ``C``, ``1``) for an array's dimensions, from its named axes if any.

    Raises:
        ValueError: no two spatial axes can be told.
    """
    if names:
        out = ""
        for name, n in zip(names.upper(), shape):
            out += name if name in "YX" else "C" if name in "CS" and "C" not in out else "1"
        if out.count("Y") == 1 and out.count("X") == 1 and all(n == 1 for a, n in zip(out, shape) if a == "1"):
            return out
    dims = [n for n in shape]
    lead = ""
    while len(dims) > 3 and dims[0] == 1:
        dims.pop(0)
        lead += "1"
    if len(dims) == 2:
        return lead + "YX"
    if len(dims) == 3 and dims[-1] <= 4:
        return lead + "YXC"
    if len(dims) == 3 and dims[0] <= 4:
        return lead + "CYX"
    raise ValueError(f"shape {tuple(shape)} with axes {names or 'unnamed'}: expected (Y, X), (Y, X, C) or (C, Y, X) with C <= 4")


def zarr_store(uri: str, read_only: bool = True):
    """A zarr store for a folder ``uri``: a local folder, or a prefix in an object store."""
    import zarr

    if storage.is_local(uri):
        return zarr.storage.LocalStore(storage.filesystem(uri)[1], read_only=read_only)
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    fs, path = storage.fsspec_filesystem(uri)
    if not fs.async_impl:
        fs = AsyncFileSystemWrapper(fs)
    return zarr.storage.FsspecStore(fs, path=path, read_only=read_only)


def _zarr_levels(uri: str) -> list[tuple[Any, str]]:
    import zarr

    node = zarr.open(zarr_store(uri), mode="r")
    if isinstance(node, zarr.Array):
        return [(node, _axes_of(node.shape, None))]
    multiscales = node.attrs.get("multiscales") or node.attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        arrays = sorted(node.array_keys())
        if not arrays:
            raise ValueError(f"raster {uri}: a Zarr group without arrays or multiscales metadata")
        return [(node[arrays[0]], _axes_of(node[arrays[0]].shape, None))]
    ms = multiscales[0]
    names = "".join(a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])) or None
    if names and len(names) != len(ms["axes"]):
        names = None
    levels = []
    for dataset in ms["datasets"]:
        array = node[dataset["path"]]
        levels.append((array, _axes_of(array.shape, names)))
    return levels


def _tiff_levels(uri: str, handle) -> list[tuple[Any, str]]:
    import tifffile
    import zarr

    with tifffile.TiffFile(handle, name=storage.basename(uri)) as tif:
        series = tif.series[0]
        names = series.axes
        count = len(series.levels)
    levels = []
    for level in range(count):
        handle.seek(0)
        store = tifffile.imread(handle, aszarr=True, series=0, level=level)
        array = zarr.open_array(store, mode="r") if isinstance(zarr.open(store, mode="r"), zarr.Array) else None
        if array is None:
            raise ValueError(f"raster {uri}: level {level} is not one array")
        levels.append((array, _axes_of(array.shape, names)))
    return levels


def open_raster(uri: str) -> Raster:
    """Opens a TIFF or Zarr raster for window reads (local or in object storage); decodes nothing yet.

    Raises:
        FileNotFoundError: nothing at ``uri``.
        ValueError: not a raster we can read, naming ``uri`` and why.
    """
    if not storage.exists(uri):
        raise FileNotFoundError(f"raster {uri}: not found")
    name = storage.basename(uri).lower()
    try:
        if name.endswith(ZARR_SUFFIXES):
            return Raster(uri, _zarr_levels(uri))
        fs, path = storage.filesystem(uri)
        handle = fs.open_input_file(path)
        try:
            return Raster(uri, _tiff_levels(uri, handle), handle)
        except BaseException:
            handle.close()
            raise
    except (ValueError, KeyError, OSError) as e:
        if isinstance(e, ValueError) and str(e).startswith(f"raster {uri}"):
            raise
        raise ValueError(f"raster {uri}: cannot be read as {'Zarr' if name.endswith(ZARR_SUFFIXES) else 'TIFF'}: {type(e).__name__}: {e}") from e


def raster_pixels(uri: str) -> int | None:
    """H x W of a TIFF or Zarr raster by its header, or None when it is not one we can read."""
    try:
        raster = open_raster(uri)
    except (ValueError, FileNotFoundError):
        return None
    try:
        h, w = raster.shape
        return h * w
    finally:
        raster.close()


# --- synthetic rasters -----------------------------------------------------------------


def _class_color(k: int) -> np.ndarray:
    from segray.data.info import default_color

    # The colours of segray.data.synthetic's shapes.
    return 0.5 * np.array(default_color(k), np.float32) + 100.0


def synthetic_tile(y0: int, x0: int, h: int, w: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The window ``[y0:y0+h, x0:x0+w]`` of the synthetic raster ``seed``: (image (h, w, 3) uint8, truth (h, w) uint8).

    A pixel's value depends on its position only (and, for its noise, on the
    ``CELL`` it lies in), so any tiling of the raster gives the same bytes.
    """
    from segray.data.synthetic import SHAPES

    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    texture = 100 + 25 * np.sin(xx / 41.0 + seed) * np.cos(yy / 57.0) + 15 * np.sin((xx + yy) / 97.0)
    image = np.repeat(texture[..., None], 3, axis=2)
    truth = np.zeros((h, w), np.uint8)
    for cy in range(y0 // CELL, (y0 + h - 1) // CELL + 1):
        for cx in range(x0 // CELL, (x0 + w - 1) // CELL + 1):
            rng = np.random.default_rng([seed, cy, cx])
            # Noise per cell: the same whichever window asks for it.
            top, left = cy * CELL, cx * CELL
            noise = rng.normal(0, 10, size=(CELL, CELL, 3)).astype(np.float32)
            ys = slice(max(top, y0) - y0, min(top + CELL, y0 + h) - y0)
            xs = slice(max(left, x0) - x0, min(left + CELL, x0 + w) - x0)
            cell_ys = slice(ys.start + y0 - top, ys.stop + y0 - top)
            cell_xs = slice(xs.start + x0 - left, xs.stop + x0 - left)
            k = int(rng.integers(0, num_classes))
            if k == 0:
                image[ys, xs] += noise[cell_ys, cell_xs]
                continue
            r = int(rng.integers(CELL // 8, CELL * 3 // 8))
            cyy, cxx = top + int(rng.integers(r, CELL - r)) - y0, left + int(rng.integers(r, CELL - r)) - x0
            shape = np.zeros((h, w), np.uint8)
            kind = SHAPES[(k - 1) % 3]
            if kind == "circle":
                cv2.circle(shape, (cxx, cyy), r, 1, -1)
            elif kind == "rectangle":
                cv2.rectangle(shape, (cxx - r, cyy - r * 2 // 3), (cxx + r, cyy + r * 2 // 3), 1, -1)
            else:
                pts = np.array([[cxx, cyy - r], [cxx - r, cyy + r * 2 // 3], [cxx + r, cyy + r * 2 // 3]], np.int32)
                cv2.fillPoly(shape, [pts], 1)
            inside = shape.astype(bool)
            image[inside] = _class_color(k)
            image[ys, xs] += noise[cell_ys, cell_xs]
            truth[inside] = k
    return np.clip(image, 0, 255).astype(np.uint8), truth


def _tiles(height: int, width: int, tile: int, num_classes: int, seed: int, which: int, done: list[int] | None = None) -> Iterator[np.ndarray]:
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            h, w = min(tile, height - y), min(tile, width - x)
            pair = synthetic_tile(y, x, h, w, num_classes, seed)
            out = pair[which]
            if (h, w) != (tile, tile):  # tifffile takes whole tiles; the edge ones are padded
                full = np.zeros((tile, tile) + out.shape[2:], out.dtype)
                full[:h, :w] = out
                out = full
            if done is not None:
                done[0] += 1
            yield out


def write_synthetic_raster(
    dst: str, height: int, width: int, num_classes: int = 4, seed: int = 0, tile: int = 512, show_progress: bool = True,
) -> tuple[str, str]:
    """Writes ``dst/images/synth_HxW.ome.tif`` and ``dst/truth/synth_HxW.ome.tif`` tile by tile (tiled BigTIFF, zlib).

    Memory holds one tile at a time, whatever the size. A bucket URI is
    written to a local temporary file first and then uploaded as a stream.

    Returns:
        (image URI, truth URI).
    """
    import tifffile

    from segray.data.synthetic import class_names
    from segray.progress import progress

    if height < 16 or width < 16:
        raise ValueError(f"large raster {height}x{width}: use at least 16x16")
    if not 2 <= num_classes <= 255:
        raise ValueError(f"num_classes must be 2..255, got {num_classes}")
    if tile % 16:
        raise ValueError(f"tile {tile}: TIFF tiles must be a multiple of 16")
    name = f"synth_{height}x{width}.ome.tif"
    uris = (storage.join(dst, "images", name), storage.join(dst, "truth", name))
    ntiles = -(-height // tile) * -(-width // tile)
    bar = progress(range(2 * ntiles), total=2 * ntiles, desc="synth --large", enabled=show_progress)
    for which, uri in enumerate(uris):
        with tempfile.TemporaryDirectory() as tmp:
            local = storage.filesystem(uri)[1] if storage.is_local(uri) else os.path.join(tmp, name)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            part = local + ".partial"
            shape = (height, width, 3) if which == 0 else (height, width)
            tiles = _tiles(height, width, tile, num_classes, seed, which)
            tiles = (t for t, _ in zip(tiles, bar))
            tifffile.imwrite(
                part, data=tiles, shape=shape, dtype=np.uint8, tile=(tile, tile), bigtiff=True, compression="zlib",
                photometric="rgb" if which == 0 else "minisblack", ome=True, metadata={"axes": "YXS" if which == 0 else "YX"},
            )
            os.replace(part, local)
            if not storage.is_local(uri):
                storage.upload_file(local, uri)
    for _ in bar:
        pass
    classes = [{"id": k, "name": n} for k, n in enumerate(class_names(num_classes))]
    import json

    from segray.data.info import default_color

    for c in classes:
        c["color"] = default_color(c["id"])
    storage.write_text(storage.join(dst, "classes.json"), json.dumps(classes, indent=2))
    return uris
