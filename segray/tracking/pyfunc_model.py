"""The MLflow pyfunc of an exported segray model: uint8 RGB images in, class ids out.

MLflow loads this file as "model code" (``mlflow.models.set_model``): it is
copied into the registered model and run where segray may not be installed,
so it imports only MLflow, NumPy and ONNX Runtime, never segray. It wraps
``model.onnx`` of ``segray export --format onnx`` (normalisation and padding
inside), whose output ``class_ids`` is returned.

Input: a uint8 array ``(N, H, W, 3)`` (a list of such images of one size
works too). Output: a uint8 array ``(N, H, W)`` of class ids; the classes
are named in the model's ``model_card.json`` artifact.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

ONNX_ARTIFACT = "model.onnx"
CARD_ARTIFACT = "model_card.json"


class SegrayOnnxModel(PythonModel):
    def load_context(self, context) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(context.artifacts[ONNX_ARTIFACT], providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict):  # a named input: {"images": array}
            model_input = model_input.get("images", next(iter(model_input.values()), None))
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got an array of shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        return self.session.run(["class_ids"], {self.input_name: images})[0].astype(np.uint8)


mlflow.models.set_model(SegrayOnnxModel())
