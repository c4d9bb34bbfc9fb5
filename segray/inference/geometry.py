"""Bringing images of any size to what a model takes, and its logits back.

Three ways to predict an image (``Geometry.mode``):

- ``fit``: the model was trained at one size; the image is fitted to it
  (``transforms.fit``: resize, or pad/scale down) and the logits are cropped
  to the content and resized back to the image's own size.
- ``whole``: the model takes any size divisible by its ``multiple``; the image
  is padded at the bottom and right and the logits cropped back.
- ``tile``: a sliding window of ``tile`` pixels at the image's own
  resolution, neighbours sharing ``overlap`` pixels: for images too large to
  predict whole, and for models trained on patches (``preprocessing.json``'s
  ``window``). ``fit`` with a ``tile`` slides the window over the fitted image.

Window logits are blended per pixel by a weighted mean (weights divided by
their sum at each pixel). ``gaussian`` (the default, as nnU-Net): each window
weighs its pixels by a Gaussian centred on the window, sigma 1/8 of the side,
so a window's borders, where the model sees least context, count least.
``linear``: weights that are zero within a quarter of the overlap of an inner
window edge and ramp linearly across the middle half, so a model whose
receptive field reaches no further than that quarter gives exactly the
whole-image logits.

Windows stream strip by strip (``tiled_logits``), so an image larger than
memory allows keeps flat memory.

Only numpy and OpenCV here: the decode tasks use it without TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from segray.data import FitMode, fit

Mode = Literal["fit", "whole", "tile"]
Weighting = Literal["gaussian", "linear"]
TTA = Literal["none", "flip", "flip8"]

# sigma of the Gaussian window weights, as a fraction of the window's side (nnU-Net's 1/8).
GAUSSIAN_SIGMA = 1 / 8


@dataclass(frozen=True)
class Geometry:
    """How images reach the model and its logits come back as masks; resolved once on the driver.

    Attributes:
        mode: ``fit``, ``whole`` or ``tile`` (see the module docstring).
        size: ``(H, W)`` of ``fit``.
        fit: ``resize`` or ``pad`` (``fit`` only).
        multiple: what the model needs height and width divisible by.
        tile: ``(H, W)`` sliding window (``tile``; ``fit`` of a patch-trained
            model); None: one model call per (fitted or padded) image.
        overlap: ``(H, W)`` pixels shared by neighbouring windows.
        weighting: how overlapping window logits are blended (``gaussian`` or ``linear``).
        tta: test-time augmentation (``segray.inference.tta``): ``none``,
            ``flip`` (4 mirrored views) or ``flip8`` (and their transposes).
        min_component: connected components of a foreground class smaller
            than this many pixels become background (0: off).
    """

    mode: Mode
    size: tuple[int, int] | None = None
    fit: FitMode = "resize"
    multiple: int = 1
    tile: tuple[int, int] | None = None
    overlap: tuple[int, int] = (0, 0)
    weighting: Weighting = "gaussian"
    tta: TTA = "none"
    min_component: int = 0

    def lineage(self) -> dict:
        """The JSON-ready settings the masks depend on, for ``_run.json``.

        Settings at the values OUTs written before they existed used are left
        out (no TTA, no component removal, the weighting without windows), so
        those OUTs still resume; any other value is named, so a re-run with
        another TTA or window into the same OUT is refused instead of mixed.
        """
        out = {
            "mode": self.mode, "size": list(self.size) if self.size else None, "fit": self.fit, "multiple": self.multiple,
            "tile": list(self.tile) if self.tile else None, "overlap": list(self.overlap),
        }
        if self.tile is not None:
            out["weighting"] = self.weighting
        if self.tta != "none":
            out["tta"] = self.tta
        if self.min_component:
            out["min_component"] = self.min_component
        return out


def fit_scale(height: int, width: int, size: tuple[int, int] | None, mode: FitMode) -> tuple[float, float]:
    """(sy, sx): fitted pixels per original pixel (``transforms.fit``'s resize, or letterbox pad that only shrinks)."""
    if size is None:
        return 1.0, 1.0
    if mode == "resize":
        return size[0] / height, size[1] / width
    scale = min(size[0] / height, size[1] / width, 1.0)
    return scale, scale


def fitted_content(height: int, width: int, size: tuple[int, int], mode: FitMode) -> tuple[int, int]:
    """The ``(h, w)`` region of a fitted image that holds the picture (the rest is padding)."""
    if mode == "resize" or (height, width) == tuple(size):
        return tuple(size)
    scale, _ = fit_scale(height, width, size, mode)
    if scale < 1.0:
        # The same rounding as transforms.fit.
        return max(1, round(height * scale)), max(1, round(width * scale))
    return height, width


def fit_image(image: np.ndarray, size: tuple[int, int], mode: FitMode) -> np.ndarray:
    """``image`` (H, W, 3) fitted to ``size`` as training did."""
    fitted, _ = fit(image, None, size, mode)
    return fitted


def pad_to(image: np.ndarray, height: int, width: int, fill=None) -> np.ndarray:
    """Pads (H, W, C) at the bottom and right.

    Args:
        fill: per-channel values of the padding; None pads with zeros (the
            mean of a normalised image). An image not yet normalised is padded
            with its normalisation's mean, as float32, so that it becomes the
            same zeros after normalisation.
    """
    pad_h, pad_w = height - image.shape[0], width - image.shape[1]
    if pad_h <= 0 and pad_w <= 0:
        return image
    if fill is None:
        return np.pad(image, ((0, max(pad_h, 0)), (0, max(pad_w, 0)), (0, 0)))
    out = np.empty((max(height, image.shape[0]), max(width, image.shape[1]), image.shape[2]), np.float32)
    out[...] = np.asarray(fill, np.float32)
    out[: image.shape[0], : image.shape[1]] = image
    return out


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def restore(logits: np.ndarray, content: tuple[int, int], height: int, width: int) -> np.ndarray:
    """Logits (h, w, C) of a fitted or padded input -> (height, width, C) of the image.

    Crops to ``content`` (the part that held the picture) and resizes
    linearly when that differs from the image's own size.
    """
    logits = logits[: content[0], : content[1]]
    if logits.shape[:2] == (height, width):
        return logits
    channels = logits.shape[2]
    # cv2.resize takes at most 512 channels (class ids fit in uint8, so C <= 255).
    out = cv2.resize(np.ascontiguousarray(logits, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return out.reshape(height, width, channels)


def window_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the windows along one axis; the last one ends at ``length``.

    ``length`` is at least ``tile`` (smaller images are padded first).
    """
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def gaussian_profile(tile: int) -> np.ndarray:
    """(tile,) weights: a Gaussian centred on the window, sigma ``GAUSSIAN_SIGMA`` of its side, peak 1.

    Centred on the window's middle (not a pixel), so the profile is
    symmetric and a mirrored window weighs its pixels as the original does.
    The smallest weight (4 sigma out, about 3e-4) stays above zero: a pixel
    that only a window's border covers still gets that window's logits.
    """
    offsets = np.arange(tile, dtype=np.float64) + 0.5 - tile / 2
    sigma = max(tile * GAUSSIAN_SIGMA, 1e-6)
    return np.exp(-0.5 * (offsets / sigma) ** 2).astype(np.float32)


def window_weights(starts: list[int], tile: int, weighting: Weighting = "gaussian") -> list[np.ndarray]:
    """One (tile,) weight profile per window start along one axis.

    ``gaussian``: the same ``gaussian_profile`` for every window. ``linear``:
    on an edge shared with a neighbour the weight is 0 for the outer quarter
    of the shared pixels and ramps linearly to 1 across the middle half; on
    an image edge it stays 1. Where two windows share pixels their linear
    weights sum to 1.
    """
    if weighting == "gaussian":
        return [gaussian_profile(tile)] * len(starts)
    if weighting != "linear":
        raise ValueError(f"weighting: expected gaussian or linear, got {weighting!r}")
    centers = np.arange(tile, dtype=np.float64) + 0.5
    profiles = []
    for k, start in enumerate(starts):
        w = np.ones(tile, np.float64)
        if k > 0:
            shared = starts[k - 1] + tile - start
            if shared > 0:
                w = np.minimum(w, np.clip((centers - shared / 4) / (shared / 2), 0.0, 1.0))
        if k + 1 < len(starts):
            shared = start + tile - starts[k + 1]
            if shared > 0:
                w = np.minimum(w, np.clip((tile - centers - shared / 4) / (shared / 2), 0.0, 1.0))
        profiles.append(w.astype(np.float32))
    return profiles


def tiled_logits(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile: tuple[int, int],
    overlap: tuple[int, int],
    batch_size: int,
    fill=None,
    weighting: Weighting = "gaussian",
) -> Iterator[tuple[int, np.ndarray]]:
    """Blended sliding-window logits of one normalised image, strip by strip.

    Windows go to ``predict`` in raster order, ``batch_size`` at a time. Rows
    that no later window touches are final; they are yielded and dropped, so
    memory holds about two window rows of logits, not the whole image's.

    Args:
        predict: ``(N, th, tw, 3) -> (N, th, tw, C)`` logits.
        image: ``(H, W, 3)``, as ``predict`` takes it.
        tile: ``(th, tw)`` window.
        overlap: ``(oh, ow)`` pixels shared by neighbouring windows.
        batch_size: windows per ``predict`` call.
        fill: padding of images smaller than a tile (see ``pad_to``).
        weighting: ``gaussian`` or ``linear`` (see ``window_weights``).

    Yields:
        ``(row, logits)``: blended logits ``(h, W, C)`` of rows ``row .. row + h``.
    """
    height, width = image.shape[:2]
    th, tw = tile
    padded = pad_to(image, max(height, th), max(width, tw), fill)
    ys = window_starts(padded.shape[0], th, overlap[0])
    xs = window_starts(padded.shape[1], tw, overlap[1])
    wy, wx = window_weights(ys, th, weighting), window_weights(xs, tw, weighting)
    windows = [(i, j) for i in range(len(ys)) for j in range(len(xs))]

    acc: np.ndarray | None = None  # weighted logit sums of rows [top, top + len(acc))
    wsum: np.ndarray | None = None
    top = 0
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        batch = np.stack([padded[ys[i] : ys[i] + th, xs[j] : xs[j] + tw] for i, j in chunk])
        logits = np.asarray(predict(batch), np.float32)
        if acc is None:
            acc = np.zeros((0, padded.shape[1], logits.shape[-1]), np.float32)
            wsum = np.zeros((0, padded.shape[1]), np.float32)
        for (i, j), out in zip(chunk, logits):
            bottom = ys[i] + th - top
            if bottom > acc.shape[0]:
                grow = bottom - acc.shape[0]
                acc = np.concatenate([acc, np.zeros((grow,) + acc.shape[1:], np.float32)])
                wsum = np.concatenate([wsum, np.zeros((grow, wsum.shape[1]), np.float32)])
            weight = wy[i][:, None] * wx[j][None, :]
            rows = slice(ys[i] - top, bottom)
            cols = slice(xs[j], xs[j] + tw)
            acc[rows, cols] += out * weight[..., None]
            wsum[rows, cols] += weight
        # Windows left start at or below this row: everything above is final.
        done = ys[windows[first + len(chunk)][0]] if first + len(chunk) < len(windows) else padded.shape[0]
        if done > top:
            n = done - top
            final = acc[:n] / np.maximum(wsum[:n], 1e-12)[..., None]
            if top < height:
                yield top, final[: min(n, height - top), :width]
            acc, wsum, top = acc[n:], wsum[n:], done


def tiled_argmax(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile: tuple[int, int],
    overlap: tuple[int, int],
    batch_size: int,
    fill=None,
    weighting: Weighting = "gaussian",
) -> np.ndarray:
    """The (H, W) uint8 class map of ``tiled_logits``, one strip at a time."""
    out = np.empty(image.shape[:2], np.uint8)
    for row, logits in tiled_logits(predict, image, tile, overlap, batch_size, fill, weighting):
        out[row : row + logits.shape[0]] = logits.argmax(axis=-1)
    return out


def tiled_full(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile: tuple[int, int],
    overlap: tuple[int, int],
    batch_size: int,
    fill=None,
    weighting: Weighting = "gaussian",
) -> np.ndarray:
    """All (H, W, C) blended logits of ``tiled_logits`` at once: for fitted images, whose size the model's bounds."""
    return np.concatenate([logits for _, logits in tiled_logits(predict, image, tile, overlap, batch_size, fill, weighting)])
