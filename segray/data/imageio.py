"""Decoding and encoding of image and mask bytes with OpenCV (and Pillow for colour-mapped masks).

Decoders raise ``BadInput`` with a reason a person can act on; callers add the
file's URI. OpenCV happily returns a partial picture for a truncated JPEG or
PNG, so the container's end marker is checked before decoding.

OpenCV expands a colour-mapped (indexed) PNG to its colours; PASCAL VOC and
the tools that export it store class ids as the indices of such a PNG, so
masks of that kind are read with Pillow, which keeps the indices.
"""

from __future__ import annotations

import io
import os
import struct

import cv2
import numpy as np

from segray.config import DEFAULT_MAX_PIXELS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"


class BadInput(ValueError):
    """An input file cannot be used; the message says why."""


class TooLarge(BadInput):
    """The header says the image has more pixels than allowed (nothing was decoded)."""


class WrongChannels(BadInput):
    """The image decodes, but with a channel count no model takes (not 1, 3 or 4)."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _check_container(data: bytes) -> None:
    if not data:
        raise BadInput("empty file (0 bytes)")
    if data.startswith(_PNG_SIGNATURE) and not data.rstrip(b"\x00").endswith(_PNG_END):
        raise BadInput(f"truncated PNG ({len(data)} bytes, no IEND chunk at the end)")
    if data.startswith(b"\xff\xd8") and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise BadInput(f"truncated JPEG ({len(data)} bytes, no end-of-image marker)")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, BMP or TIFF header without decoding, or None if not found."""
    try:
        if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data.startswith(b"BM") and len(data) >= 26:
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data.startswith(b"\xff\xd8"):
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    i += 1
                    continue
                marker = data[i + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                    i += 1 if marker == 0xFF else 2
                    continue
                length = struct.unpack(">H", data[i + 2:i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                    height, width = struct.unpack(">HH", data[i + 5:i + 9])
                    return width, height
                i += 2 + length
            return None
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            endian = "<" if data[:2] == b"II" else ">"
            offset = struct.unpack(endian + "I", data[4:8])[0]
            count = struct.unpack(endian + "H", data[offset:offset + 2])[0]
            found = {}
            for k in range(count):
                entry = data[offset + 2 + 12 * k: offset + 14 + 12 * k]
                tag, kind = struct.unpack(endian + "HH", entry[:4])
                if tag in (256, 257):
                    fmt = "H" if kind == 3 else "I"
                    found[tag] = struct.unpack(endian + fmt, entry[8:8 + struct.calcsize(fmt)])[0]
            if 256 in found and 257 in found:
                return found[256], found[257]
    except (struct.error, IndexError):
        return None
    return None


def header_channels(data: bytes) -> int | None:
    """Samples per pixel from a TIFF header (tag 277), or None for other formats.

    PNG and BMP cannot hold more than four channels; OpenCV turns a TIFF
    with two into grey and refuses one with five or more, so the count is
    read here to say why.
    """
    try:
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            endian = "<" if data[:2] == b"II" else ">"
            offset = struct.unpack(endian + "I", data[4:8])[0]
            count = struct.unpack(endian + "H", data[offset:offset + 2])[0]
            for k in range(count):
                entry = data[offset + 2 + 12 * k: offset + 14 + 12 * k]
                tag, kind = struct.unpack(endian + "HH", entry[:4])
                if tag == 277:
                    fmt = "H" if kind == 3 else "I"
                    return struct.unpack(endian + fmt, entry[8:8 + struct.calcsize(fmt)])[0]
            return 1  # SamplesPerPixel defaults to 1
    except (struct.error, IndexError):
        return None
    return None


def check_channels(data: bytes) -> None:
    """Raises WrongChannels when the header declares a channel count no model takes."""
    channels = header_channels(data)
    if channels is not None and not 1 <= channels <= 4:
        raise WrongChannels(f"image has {channels} channels; expected 1 to 4 (grey, grey + alpha, RGB, RGBA)")


def check_pixels(data: bytes, max_pixels: int | None) -> None:
    """Raises BadInput when the header says the image has more than ``max_pixels`` pixels."""
    if not max_pixels:
        return
    size = header_size(data)
    if size and size[0] * size[1] > max_pixels:
        raise TooLarge(
            f"too large: {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, over the limit of {max_pixels:,} "
            "(set aside before decoding; raise max_pixels to accept it)"
        )


VALUE_RANGE = "0..255"
VALUE_RULE = "values on one 0..255 scale by the file's dtype: uint8 as stored, other integers x 255/dtype max (uint16 /257), floats x 255 (0..1 assumed)"


def to_common_range(array: np.ndarray) -> np.ndarray:
    """Pixel values on the 0..255 scale of 8-bit images, whatever the file's dtype.

    uint8 is returned as it is; other integer types are scaled by their
    type's maximum (a 16-bit 65535 becomes 255.0, keeping the low bits as
    fractions); floats are taken to hold 0..1 and scaled by 255. A dataset
    mixing 8-bit and 16-bit files then has one intensity scale, and the
    dataset's mean and std (computed after this) fit every image.
    """
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) * np.float32(255.0 / np.iinfo(array.dtype).max)
    return array.astype(np.float32) * np.float32(255.0)


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, keep_dtype: bool = False) -> np.ndarray:
    """Decodes image bytes to an (H, W, 3) RGB array: uint8, or float32 on the same 0..255 scale.

    Grey images are repeated to three channels and alpha is dropped, so every
    model sees three channels. Files of other dtypes (16-bit, float) are put
    on the 8-bit scale by ``to_common_range``, unless ``keep_dtype``.

    Raises:
        BadInput: empty, truncated or undecodable bytes.
        TooLarge: more pixels than ``max_pixels`` by the header (checked before decoding).
        WrongChannels: a channel count other than 1 to 4.
    """
    _check_container(data)
    check_pixels(data, max_pixels)
    check_channels(data)
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
        raise WrongChannels(f"image has {array.shape[2]} channels; expected 1, 3 or 4")
    return array if keep_dtype else to_common_range(array)


def decode_raw(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes bytes as stored (mask files): (H, W) or (H, W, C) in BGR(A) order."""
    _check_container(data)
    check_pixels(data, max_pixels)
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.size == 0:
        raise BadInput(f"not a decodable image ({len(data)} bytes)")
    return array


_PNG_INDEXED = 3  # the IHDR colour type of a colour-mapped PNG


def is_indexed_png(data: bytes) -> bool:
    """True for a colour-mapped PNG (IHDR colour type 3), whose pixels are indices into its palette."""
    return data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) > 25 and data[25] == _PNG_INDEXED


def png_palette(data: bytes) -> list[tuple[int, int, int]] | None:
    """The colours of a colour-mapped PNG's palette (PLTE chunk), entry i at index i; None for other files.

    Read from the chunks, nothing decoded: the driver reads one mask's palette
    to colour the classes.
    """
    if not is_indexed_png(data):
        return None
    at = len(_PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"PLTE" and len(body) == length and length % 3 == 0:
            return [tuple(body[i:i + 3]) for i in range(0, length, 3)]  # type: ignore[misc]
        if kind in (b"IDAT", b"IEND"):
            return None
        at += 12 + length
    return None


def _palette_indices(data: bytes) -> np.ndarray:
    """(H, W) uint8 palette indices of a colour-mapped PNG (any bit depth)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.mode != "P":
                raise BadInput(f"colour-mapped PNG decodes as mode {image.mode!r}, not palette indices")
            return np.asarray(image, dtype=np.uint8)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a damaged file
        raise BadInput(f"not a decodable colour-mapped PNG ({len(data)} bytes): {type(e).__name__}: {e}") from None


def decode_mask(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes a class-id mask to (H, W) uint8.

    A one-channel PNG holds the ids as values; a colour-mapped PNG (PASCAL
    VOC's format) holds them as palette indices, read as they are, not as
    the colours they map to.
    """
    if is_indexed_png(data):
        _check_container(data)
        check_pixels(data, max_pixels)
        return _palette_indices(data)
    array = decode_raw(data, max_pixels)
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
