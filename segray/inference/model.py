"""Which model predicts, and how its inputs are prepared.

MODEL is a training run (``STORAGE/RUN`` with ``model/model.keras`` and
``model/preprocessing.json``), its ``model/`` folder, or a ``.keras`` file
(``preprocessing.json`` beside it is used when present). The driver loads the
model once to check it against the flags and to hash its weights; each
predictor actor loads it again from the same URI.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from segray import storage
from segray.config import ConfigError, from_dict
from segray.data.info import IGNORE_INDEX, ClassInfo, default_color, parse_classes
from segray.train.loop import PREPROCESSING_FILE

MODEL_FILE = "model.keras"


@dataclass(frozen=True)
class Preprocessing:
    """The contents of ``preprocessing.json`` (written by training, see ``preprocessing_of``)."""

    model: str
    size: list[int] | None
    fit: str
    mean: list[float]
    std: list[float]
    num_classes: int
    classes: list[dict[str, Any]]
    ignore_index: int = IGNORE_INDEX


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, Any]:
        """The JSON-ready description written into ``_run.json`` and ``summary.json``."""
        return {
            "uri": self.uri,
            "preprocessing": self.preprocessing_uri,
            "model_id": self.model_id,
            "name": self.name,
            "num_classes": self.num_classes,
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in self.classes],
            "size": list(self.size) if self.size else None,
            "fit": self.fit,
            "mean": list(self.mean),
            "std": list(self.std),
            "ignore_index": self.ignore_index,
            "multiple": self.multiple,
        }


def locate(model: str) -> tuple[str, str | None]:
    """(the .keras file, its preprocessing.json or None) for MODEL.

    Raises:
        FileNotFoundError: nothing that looks like a model at ``model``.
    """
    if model.endswith(".keras"):
        if not storage.exists(model):
            raise FileNotFoundError(f"--model {model}: no such file")
        beside = storage.join(posixpath.dirname(model.rstrip("/")) if storage.is_s3(model) else os.path.dirname(model), PREPROCESSING_FILE)
        return model, (beside if storage.exists(beside) else None)
    for folder in (storage.join(model, "model"), model):
        keras_file = storage.join(folder, MODEL_FILE)
        if storage.exists(keras_file):
            pre = storage.join(folder, PREPROCESSING_FILE)
            return keras_file, (pre if storage.exists(pre) else None)
    raise FileNotFoundError(
        f"--model {model}: expected a training run (with model/{MODEL_FILE}), a model/ folder or a .keras file; "
        f"found neither {storage.join(model, 'model', MODEL_FILE)} nor {storage.join(model, MODEL_FILE)}"
    )


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


def load_keras(uri: str):
    """Loads a ``.keras`` file from local storage or S3 with ``safe_mode=True``."""
    import keras

    import segray.models  # noqa: F401 - registers the custom layers before loading

    if not storage.is_s3(uri):
        return keras.saving.load_model(uri, safe_mode=True, compile=False)
    with tempfile.TemporaryDirectory(prefix="segray-model-") as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        with open(path, "wb") as f:
            f.write(storage.read_bytes(uri))
        return keras.saving.load_model(path, safe_mode=True, compile=False)


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
    from segray.models.layers import DivisibleSizeCheck

    multiple = 1
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, DivisibleSizeCheck):
            multiple = int(np.lcm(multiple, layer.multiple))
    return multiple


def _read_preprocessing(uri: str) -> Preprocessing:
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{uri}: not valid JSON ({e})") from None
    pre = from_dict(Preprocessing, data, prefix=f"{uri}: ")
    if pre.size is not None and (len(pre.size) != 2 or min(pre.size) <= 0):
        raise ConfigError(f"{uri}: size must be [H, W] or null, got {pre.size}")
    if pre.fit not in ("resize", "pad"):
        raise ConfigError(f"{uri}: fit must be 'resize' or 'pad', got {pre.fit!r}")
    if len(pre.mean) != 3 or len(pre.std) != 3 or min(pre.std) <= 0:
        raise ConfigError(f"{uri}: mean and std must hold 3 values (std positive), got {pre.mean} and {pre.std}")
    return pre


def resolve_model(model: str) -> ModelSpec:
    """Loads MODEL on the driver and reads or assumes its preprocessing.

    Raises:
        FileNotFoundError: no model at ``model``.
        ValueError: preprocessing.json does not match the model, or the model
            does not take RGB images.
    """
    import tensorflow as tf

    keras_uri, pre_uri = locate(model)
    share_gpus()
    with tf.device("/CPU:0"):  # the driver only reads shapes and weights
        net = load_keras(keras_uri)
    input_shape = tuple(net.input_shape)
    output_shape = tuple(net.output_shape)
    if len(input_shape) != 4 or input_shape[-1] != 3:
        raise ValueError(f"{keras_uri}: model takes inputs {input_shape}; predict feeds RGB images (B, H, W, 3)")
    channels = int(output_shape[-1])
    static = (int(input_shape[1]), int(input_shape[2])) if input_shape[1] and input_shape[2] else None
    notes: list[str] = []
    if pre_uri is not None:
        pre = _read_preprocessing(pre_uri)
        classes = [c for c in parse_classes(pre.classes, f"{pre_uri}: classes") if c.id != pre.ignore_index]
        if len(classes) != pre.num_classes or pre.num_classes != channels:
            raise ValueError(
                f"{pre_uri} declares {pre.num_classes} classes ({len(classes)} listed), "
                f"the model {keras_uri} outputs {channels} channels"
            )
        size = tuple(pre.size) if pre.size else None
        fit_mode, mean, std, ignore = pre.fit, tuple(pre.mean), tuple(pre.std), pre.ignore_index
        name = pre.model
    else:
        classes = [ClassInfo(k, f"class_{k}", tuple(default_color(k))) for k in range(channels)]
        size, fit_mode, mean, std, ignore = None, "resize", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), IGNORE_INDEX
        name = net.name
        note = (
            f"no {PREPROCESSING_FILE} beside {keras_uri}: assuming no normalisation (mean 0, std 1), "
            f"images at their own size, and classes class_0..class_{channels - 1} from the model's {channels} output channels"
        )
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=3)
    if static and size and tuple(size) != static:
        raise ValueError(f"{pre_uri}: size {list(size)} but the model {keras_uri} only takes {static[0]}x{static[1]} inputs")
    return ModelSpec(
        uri=keras_uri,
        preprocessing_uri=pre_uri,
        model_id=weights_id(net),
        name=name,
        classes=tuple(classes),
        size=size or static,
        fit=fit_mode,
        mean=mean,
        std=std,
        ignore_index=ignore,
        multiple=required_multiple(net),
        static_size=static,
        warnings=tuple(notes),
    )
