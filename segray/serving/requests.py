"""What ``POST /segment`` reads and answers, without Ray: body -> image -> status, body -> response.

A request carries the image file as its body (PNG, JPEG, TIFF, BMP) or as
the first file part of a ``multipart/form-data`` body. Statuses:

- 400: no body, not an image, truncated, a multipart body without a file, or
  a ``format`` other than ``png`` and ``json``;
- 413: a body over the byte limit (refused from its Content-Length before any
  of it is read; a body without one is counted as it arrives and refused at
  the limit), or more pixels than the limit, read from the header before decoding;
- 422: an image with a channel count no model takes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import numpy as np

from segray.data import BadInput, TooLarge, WrongChannels, decode_image, encode_png


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, the message its reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


FORMATS = ("png", "json")


def answer_format(value: str | None) -> str:
    """The ``format`` query parameter: ``png`` (the default) or ``json``.

    Raises:
        RequestError: 400 naming the allowed values.
    """
    if value is None:
        return "png"
    if value not in FORMATS:
        shown = value if len(value) <= 40 else value[:40] + f"... ({len(value)} characters)"
        raise RequestError(400, f"format {shown!r} is not one of {', '.join(FORMATS)}; use ?format=png (the mask) or ?format=json (class fractions)")
    return value


def _too_large(size: str, limit: int) -> RequestError:
    return RequestError(413, f"request body {size} is over the limit of {limit:,} bytes (max_body_mb); send a smaller file")


async def read_body(chunks: AsyncIterable[bytes], content_length: str | None, limit: int) -> bytes:
    """The request body, read only while it stays within ``limit`` bytes.

    Args:
        chunks: the body as it arrives (Starlette's ``request.stream()``).
        content_length: the Content-Length header, or None (a chunked body).
        limit: the largest body accepted, in bytes.

    Raises:
        RequestError: 413 when Content-Length says more than ``limit`` (before
            anything is read), or when the bytes received pass it.
    """
    if content_length is not None and content_length.strip().isdigit() and int(content_length) > limit:
        raise _too_large(f"of {int(content_length):,} bytes (Content-Length)", limit)
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_large(f"passed {size:,} bytes as it arrived", limit)
        parts.append(chunk)
    return b"".join(parts)


def image_bytes(body: bytes, content_type: str) -> bytes:
    """The image file in a request body (the body itself, or the first file part of a multipart body)."""
    if not body:
        raise RequestError(400, "empty request body; send the image file as the body or as a multipart file part")
    if content_type.lower().startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
        if not message.is_multipart():
            raise RequestError(400, "multipart/form-data body could not be parsed (boundary missing or wrong)")
        parts = list(message.iter_parts())
        files = [p for p in parts if p.get_filename()] or parts
        if not files:
            raise RequestError(400, "multipart/form-data body holds no part")
        data = files[0].get_payload(decode=True) or b""
        if not data:
            raise RequestError(400, f"multipart part {files[0].get_filename() or files[0].get_param('name', header='content-disposition')!r} is empty")
        return data
    return body


def decode_request(body: bytes, content_type: str, max_pixels: int) -> np.ndarray:
    """(H, W, 3) RGB image of the request.

    Raises:
        RequestError: 400 / 413 / 422 with the reason.
    """
    data = image_bytes(body, content_type)
    try:
        return decode_image(data, max_pixels)
    except TooLarge as e:
        raise RequestError(413, str(e)) from None
    except WrongChannels as e:
        raise RequestError(422, str(e)) from None
    except BadInput as e:
        raise RequestError(400, f"not an image segray can read: {e}") from None


def class_fractions(mask: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Share of the pixels predicted as each class."""
    counts = np.bincount(mask.reshape(-1), minlength=len(class_names))[: len(class_names)]
    return {name: float(c) / mask.size for name, c in zip(class_names, counts)}


def mask_response(mask: np.ndarray, as_json: bool, class_names: list[str], model_id: str) -> tuple[int, bytes, str]:
    """(status, body, media type): the mask as a one-channel PNG of class ids, or JSON of class fractions."""
    if as_json:
        body = {
            "model_id": model_id,
            "height": int(mask.shape[0]),
            "width": int(mask.shape[1]),
            "class_fractions": class_fractions(mask, class_names),
        }
        return 200, json.dumps(body).encode("utf-8"), "application/json"
    return 200, encode_png(mask), "image/png"


def error_body(error: RequestError) -> bytes:
    return json.dumps({"error": error.reason, "status": error.status}).encode("utf-8")


def json_body(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")
