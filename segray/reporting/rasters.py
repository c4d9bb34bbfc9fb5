"""The report's section for raster outputs (``segray.inference.rasters``): an overview of each raster
with its mask overlaid, read from the mask's pyramid, and the worst chunks by IoU.

The overview never decodes the raster whole: the mask is read at the
coarsest pyramid level at least ``OVERVIEW`` pixels on its long side, and
the image at the same stride (its own pyramid level when it has one).
"""

from __future__ import annotations

import base64
import html

import numpy as np

from segray import storage
from segray.data import encode_png, open_raster
from segray.reporting.strips import colour_table

# The long side of an overview, in pixels (at least, where the pyramid allows).
OVERVIEW = 768
WORST_CHUNKS = 10


def _level(raster, long_side: int) -> int:
    """The coarsest level whose long side is still at least ``long_side`` (0 when none is)."""
    best = 0
    for k in range(len(raster.levels)):
        if max(raster.level_shape(k)) >= long_side:
            best = k
    return best


def overview(image_uri: str, mask_uri: str, colours: list[tuple[int, int, int]]) -> bytes:
    """A PNG: the raster at about ``OVERVIEW`` pixels, the mask's class colours blended over it (class 0 left clear)."""
    mask = open_raster(mask_uri)
    k = _level(mask, OVERVIEW)
    mh, mw = mask.level_shape(k)
    labels = mask.read(0, mh, 0, mw, level=k)[..., 0]
    stride = 1 << k
    image = open_raster(image_uri)
    try:
        levels = [j for j in range(len(image.levels)) if image.level_shape(j) == (mh, mw)]
        if levels:
            picture = image.read(0, mh, 0, mw, level=levels[0])
        else:
            array, axes = image.levels[0]
            index = tuple(slice(None, None, stride) if a in "YX" else slice(None) if a == "C" else 0 for a in axes)
            picture = np.asarray(array[index])
            kept = [a for a in axes if a in "YXC"]
            picture = np.moveaxis(picture, kept.index("C"), -1) if "C" in kept else picture[..., None]
    finally:
        image.close()
    picture = picture[:mh, :mw]
    if picture.shape[-1] == 1:
        picture = np.repeat(picture, 3, axis=-1)
    picture = picture[..., :3].astype(np.float32)
    if picture.max() > 255:
        picture = picture * (255.0 / picture.max())
    lut = colour_table(colours).astype(np.float32)
    painted = labels > 0
    out = picture.copy()
    out[painted] = 0.5 * picture[painted] + 0.5 * lut[labels[painted]]
    return encode_png(np.clip(out, 0, 255).astype(np.uint8))


def raster_section(summary: dict, out_root: str, colours: list[tuple[int, int, int]]) -> str:
    """HTML: per raster, its overview and, with truth, its worst chunks by mean IoU."""
    parts = []
    chunks_uri = storage.join(out_root, "raster_chunks.parquet")
    chunks = storage.read_parquet(chunks_uri).to_pandas() if storage.exists(chunks_uri) else None
    for r in summary.get("rasters", []):
        e = html.escape
        try:
            png = overview(r["uri"], r["mask"], colours)
            data = base64.b64encode(png).decode("ascii")
            figure = f'<img alt="{e(r["image_id"])}: overview with mask" src="data:image/png;base64,{data}">'
        except (OSError, ValueError) as error:
            figure = f'<p class="note">No overview: {e(str(error))}</p>'
        rows = ""
        if chunks is not None and summary.get("has_truth"):
            mine = chunks[(chunks["image_id"] == r["image_id"]) & chunks["has_truth"]]
            if len(mine):
                # Mean over the classes present in the chunk (NaN: absent from truth and prediction).
                scores = mine.groupby(["chunk_row", "chunk_col", "y", "x"])["iou"].mean().sort_values().head(WORST_CHUNKS)
                rows = "".join(f"<tr><td>{int(cr)}, {int(cc)}</td><td>{int(y)}, {int(x)}</td><td>{v:.4f}</td></tr>"
                               for (cr, cc, y, x), v in scores.items())
                rows = (f'<table class="sortable"><thead><tr><th class="name">chunk (row, col)</th><th class="name">origin (y, x)</th>'
                        f"<th>mean IoU</th></tr></thead><tbody>{rows}</tbody></table>")
        parts.append(
            f'<section class="raster" data-image-id="{e(r["image_id"])}"><h3>{e(r["image_id"])}: {r["height"]:,} x {r["width"]:,} pixels, '
            f'{r["chunks"]} chunks</h3>{figure}{rows}</section>'
        )
    return "".join(parts)
