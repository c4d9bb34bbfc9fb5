"""``segray export``: a run's model as a SavedModel, ONNX or plain Keras file, with its model card.

The model is rebuilt from standard layers (``portable``), wrapped with the
run's normalisation and, for SavedModel and ONNX, padding to its multiple
(``formats``), written to a temporary folder, checked against the original on
a probe batch, and only then copied to OUTPUT with ``model_card.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segray import storage
from segray.config import ExportConfig, about
from segray.export.card import CARD_FILE, model_card, run_folder, run_records, training_state
from segray.export.formats import write_keras, write_onnx, write_savedmodel
from segray.runs import RunState, run_state

# The exported model's logits may differ from the original's by float rounding only.
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote.

    Attributes:
        output: the folder.
        format: ``savedmodel``, ``onnx`` or ``keras``.
        files: every file written, relative to ``output``.
        card: the model card (as written to ``model_card.json``).
        registered: with ``register``: ``{"name", "version", "run_id", "model_uri"}`` of the MLflow registry.
    """

    output: str
    format: str
    files: list[str] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)
    registered: dict[str, Any] | None = None

    def describe(self) -> str:
        parity = self.card.get("parity", {})
        if self.card.get("task") == "instance":
            return (
                f"exported {self.card.get('model')} ({self.card.get('model_id')}) as {self.format} to {self.output}: {', '.join(self.files)}\n"
                f"input: uint8 RGB (N, H, W, 3), {self.card['input_size']['rule']}; outputs {', '.join(self.card['outputs'])} after NMS\n"
                f"max |box difference| vs the original on a probe batch {parity.get('max_abs_box_diff', float('nan')):.2e} px "
                f"({sum(parity.get('detections', []))} objects)"
            )
        return (
            f"exported {self.card.get('model')} ({self.card.get('model_id')}) as {self.format} to {self.output}: "
            f"{', '.join(self.files)}\ninput: uint8 RGB (N, H, W, 3), {self.card['input_size']['rule']}\n"
            f"max |logit difference| vs the original on a probe batch {parity.get('max_abs_logit_diff', float('nan')):.2e}"
        ) + (f"\nregistered in MLflow as {self.registered['model_uri']} (run {self.registered['run_id']})" if self.registered else "")


def _reference_logits(net, images: np.ndarray, mean, std) -> np.ndarray:
    x = (images.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.asarray(net.predict_on_batch(x), np.float32)


def _exported_logits(fmt: str, path: str, images: np.ndarray) -> np.ndarray:
    """Runs the written files the way a user would (a fresh load), not the objects in memory."""
    if fmt == "onnx":
        from segray.export.session import onnx_session

        with open(path, "rb") as f:
            return onnx_session(f.read()).run(["logits"], {"images": images})[0]
    if fmt == "savedmodel":
        import tensorflow as tf

        return tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))["logits"].numpy()
    import keras

    return np.asarray(keras.models.load_model(path, safe_mode=True).predict_on_batch(images)["logits"])


def _probe(multiple: int, size: tuple[int, int] | None) -> np.ndarray:
    """Two random uint8 images at the trained size (or 2x the multiple), rounded up to the multiple."""
    h, w = size or (2 * multiple, 2 * multiple)
    h, w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    return np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8)


def _check_output(output: str) -> None:
    if storage.is_dir(output) and storage.list_files(output):
        raise about("output", FileExistsError(f"output {output} holds files; export writes to a new or empty folder"))
    if storage.exists(output) and not storage.is_dir(output):
        raise about("output", FileExistsError(f"output {output} is a file; export writes to a new or empty folder"))


def _refuse_unfinished(cfg: ExportConfig, state: RunState | None) -> None:
    if state is not None and not state.finished and not cfg.allow_unfinished:
        raise about("run", ValueError(
            f"run {cfg.run} is unfinished: {state.describe()}; its model, if any, is the best epoch so far. "
            "Wait for the run to end (or `segray train --resume` it), or set `allow_unfinished` to export it anyway (the card says so)"
        ))


def export(cfg: ExportConfig) -> ExportResult:
    """Writes ``cfg.run``'s model in ``cfg.format`` to ``cfg.output`` with ``model_card.json``.

    Raises:
        FileNotFoundError: no model at ``cfg.run``.
        FileExistsError: ``cfg.output`` holds files.
        ValueError: the run is unfinished (still training, killed or failed
            before its last epoch) and ``cfg.allow_unfinished`` is off; the
            model has a layer with no portable equivalent; or the export's
            logits differ from the original's beyond ``PARITY_TOLERANCE``.
    """
    import tensorflow as tf

    from segray.export.portable import export_multiple, portable_core, portable_model
    from segray.runs import load_keras, resolve_model

    _check_output(cfg.output)
    # RUN itself first: a run that failed or was killed before its first epoch has no model yet.
    _refuse_unfinished(cfg, None if cfg.run.endswith(".keras") or cfg.run.startswith("models:/") else run_state(cfg.run))
    spec = resolve_model(cfg.run)
    # models:/NAME/VERSION resolved to the run it was registered from: that run's state.
    state = training_state(run_folder(spec.uri) or cfg.run if cfg.run.startswith("models:/") else cfg.run, spec.uri)
    _refuse_unfinished(cfg, state)
    if _task(spec.name) == "instance":
        return _export_instances(cfg, spec, state)
    with tf.device("/CPU:0"):
        net = load_keras(spec.uri)
        multiple = export_multiple(net)
        core = portable_core(net)
        images = _probe(multiple, spec.static_size or spec.size)
        expected = _reference_logits(net, images, spec.mean, spec.std)
    config, best = run_records(spec.uri)
    with tempfile.TemporaryDirectory(prefix="segray-export-") as tmp:
        if cfg.format == "keras":
            path = write_keras(portable_model(core, spec.mean, spec.std), tmp)
        elif cfg.format == "savedmodel":
            path = write_savedmodel(core, spec.mean, spec.std, multiple, tmp)
        else:
            path = write_onnx(core, spec.mean, spec.std, multiple, tmp)
        got = _exported_logits(cfg.format, path, images)
        diff = float(np.abs(got - expected).max())
        if not diff <= PARITY_TOLERANCE:
            raise ValueError(
                f"run {cfg.run}: the {cfg.format} export's logits differ from the original's by {diff:.3g} "
                f"(tolerance {PARITY_TOLERANCE:g}) on a probe batch {images.shape}; nothing written to {cfg.output}"
            )
        parity = {
            "probe_shape": list(images.shape),
            "max_abs_logit_diff": diff,
            "mask_agreement": float((got.argmax(-1) == expected.argmax(-1)).mean()),
        }
        card = model_card(spec, cfg.format, multiple, config, best, parity, state)
        files = _copy_out(tmp, card, cfg.output)
    return ExportResult(cfg.output, cfg.format, files, card)


def _copy_out(tmp: str, card: dict[str, Any], output: str) -> list[str]:
    """Writes the card into ``tmp`` and copies every file of ``tmp`` to ``output``; returns their relative names."""
    with open(os.path.join(tmp, CARD_FILE), "w") as f:
        json.dump(card, f, indent=2)
    files = []
    for folder, _, names in os.walk(tmp):
        for name in sorted(names):
            local = os.path.join(folder, name)
            relative = os.path.relpath(local, tmp).replace(os.sep, "/")
            with open(local, "rb") as f:
                storage.write_bytes(storage.join(output, relative), f.read())
            files.append(relative)
    return sorted(files)


def _task(name: str) -> str:
    """The registry task of a model name (``semantic`` for a name the registry does not know)."""
    from segray import models

    try:
        return models.spec(name).task
    except ValueError:
        return "semantic"


def _export_instances(cfg: ExportConfig, spec, state: RunState | None) -> ExportResult:
    """``export`` of an instance model: a SavedModel of its detections after NMS (``segray.export.instances``)."""
    import tensorflow as tf

    from segray.export.instances import (
        KERAS_REFUSAL,
        ONNX_REFUSAL,
        PARITY_TOLERANCE as BOX_TOLERANCE,
        describe_instance_outputs,
        detection_parity,
        write_instance_savedmodel,
    )
    from segray.runs import load_keras

    if cfg.format != "savedmodel":
        raise about("format", ValueError(f"format {cfg.format}: {spec.uri} is an instance model ({spec.name}); "
                                         + (ONNX_REFUSAL if cfg.format == "onnx" else KERAS_REFUSAL)))
    multiple = spec.multiple
    config, best = run_records(spec.uri)
    with tf.device("/CPU:0"), tempfile.TemporaryDirectory(prefix="segray-export-") as tmp:
        net = load_keras(spec.uri)
        images = _probe(multiple, spec.static_size or spec.size)
        path = write_instance_savedmodel(net, spec.mean, spec.std, multiple, tmp)
        parity = detection_parity(net, path, images, spec.mean, spec.std)
        worst = max(parity["max_abs_box_diff"], parity["max_abs_score_diff"], parity["max_abs_mask_diff"])
        if not worst <= BOX_TOLERANCE or not parity["classes_equal"]:
            raise ValueError(f"run {cfg.run}: the savedmodel export's detections differ from the model's ({parity}); nothing written to {cfg.output}")
        shapes = net.output_shape if isinstance(net.output_shape, dict) else {}
        masks = shapes.get("masks") or (None, None, None)
        card = model_card(spec, cfg.format, multiple, config, best, parity, state)
        card.update(describe_instance_outputs(spec.num_classes, masks[1], masks[2]))
        card["task"] = "instance"
        card["ignore_index"] = None
        card["input_size"]["rule"] = (f"any H and W; padded at the bottom and right to a multiple of {multiple} "
                                      "(zeros after normalisation); boxes are in pixels of the image")
        files = _copy_out(tmp, card, cfg.output)
    return ExportResult(cfg.output, cfg.format, files, card)
