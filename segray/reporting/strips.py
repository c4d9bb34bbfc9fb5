"""Strips of image | truth | prediction | error map for the images a report shows.

The files come from where the output says they are: predict's source (a raw
folder's ``images/`` and ``masks/``, or the Parquet shard named in the
image's record) and ``OUT/masks``; an evaluate output's ``pred`` and
``truth`` folders (no image there, so its strips start at the truth).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from segray import storage
from segray.data import IGNORE_INDEX, BadInput, decode_image, decode_mask, encode_png
from segray.inference import Output, display_uint8
from segray.reporting.query import OutputInfo

GAP = 4
MAX_SIDE = 128  # strips are a glance, not a full view: a side above this is scaled down
IGNORED = (200, 200, 200)
CORRECT = (255, 255, 255)
MISSED = (220, 0, 140)  # truth is the class, prediction is not (false negative)
WRONGLY = (255, 150, 0)  # prediction is the class, truth is not (false positive)
OTHER_ERROR = (90, 90, 90)  # wrong, but neither side is the class
ERROR_COLOURS = {"correct": CORRECT, "missed (false negative)": MISSED, "wrongly predicted (false positive)": WRONGLY,
                 "other error": OTHER_ERROR, "ignored": IGNORED}


@dataclass
class Pixels:
    """One image's arrays (None where a file could not be read) and the problems met reading them."""

    image: np.ndarray | None
    truth: np.ndarray | None
    pred: np.ndarray | None
    problems: list[str]


def _record_uris(out: Output, ids: set[str]) -> dict[str, str]:
    """image id -> the URI its predict record names (the image file, or ``shard#id``)."""
    import pyarrow.compute as pc

    from segray.inference import OK, latest_records, read_parts

    records = latest_records(read_parts(out, ["image_id", "uri", "status", "run"]))
    if not records.num_rows:
        return {}
    import pyarrow as pa

    records = records.filter(pc.and_(pc.equal(records["status"], OK), pc.is_in(records["image_id"], pa.array(sorted(ids), pa.string()))))
    return dict(zip(records["image_id"].to_pylist(), records["uri"].to_pylist()))


def _shard_rows(uris: dict[str, str]) -> dict[str, tuple[bytes | None, bytes | None]]:
    """Reads the image and mask bytes of ids whose record names a shard (``shard#id``), one read per shard."""
    import pyarrow.parquet as pq

    by_shard: dict[str, list[str]] = {}
    for image_id, uri in uris.items():
        suffix = f"#{image_id}"
        if uri.endswith(suffix):
            by_shard.setdefault(uri[: -len(suffix)], []).append(image_id)
    found: dict[str, tuple[bytes | None, bytes | None]] = {}
    for shard, ids in by_shard.items():
        fs, path = storage.filesystem(shard)
        names = pq.read_schema(path, filesystem=fs).names
        columns = ["image_id", "image"] + (["mask"] if "mask" in names else [])
        rows = pq.read_table(path, filesystem=fs, columns=columns, filters=[("image_id", "in", ids)]).to_pylist()
        for row in rows:
            found[row["image_id"]] = (row["image"], row.get("mask"))
    return found


def read_pixels(info: OutputInfo, ids: list[str]) -> dict[str, Pixels]:
    """The image, truth and prediction of each id, read in parallel (a few threads: S3 reads wait on the network)."""
    out = info.output
    summary = info.summary
    wanted = set(ids)
    shard_bytes: dict[str, tuple[bytes | None, bytes | None]] = {}
    uris: dict[str, str] = {}
    if info.kind == "predict":
        uris = _record_uris(out, wanted)
        if summary.get("source_kind") == "shards":
            shard_bytes = _shard_rows(uris)

    def load(image_id: str) -> Pixels:
        problems: list[str] = []

        def read(uri: str | None, decode, what: str):
            if not uri:
                problems.append(f"no {what} file is known")
                return None
            try:
                return decode(storage.read_bytes(uri))
            except (OSError, BadInput) as e:
                problems.append(f"{what} {uri}: {e}")
                return None

        if info.kind == "evaluate":
            truth = read(storage.join(summary["truth"], f"{image_id}.png"), decode_mask, "truth")
            pred = read(storage.join(summary["pred"], f"{image_id}.png"), decode_mask, "prediction")
            return Pixels(None, truth, pred, problems)
        pred = read(out.mask(image_id), decode_mask, "prediction")
        if image_id in shard_bytes:
            image_bytes, mask_bytes = shard_bytes[image_id]
            image = _decode_or_note(image_bytes, decode_image, "image", uris.get(image_id), problems)
            truth = _decode_or_note(mask_bytes, decode_mask, "truth", uris.get(image_id), problems)
            return Pixels(image, truth, pred, problems)
        image = read(uris.get(image_id), decode_image, "image")
        truth = read(storage.join(summary["source"], "masks", f"{image_id}.png"), decode_mask, "truth")
        return Pixels(image, truth, pred, problems)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(ids, pool.map(load, ids)))


def _decode_or_note(data: bytes | None, decode, what: str, where: str | None, problems: list[str]):
    if data is None:
        problems.append(f"no {what} in {where}")
        return None
    try:
        return decode(data)
    except BadInput as e:
        problems.append(f"{what} {where}: {e}")
        return None


def colour_table(colours: list[tuple[int, int, int]]) -> np.ndarray:
    """(256, 3) uint8: class id -> colour; the ignore index shows light grey."""
    lut = np.zeros((256, 3), np.uint8)
    for k, c in enumerate(colours):
        lut[k] = c
    lut[IGNORE_INDEX] = IGNORED
    return lut


def error_map(truth: np.ndarray, pred: np.ndarray, class_id: int) -> np.ndarray:
    """(H, W, 3) uint8: where the prediction is right, misses ``class_id``, wrongly says it, or errs elsewhere."""
    out = np.empty(truth.shape + (3,), np.uint8)
    out[:] = CORRECT
    counted = truth != IGNORE_INDEX
    wrong = counted & (truth != pred)
    out[wrong] = OTHER_ERROR
    out[wrong & (pred == class_id)] = WRONGLY
    out[wrong & (truth == class_id)] = MISSED
    out[~counted] = IGNORED
    return out


def _scaled(array: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
    if array.shape[:2] == (height, width):
        return array
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def strip(pixels: Pixels, class_id: int, lut: np.ndarray, with_image: bool = True) -> np.ndarray:
    """image | truth | prediction | error map side by side, ``GAP`` white pixels apart, at most ``MAX_SIDE`` high or wide per panel.

    A panel whose file could not be read is grey; an evaluate output has no image panel.
    """
    shapes = [a.shape[:2] for a in (pixels.pred, pixels.truth, pixels.image) if a is not None]
    h, w = shapes[0] if shapes else (MAX_SIDE, MAX_SIDE)
    scale = min(1.0, MAX_SIDE / max(h, w))
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    blank = np.full((sh, sw, 3), 160, np.uint8)

    def fits(a: np.ndarray | None) -> bool:
        return a is not None and a.shape[:2] == (h, w)

    panels = []
    if with_image:
        panels.append(_scaled(display_uint8(pixels.image), sh, sw, nearest=False) if fits(pixels.image) else blank)
    truth = pixels.truth if fits(pixels.truth) else None
    pred = pixels.pred if fits(pixels.pred) else None
    panels.append(_scaled(lut[truth], sh, sw, nearest=True) if truth is not None else blank)
    panels.append(_scaled(lut[pred], sh, sw, nearest=True) if pred is not None else blank)
    panels.append(_scaled(error_map(truth, pred, class_id), sh, sw, nearest=True) if truth is not None and pred is not None else blank)
    gap = np.full((sh, GAP, 3), 255, np.uint8)
    pieces = []
    for p in panels:
        pieces += [p, gap]
    return np.concatenate(pieces[:-1], axis=1)


def strip_png(pixels: Pixels, class_id: int, lut: np.ndarray, with_image: bool = True) -> bytes:
    return encode_png(strip(pixels, class_id, lut, with_image))
