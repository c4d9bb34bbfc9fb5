"""Running a model by either backend: the Keras model in TensorFlow, or its ONNX conversion in ONNX Runtime.

``segray predict --backend onnxruntime`` and ``segray serve`` convert the
run's model on the driver (``convert``) and ship the ONNX bytes to their
actors; each actor checks the bytes' hash against the one the driver pinned
before it opens a session.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from segray.export.formats import INPUT_NAME

BACKENDS = ("tensorflow", "onnxruntime")


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class Converted:
    """A model converted for ONNX Runtime: normalised float32 ``(N, H, W, 3)`` in, ``logits`` out.

    Attributes:
        data: the ONNX bytes.
        onnx_id: their hash (what actors check).
        multiple: what the conversion pads height and width to.
    """

    data: bytes
    onnx_id: str
    multiple: int


def convert(net, size: tuple[int, int] | None = None) -> Converted:
    """``net`` (a loaded segray model) as ONNX taking normalised images, padding them to its multiple.

    Args:
        size: ``(H, W)`` every input will have (predict's ``fit`` and ``tile``
            modes), which converts to a faster graph; None for any size.
    """
    from segray.export.formats import onnx_bytes
    from segray.export.portable import export_multiple, portable_core

    multiple = export_multiple(net)
    data = onnx_bytes(portable_core(net), None, None, multiple, size)
    return Converted(data, content_id(data), multiple)


def onnx_session(data: bytes, pinned_id: str | None = None, threads: int = 0):
    """An ONNX Runtime CPU session of ``data``; refuses bytes whose hash is not ``pinned_id``.

    Args:
        threads: intra-op threads (0: ONNX Runtime's default, one per core).
    """
    import onnxruntime as ort

    if pinned_id is not None and content_id(data) != pinned_id:
        raise RuntimeError(f"ONNX model {content_id(data)} is not the pinned {pinned_id}; refusing to mix two models")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Idle pool threads sleep instead of spinning: beside Ray's decode and write tasks (and on a
    # shared machine) spinning threads take the cores the other stages need (measured: up to 2x slower).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


class OnnxLogits:
    """``(N, H, W, 3)`` normalised float32 -> ``(N, H, W, C)`` float32 logits through ONNX Runtime."""

    def __init__(self, data: bytes, pinned_id: str | None = None, threads: int = 0):
        self.session = onnx_session(data, pinned_id, threads)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {INPUT_NAME: np.ascontiguousarray(images, np.float32)})[0]
