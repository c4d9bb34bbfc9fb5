"""Segmentation models: build by name, count parameters and FLOPs.

Every model maps ``(B, H, W, C)`` float images to ``(B, H, W, num_classes)``
float32 logits (no softmax), saves as ``.keras`` and loads with
``keras.saving.load_model(path, safe_mode=True)``.

    >>> from segray import models
    >>> models.available()
    ['deeplabv3plus', 'segnet', 'unet']
    >>> model = models.build("unet", num_classes=3, depth=3, width=16)
"""

from segray.models.registry import NO_XLA, available, build
from segray.models.summary import count_params, describe, flops_per_image

__all__ = ["NO_XLA", "available", "build", "count_params", "describe", "flops_per_image"]
