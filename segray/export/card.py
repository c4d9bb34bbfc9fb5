"""``model_card.json``: what an exported model is, how to feed it, and where it came from."""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any

from segray import storage
from segray.export.formats import ONNX_OPSET, describe_outputs
from segray.models.saved import BEST_FILE, MODEL_DIR, class_list
from segray.training.artifacts import CONFIG_FILE

CARD_FILE = "model_card.json"


def config_hash(config: dict[str, Any]) -> str:
    """Hash of a run's resolved config (keys sorted), without the dataset's description."""
    plain = {k: v for k, v in config.items() if k != "dataset"}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _json_or_none(uri: str) -> dict[str, Any] | None:
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not valid JSON ({e})") from None


def run_records(keras_uri: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the run's config.json, the model's best.json) for ``RUN/model/model.keras``; None where absent (a bare .keras file)."""
    folder = keras_uri.rstrip("/").rsplit("/", 1)[0]
    best = _json_or_none(storage.join(folder, BEST_FILE))
    parent, _, name = folder.rpartition("/")
    config = _json_or_none(storage.join(parent, CONFIG_FILE)) if name == MODEL_DIR and parent else None
    return config, best


def model_card(spec, fmt: str, multiple: int, config: dict[str, Any] | None, best: dict[str, Any] | None, parity: dict[str, Any]) -> dict[str, Any]:
    """The card of one export.

    Args:
        spec: the resolved model (``segray.inference.model.ModelSpec``).
        fmt: the export format.
        multiple: what H and W are padded to (savedmodel, onnx) or must be divisible by (keras).
        config, best: the run's config.json and best.json (or None).
        parity: what the export checked against the original model.
    """
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
        },
        "validation_metrics": metrics,
        "parity": parity,
        "warnings": list(spec.warnings),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
