"""``model_card.json``: what an exported model is, how to feed it, and where it came from."""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import replace
from typing import Any

from segray import storage
from segray.export.formats import ONNX_OPSET, describe_outputs
from segray.runs import BEST_FILE, CONFIG_FILE, MODEL_DIR, RunState, class_list, run_state

CARD_FILE = "model_card.json"


def config_hash(config: dict[str, Any]) -> str:
    """Hash of a run's resolved config (keys sorted), without the dataset's description."""
    plain = {k: v for k, v in config.items() if k != "dataset"}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def run_folder(keras_uri: str) -> str | None:
    """``RUN`` for ``RUN/model/model.keras`` when RUN holds a run's config.json; None for a bare .keras file."""
    folder = keras_uri.rstrip("/").rsplit("/", 1)[0]
    parent, _, name = folder.rpartition("/")
    return parent if name == MODEL_DIR and parent and storage.exists(storage.join(parent, CONFIG_FILE)) else None


def run_records(keras_uri: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the run's config.json, the model's best.json) for ``RUN/model/model.keras``; None where absent (a bare .keras file)."""
    folder = keras_uri.rstrip("/").rsplit("/", 1)[0]
    best = storage.read_json_or_none(storage.join(folder, BEST_FILE))
    run = run_folder(keras_uri)
    config = storage.read_json_or_none(storage.join(run, CONFIG_FILE)) if run else None
    return config, best


def training_state(run: str, keras_uri: str) -> RunState | None:
    """How far the run behind ``keras_uri`` got (None for a bare .keras file).

    ``run`` is what the user named: for a search (``segray tune``'s folder)
    a trial with no end of its own is judged by the search's trials table,
    where ASHA or the search's time budget may have stopped it.
    """
    folder = run_folder(keras_uri)
    if folder is None:
        return None
    state = run_state(folder)
    if state is not None and state.stopped is None and folder.rstrip("/") != run.rstrip("/"):
        from segray.tuning import trial_end

        end = trial_end(run, folder)
        if end is not None:
            state = replace(state, stopped=end[0], detail=end[1])
    return state


def model_card(
    spec, fmt: str, multiple: int, config: dict[str, Any] | None, best: dict[str, Any] | None, parity: dict[str, Any],
    state: RunState | None = None,
) -> dict[str, Any]:
    """The card of one export.

    Args:
        spec: the resolved model (``segray.runs.ModelSpec``).
        fmt: the export format.
        multiple: what H and W are padded to (savedmodel, onnx) or must be divisible by (keras).
        config, best: the run's config.json and best.json (or None).
        parity: what the export checked against the original model.
        state: how far the run got (``training_state``), or None for a bare .keras file.
    """
    warnings = list(spec.warnings)
    if state is not None and not state.finished:
        warnings.append(f"unfinished run, exported with allow_unfinished: {state.describe()}; the model is its best epoch so far")
    if fmt == "keras":
        rule = f"H and W divisible by {multiple}"
    else:
        rule = f"any H and W; padded at the bottom and right to a multiple of {multiple} (zeros after normalisation) and cropped back"
    metrics = {k: v for k, v in (best or {}).items() if k.startswith("val_")} or None
    return {
        "format": fmt,
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        "converter": "tf2onnx" if fmt == "onnx" else None,
        "model": spec.name,
        "model_id": spec.model_id,
        "source": spec.uri,
        "classes": class_list(spec.classes),
        "num_classes": spec.num_classes,
        **describe_outputs(spec.num_classes),
        "input_size": {
            "rule": rule,
            "multiple": multiple,
            "trained_size": list(spec.size) if spec.size else None,
            "window": list(spec.window) if spec.window else None,
            "note": (
                "segray predict resizes images to the trained size first ('fit': "
                f"{spec.fit}); feed images at that size to get its results" if spec.size else "segray predict feeds images at their own size"
            ) + (
                f"; the model was trained on {spec.window[0]}x{spec.window[1]} patches: segray predict slides that window "
                "over the image (overlap 0.5, Gaussian weights) and blends the windows' logits" if spec.window else ""
            ),
        },
        "normalisation": {"mean": list(spec.mean), "std": list(spec.std), "formula": "(uint8 RGB - mean) / std, built into the model"},
        "ignore_index": spec.ignore_index,
        "training": {
            "data": (config or {}).get("data"),
            "config_hash": config_hash(config) if config else None,
            "epoch": (best or {}).get("epoch"),
            "finished": None if state is None else state.finished,
            "epochs_done": None if state is None else state.epochs_done,
            "epochs_planned": None if state is None else state.epochs,
            "stopped": None if state is None else state.stopped,
            "stopped_because": None if state is None else state.describe(),
        },
        "validation_metrics": metrics,
        "parity": parity,
        "warnings": warnings,
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
