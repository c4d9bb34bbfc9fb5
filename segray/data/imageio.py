"""Decoding and encoding of image and mask bytes with OpenCV.

Decoders raise ``BadInput`` with a reason a person can act on; callers add the
file's URI. OpenCV happily returns a partial picture for a truncated JPEG or
PNG, so the container's end marker is checked before decoding.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"


class BadInput(ValueError):
    """An input file cannot be used; the message says why."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _check_container(data: bytes) -> None:
    if not data:
        raise BadInput("empty file (0 bytes)")
    if data.startswith(_PNG_SIGNATURE) and not data.rstrip(b"\x00").endswith(_PNG_END):
        raise BadInput(f"truncated PNG ({len(data)} bytes, no IEND chunk at the end)")
    if data.startswith(b"\xff\xd8") and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise BadInput(f"truncated JPEG ({len(data)} bytes, no end-of-image marker)")


def decode_image(data: bytes) -> np.ndarray:
    """Decodes image bytes to an (H, W, 3) RGB array of the file's own dtype.

    Grey images are repeated to three channels and alpha is dropped, so every
    model sees three channels.

    Raises:
        BadInput: empty, truncated or undecodable bytes.
    """
    _check_container(data)
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.size == 0:
        raise BadInput(f"not a decodable image ({len(data)} bytes)")
    if array.ndim == 2:
        array = cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    elif array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    elif array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    else:
        raise BadInput(f"image has {array.shape[2]} channels; expected 1, 3 or 4")
    return array


def decode_raw(data: bytes) -> np.ndarray:
    """Decodes bytes as stored (mask files): (H, W) or (H, W, C) in BGR(A) order."""
    _check_container(data)
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.size == 0:
        raise BadInput(f"not a decodable image ({len(data)} bytes)")
    return array


def decode_mask(data: bytes) -> np.ndarray:
    """Decodes a stored class-id mask (one channel PNG) to (H, W) uint8."""
    array = decode_raw(data)
    if array.ndim == 3:
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, min(3, array.shape[2]))):
            raise BadInput(f"mask has {array.shape[2]} differing channels; expected one channel of class ids")
        array = array[..., 0]
    if array.dtype != np.uint8:
        if array.max(initial=0) > 255:
            raise BadInput(f"mask holds values up to {int(array.max())}; class ids must be 0..254 or 255")
        array = array.astype(np.uint8)
    return array


def encode_png(array: np.ndarray) -> bytes:
    """Encodes an (H, W) or (H, W, 3) RGB uint8 array as PNG bytes."""
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an array of shape {array.shape}")
    return buf.tobytes()
