"""What each batch leaves in OUT, in an order that makes a crash harmless.

Per batch, a Ray task writes the overlays, then the masks, then one record
part ``_parts/<hash of the batch's ids>.parquet``. Every file goes through
``storage.write_bytes`` (a temporary name renamed into place, or one S3 PUT),
so no reader sees a partial file; the part is written last, so an image
counts as done only when its mask is in place. A retried task writes the same
names again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segray import storage
from segray.data import encode_png
from segray.inference.output import Output
from segray.inference.tables import error_record, ok_record, records_table


def color_table(colors: list[tuple[int, int, int]]) -> np.ndarray:
    """(256, 3) uint8 lookup from class id to RGB colour."""
    lut = np.zeros((256, 3), np.uint8)
    for k, c in enumerate(colors):
        lut[k] = c
    return lut


def overlay(
    image: np.ndarray, pred: np.ndarray, lut: np.ndarray, truth: np.ndarray | None = None, ignore_index: int = 255, alpha: float = 0.5
) -> np.ndarray:
    """The prediction's colours over the image; with truth, [truth | prediction] side by side.

    Args:
        image: (H, W, 3) uint8 RGB.
        pred: (H, W) class ids.
        lut: (256, 3) colour per class id.
        truth: (H, W) class ids (``ignore_index`` pixels stay uncoloured) or None.

    Returns:
        (H, W, 3) or (H, 2W + 4, 3) uint8 RGB.
    """

    def blend(ids: np.ndarray, skip: np.ndarray | None) -> np.ndarray:
        mixed = image.astype(np.float32) * (1 - alpha) + lut[ids].astype(np.float32) * alpha
        mixed = mixed.astype(np.uint8)
        if skip is not None:
            mixed[skip] = image[skip]
        return mixed

    predicted = blend(pred, None)
    if truth is None or truth.size == 0:
        return predicted
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([blend(truth, truth == ignore_index), gap, predicted], axis=1)


class WriteResults:
    """``map_batches`` body (Ray tasks): predictions -> masks, overlays, one record part.

    Returns one small row per image (``image_id``, ``status``) for the driver's count.
    """

    def __init__(self, out: Output, ignore_index: int, colors: list[tuple[int, int, int]], run: int):
        self.out = out
        self.ignore_index = ignore_index
        self.lut = color_table(colors)
        self.run = run

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        records = []
        for i in range(len(batch["image_id"])):
            image_id, uri, error = str(batch["image_id"][i]), str(batch["uri"][i]), str(batch["error"][i])
            if error:
                records.append(error_record(image_id, uri, error, self.run))
                continue
            pred, truth, original = batch["pred"][i], batch["truth"][i], batch["original"][i]
            truth = truth if truth.size else None
            if original.size:
                image = overlay(original, pred, self.lut, truth, self.ignore_index)
                storage.write_bytes(self.out.overlay(image_id), encode_png(image))
            storage.write_bytes(self.out.mask(image_id), encode_png(pred))
            records.append(ok_record(image_id, uri, batch["height"][i], batch["width"][i], truth, pred, self.ignore_index, self.run))
        if records:
            storage.write_parquet(records_table(records), self.out.part([r["image_id"] for r in records]))
        return {
            "image_id": np.asarray([r["image_id"] for r in records], dtype=object),
            "status": np.asarray([r["status"] for r in records], dtype=object),
        }
