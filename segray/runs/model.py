"""A run's ``model/`` folder: what training leaves for inference, and how to read it.

``RUN/model/`` holds ``model.keras`` (the best model by val mIoU; loads with
``safe_mode=True`` once segray's layers are registered, which ``load_keras``
does), ``preprocessing.json`` (``Preprocessing``: normalisation, size,
classes) and ``best.json`` (its epoch and that epoch's metrics).

Training writes these files with ``write_model``; inference finds them with
``locate`` and reads them with ``read_preprocessing`` and ``load_keras``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from segray import storage
from segray.config import ConfigError, about, from_dict
from segray.data import IGNORE_INDEX, ClassInfo, parse_classes
from segray.runs.layout import BEST_FILE, MODEL_DIR, MODEL_FILE, PREPROCESSING_FILE, SEARCH_BEST_FILE


@dataclass(frozen=True)
class Preprocessing:
    """The contents of ``preprocessing.json``.

    Attributes:
        model: the registered model name.
        size: ``(H, W)`` the model was trained at, or None (images at their own size).
        fit: how images were fitted to ``size`` (``resize`` or ``pad``).
        mean, std: per-channel normalisation of the RGB pixel values.
        classes: the output classes, ids ``0 .. C-1``.
        ignore_index: truth value that is never counted.
        window: ``(H, W)`` of the patches the model was trained on, when it was
            trained on patches of larger images: predict slides a window of this
            size over each image (after fitting to ``size``, if any). None: the
            model saw whole images.
        priority: the overlap priority of the per-class layout it was trained
            on (``dataset.json``'s), so truth read from raw layers is painted
            the same way; None for other layouts.
    """

    model: str
    size: tuple[int, int] | None
    fit: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[ClassInfo, ...]
    ignore_index: int = IGNORE_INDEX
    window: tuple[int, int] | None = None
    priority: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        # ``priority`` only where there is one: files of other layouts read as before.
        extra = {"priority": list(self.priority)} if self.priority else {}
        return {
            "model": self.model,
            "size": list(self.size) if self.size else None,
            "fit": self.fit,
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": self.num_classes,
            "classes": class_list(self.classes),
            "ignore_index": self.ignore_index,
            "window": list(self.window) if self.window else None,
            **extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = PREPROCESSING_FILE) -> "Preprocessing":
        """Strict: unknown keys, wrong types and inconsistent values raise ConfigError naming ``source``."""
        raw = from_dict(_PreprocessingFile, data, prefix=f"{source}: ")
        if raw.size is not None and (len(raw.size) != 2 or min(raw.size) <= 0):
            raise ConfigError(f"{source}: size must be [H, W] or null, got {raw.size}")
        if raw.window is not None and (len(raw.window) != 2 or min(raw.window) <= 0):
            raise ConfigError(f"{source}: window must be [H, W] or null, got {raw.window}")
        if raw.fit not in ("resize", "pad"):
            raise ConfigError(f"{source}: fit must be 'resize' or 'pad', got {raw.fit!r}")
        if len(raw.mean) != 3 or len(raw.std) != 3 or min(raw.std) <= 0:
            raise ConfigError(f"{source}: mean and std must hold 3 values (std positive), got {raw.mean} and {raw.std}")
        classes = [c for c in parse_classes(raw.classes, f"{source}: classes") if c.id != raw.ignore_index]
        if len(classes) != raw.num_classes:
            raise ConfigError(f"{source} declares {raw.num_classes} classes, {len(classes)} are listed")
        return cls(
            model=raw.model,
            size=tuple(raw.size) if raw.size else None,
            fit=raw.fit,
            mean=tuple(raw.mean),
            std=tuple(raw.std),
            classes=tuple(classes),
            ignore_index=raw.ignore_index,
            window=tuple(raw.window) if raw.window else None,
            priority=tuple(raw.priority) if raw.priority else None,
        )


@dataclass(frozen=True)
class _PreprocessingFile:
    """The JSON fields of ``preprocessing.json``, for the strict type check."""

    model: str
    size: list[int] | None
    fit: str
    mean: list[float]
    std: list[float]
    num_classes: int
    classes: list[dict[str, Any]]
    ignore_index: int = IGNORE_INDEX
    window: list[int] | None = None
    priority: list[str] | None = None


def class_list(classes: list[ClassInfo] | tuple[ClassInfo, ...]) -> list[dict[str, Any]]:
    """The JSON form of a class list (``classes.json``, ``preprocessing.json``, summaries)."""
    return [{"id": c.id, "name": c.name, "color": list(c.color)} for c in classes]


def read_preprocessing(uri: str) -> Preprocessing:
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{uri}: not valid JSON ({e})") from None
    return Preprocessing.from_dict(data, source=uri)


def locate(model: str) -> tuple[str, str | None]:
    """(the .keras file, its preprocessing.json or None) for MODEL.

    MODEL is a training run (``STORAGE/RUN``), its ``model/`` folder, a
    ``.keras`` file (``preprocessing.json`` beside it is used when present),
    or a search (``segray tune``'s ``STORAGE/NAME``): its best trial's run.

    Raises:
        FileNotFoundError: nothing that looks like a model at ``model``.
    """
    if model.endswith(".keras"):
        if not storage.exists(model):
            raise about("model", FileNotFoundError(f"model {model}: no such file"))
        beside = storage.join(storage.parent(model), PREPROCESSING_FILE)
        return model, (beside if storage.exists(beside) else None)
    for folder in (storage.join(model, MODEL_DIR), model):
        keras_file = storage.join(folder, MODEL_FILE)
        if storage.exists(keras_file):
            pre = storage.join(folder, PREPROCESSING_FILE)
            return keras_file, (pre if storage.exists(pre) else None)
    best_run = _search_best_run(model)
    if best_run is not None:
        return locate(best_run)
    raise about(
        "model",
        FileNotFoundError(
            f"model {model}: expected a training run (with {MODEL_DIR}/{MODEL_FILE}), a {MODEL_DIR}/ folder, a search (with {SEARCH_BEST_FILE}) or a .keras file; "
            f"found neither {storage.join(model, MODEL_DIR, MODEL_FILE)} nor {storage.join(model, MODEL_FILE)}"
        ),
    )


def _search_best_run(model: str) -> str | None:
    """The run of the best trial when ``model`` is a search folder (its best.json names a ``run_uri``), else None."""
    uri = storage.join(model, SEARCH_BEST_FILE)
    if not storage.exists(uri):
        return None
    try:
        best = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise about("model", ValueError(f"model {model}: {uri} is not valid JSON ({e})")) from None
    run = best.get("run_uri") if isinstance(best, dict) else None
    return run if isinstance(run, str) and run and run.rstrip("/") != model.rstrip("/") else None


def load_keras(uri: str):
    """Loads a ``.keras`` file from local storage or an object store with ``safe_mode=True``."""
    import keras

    import segray.models  # noqa: F401  registers segray's layers, so safe_mode loads them

    if storage.is_local(uri):
        return keras.saving.load_model(uri, safe_mode=True, compile=False)
    with tempfile.TemporaryDirectory(prefix="segray-model-") as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        with open(path, "wb") as f:
            f.write(storage.read_bytes(uri))
        return keras.saving.load_model(path, safe_mode=True, compile=False)


def load_model(run_uri: str):
    """The trained ``keras.Model`` of a run (``STORAGE/RUN``), its ``model/`` folder or a ``.keras`` file.

    Registers segray's layers itself, so a notebook needs no other import.

    Raises:
        FileNotFoundError: nothing that looks like a model at ``run_uri``.
    """
    return load_keras(locate(run_uri)[0])


def write_model(run_uri: str, model, preprocessing: Preprocessing, best: dict[str, Any]) -> None:
    """Writes ``RUN/model/``: the model, its preprocessing and the metrics of its epoch."""
    folder = storage.join(run_uri, MODEL_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        model.save(path)
        with open(path, "rb") as f:
            storage.write_bytes(storage.join(folder, MODEL_FILE), f.read())
    storage.write_text(storage.join(folder, BEST_FILE), json.dumps(best, indent=2))
    storage.write_text(storage.join(folder, PREPROCESSING_FILE), json.dumps(preprocessing.to_dict(), indent=2))
