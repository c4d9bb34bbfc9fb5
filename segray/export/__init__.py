"""Portable models: a run's model as a SavedModel, ONNX or plain Keras file that loads without segray.

    segray export RUN --format onnx --output exported/

Every format takes uint8 RGB ``(N, H, W, 3)`` with the run's normalisation
built in and returns ``class_ids``, ``probabilities`` and ``logits``;
``model_card.json`` beside it says how it was made (see ``card``). The same
conversion feeds ``segray predict --backend onnxruntime`` and ``segray serve``
(``session``).
"""

from segray.export.bundle import ExportResult, export
from segray.export.card import model_card, run_records
from segray.export.formats import FORMATS, ONNX_OPSET
from segray.export.session import OnnxLogits, convert

__all__ = [
    "FORMATS",
    "ONNX_OPSET",
    "ExportResult",
    "OnnxLogits",
    "convert",
    "export",
    "model_card",
    "run_records",
]
