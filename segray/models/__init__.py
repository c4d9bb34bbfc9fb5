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
"""

from typing import Any

from segray.models.bottomup import boundary_target, instances_from_classes
from segray.models.maskrcnn import paste_instances, predict_instances
from segray.models.layers import DivisibleSizeCheck, MaxPoolingWithArgmax2D, MaxUnpooling2D, ResizeLike
from segray.models.registry import DEEP_SUPERVISION_LEVELS, NO_XLA, ModelSpec, available, build, dtype_policy, register, spec
from segray.models.summary import count_params, describe, flops_per_image, model_flops

# The saved-run contract (segray.models.saved) reads dataset info, which
# imports Ray Data: its names load on first use, so building a model does not.
_SAVED_NAMES = (
    "BEST_FILE",
    "MODEL_DIR",
    "MODEL_FILE",
    "PREPROCESSING_FILE",
    "SEARCH_BEST_FILE",
    "Preprocessing",
    "class_list",
    "load_keras",
    "load_model",
    "locate",
    "read_preprocessing",
    "write_model",
)

__all__ = [
    "BEST_FILE",
    "DEEP_SUPERVISION_LEVELS",
    "MODEL_DIR",
    "MODEL_FILE",
    "NO_XLA",
    "PREPROCESSING_FILE",
    "SEARCH_BEST_FILE",
    "DivisibleSizeCheck",
    "MaxPoolingWithArgmax2D",
    "MaxUnpooling2D",
    "ModelSpec",
    "Preprocessing",
    "ResizeLike",
    "available",
    "boundary_target",
    "build",
    "class_list",
    "count_params",
    "describe",
    "dtype_policy",
    "flops_per_image",
    "instances_from_classes",
    "paste_instances",
    "predict_instances",
    "load_keras",
    "load_model",
    "locate",
    "model_flops",
    "read_preprocessing",
    "register",
    "spec",
    "write_model",
]


def __getattr__(name: str) -> Any:
    # PEP 562: segray.models.saved loads on first use of one of its names.
    if name in _SAVED_NAMES:
        from segray.models import saved

        return getattr(saved, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
