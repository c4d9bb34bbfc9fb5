"""Resolving MODEL or RUN to a model: which model predicts, and how its inputs are prepared.

Predict, export and serve all start here, so it sits below the three of them
(export used to reach into inference for it, and inference into export for
the ONNX conversion). It reads a run's ``model/`` folder (``segray.runs.model``).

MODEL is a training run (``STORAGE/RUN`` with ``model/model.keras`` and
``model/preprocessing.json``), its ``model/`` folder, a ``.keras`` file
(``preprocessing.json`` beside it is used when present), or a search of
``segray tune`` (its best trial's run, named in ``best.json``). The driver loads the
model once to check it against the flags and to hash its weights; each
predictor actor loads it again from the same URI.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from segray.data import IGNORE_INDEX, ClassInfo, default_color
from segray.runs.layout import MODEL_DIR, MODEL_FILE, PREPROCESSING_FILE
from segray.runs.model import class_list, load_keras, locate, read_preprocessing


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: where it is, what it outputs, how to feed it.

    Attributes:
        uri: the ``.keras`` file.
        preprocessing_uri: the ``preprocessing.json`` used, or None.
        model_id: hash of the weights (shapes, dtypes and values, in order).
        name: the model's name (``unet`` ...).
        classes: the ``num_classes`` output classes, ids ``0 .. C-1``.
        size: ``(H, W)`` the model was trained at, or None.
        fit: how images were fitted to ``size`` in training.
        mean, std: per-channel normalisation of the RGB pixel values.
        ignore_index: truth value that is never counted.
        multiple: height and width the model needs divisible by.
        static_size: ``(H, W)`` when the model's input shape fixes it.
        warnings: what was assumed, for the summary.
        window: ``(H, W)`` of the patches the model was trained on
            (``preprocessing.json``'s ``window``): predict slides it over each
            image unless told otherwise; None: the model saw whole images.
        priority: the overlap priority of the per-class data it was trained
            on, or None (another layout, or a model saved before it was recorded).
    """

    uri: str
    preprocessing_uri: str | None
    model_id: str
    name: str
    classes: tuple[ClassInfo, ...]
    size: tuple[int, int] | None
    fit: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    ignore_index: int
    multiple: int
    static_size: tuple[int, int] | None
    warnings: tuple[str, ...] = ()
    window: tuple[int, int] | None = None
    priority: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, Any]:
        """The JSON-ready description written into ``_run.json`` and ``summary.json``."""
        extra = {"priority": list(self.priority)} if self.priority else {}
        return {
            "uri": self.uri,
            "preprocessing": self.preprocessing_uri,
            "model_id": self.model_id,
            "name": self.name,
            "num_classes": self.num_classes,
            "classes": class_list(self.classes),
            "size": list(self.size) if self.size else None,
            "fit": self.fit,
            "mean": list(self.mean),
            "std": list(self.std),
            "ignore_index": self.ignore_index,
            "multiple": self.multiple,
            "window": list(self.window) if self.window else None,
            **extra,
        }


def share_gpus() -> None:
    """Lets this process take GPU memory as it needs it, not all of it up front.

    The driver (which loads the model to check and hash it) and each actor
    (``--gpus-per-worker 0.5`` puts two on one GPU) share the devices. Too
    late once TensorFlow has touched a GPU; then nothing changes.
    """
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass


def weights_id(model) -> str:
    """A hash of the weights: the same weights give the same id whatever the file's timestamps."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        w = np.ascontiguousarray(w)
        digest.update(f"{w.dtype.str}{w.shape}".encode())
        digest.update(w.tobytes())
    return digest.hexdigest()[:16]


def required_multiple(model) -> int:
    """The ``multiple`` of the model's size-check layers (1 when it has none)."""
    from segray.models import DivisibleSizeCheck

    multiple = 1
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, DivisibleSizeCheck):
            multiple = int(np.lcm(multiple, layer.multiple))
    return multiple


def resolve_model(model: str) -> ModelSpec:
    """Loads MODEL on the driver and reads or assumes its preprocessing.

    Raises:
        FileNotFoundError: no model at ``model``.
        ValueError: preprocessing.json does not match the model, or the model
            does not take RGB images.
    """
    import tensorflow as tf

    registered = None
    if model.startswith("models:/"):  # MLflow's model registry (segray.tracking.registry)
        from segray.tracking import resolve_registered

        registered = resolve_registered(model, model_dir=MODEL_DIR, model_file=MODEL_FILE)
        model = registered.model
    keras_uri, pre_uri = locate(model)
    share_gpus()
    with tf.device("/CPU:0"):  # the driver only reads shapes and weights
        net = load_keras(keras_uri)
    input_shape = tuple(net.input_shape)
    output_shape = tuple(net.output_shape)
    if len(input_shape) != 4 or input_shape[-1] != 3:
        raise ValueError(f"{keras_uri}: model takes inputs {input_shape}; predict feeds RGB images (B, H, W, 3)")
    # A detection model (Mask R-CNN) outputs several tensors: its classes are preprocessing.json's.
    detection = bool(output_shape) and isinstance(output_shape[0], (tuple, list))
    channels = None if detection else int(output_shape[-1])
    static = (int(input_shape[1]), int(input_shape[2])) if input_shape[1] and input_shape[2] else None
    notes: list[str] = []
    if pre_uri is not None:
        pre = read_preprocessing(pre_uri)
        if channels is not None and pre.num_classes != channels:
            raise ValueError(f"{pre_uri} declares {pre.num_classes} classes, the model {keras_uri} outputs {channels} channels")
        classes, size = list(pre.classes), pre.size
        fit_mode, mean, std, ignore = pre.fit, pre.mean, pre.std, pre.ignore_index
        name, window, priority = pre.model, pre.window, pre.priority
    elif channels is None:
        raise ValueError(f"{keras_uri}: a model of several outputs ({net.name}) needs its {PREPROCESSING_FILE} beside it (its classes and normalisation)")
    else:
        classes = [ClassInfo(k, f"class_{k}", tuple(default_color(k))) for k in range(channels)]
        size, fit_mode, mean, std, ignore = None, "resize", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), IGNORE_INDEX
        name, window, priority = net.name, None, None
        note = (
            f"no {PREPROCESSING_FILE} beside {keras_uri}: assuming no normalisation (mean 0, std 1), "
            f"images at their own size, and classes class_0..class_{channels - 1} from the model's {channels} output channels"
        )
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=3)
    multiple = required_multiple(net)
    if window:
        # The model takes windows: a fixed input shape is the window's, not a size to fit images to.
        if static and tuple(window) != static:
            raise ValueError(f"{pre_uri}: window {list(window)} but the model {keras_uri} only takes {static[0]}x{static[1]} inputs")
        if window[0] % multiple or window[1] % multiple:
            raise ValueError(f"{pre_uri}: window {list(window)}: the model {keras_uri} needs sides divisible by {multiple}")
        static_fit = None
    else:
        static_fit = static
    if static and size and tuple(size) != static and not window:
        raise ValueError(f"{pre_uri}: size {list(size)} but the model {keras_uri} only takes {static[0]}x{static[1]} inputs")
    model_id = weights_id(net)
    if registered is not None and model_id != registered.weights_hash:
        raise ValueError(f"model {registered.reference}: {keras_uri} has weights {model_id}, "
                         f"the registered version {registered.version} was {registered.weights_hash}; the run changed since it was registered")
    return ModelSpec(
        uri=keras_uri,
        preprocessing_uri=pre_uri,
        model_id=model_id,
        name=name,
        classes=tuple(classes),
        size=size or static_fit,
        fit=fit_mode,
        mean=mean,
        std=std,
        ignore_index=ignore,
        multiple=multiple,
        static_size=static,
        warnings=tuple(notes),
        window=tuple(window) if window else None,
        priority=tuple(priority) if priority else None,
    )
