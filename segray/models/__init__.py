"""Segmentation models: build by name, count parameters and FLOPs.

Every model maps ``(B, H, W, C)`` float images to ``(B, H, W, num_classes)``
float32 logits (no softmax), saves as ``.keras`` and loads with
``keras.saving.load_model(path, safe_mode=True)``.

    >>> from segray import models
    >>> models.available()
    ['deeplabv3plus', 'segnet', 'unet']
    >>> model = models.build("unet", num_classes=3, depth=3, width=16)
    >>> models.spec("unet").multiple(depth=3)  # what its capabilities say: sides divisible by 8
    8

A model of your own: its file and a ``register`` call (``segray.models.registry``).
What a trained run saves (``RUN/model/``) and how it loads is ``segray.runs``'s;
this package imports nothing of segray's outside itself.
"""

from segray.models.bottomup import boundary_target, instances_from_classes, instances_from_outputs, is_bottom_up
from segray.models.bottomup import probabilities as bottom_up_probabilities
from segray.models.instances import predict_instances
from segray.models.maskrcnn import instances_from_detections, paste_instances
from segray.models.layers import DivisibleSizeCheck, MaxPoolingWithArgmax2D, MaxUnpooling2D, ResizeLike
from segray.models.registry import DEEP_SUPERVISION_LEVELS, NO_XLA, ModelSpec, available, build, dtype_policy, register, spec
from segray.models.summary import count_params, describe, flops_per_image, model_flops

__all__ = [
    "DEEP_SUPERVISION_LEVELS",
    "NO_XLA",
    "DivisibleSizeCheck",
    "MaxPoolingWithArgmax2D",
    "MaxUnpooling2D",
    "ModelSpec",
    "ResizeLike",
    "available",
    "boundary_target",
    "bottom_up_probabilities",
    "build",
    "count_params",
    "describe",
    "dtype_policy",
    "flops_per_image",
    "instances_from_classes",
    "instances_from_detections",
    "instances_from_outputs",
    "is_bottom_up",
    "paste_instances",
    "predict_instances",
    "model_flops",
    "register",
    "spec",
]

