"""A predict or evaluate output's MLflow run: summary metrics, the per-class table, and the lineage tags.

The tags say where a table came from: the model's weights hash (the same
``segray.weights_hash`` tag the training run carries, so a search on it finds
the training run) and the source's fingerprint.
"""

from __future__ import annotations

import json
import os
from typing import Any

from segray import storage
from segray.tracking.client import Tracker, flat_params, now_ms, read_pending, tracking_uri
from segray.tracking.training import base_tags

# The files of an output sent as artifacts, when present.
OUTPUT_FILES = ("summary.json", "per_class.parquet", "confusion.parquet")
IDENTITY_FILE = "_run.json"  # segray.inference.output.RUN_FILE: what the results depend on


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's top-level numbers (mIoU, mean Dice, pixel accuracy, image counts, speed)."""
    import math

    return {k: float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_output(output_uri: str, kind: str, summary: dict[str, Any], per_class: Any, uri: str | None, experiment: str) -> int | None:
    """Sends a predict or evaluate output to a new MLflow run.

    Args:
        kind: ``predict`` or ``evaluate``.
        summary: ``OUT/summary.json``'s contents.
        per_class: the per-class DataFrame (sent as ``per_class.json`` too, readable in MLflow's UI).
        uri: the ``mlflow`` field; None: ``$MLFLOW_TRACKING_URI``, else no tracking.

    Returns:
        The records left waiting in ``OUT/mlflow/pending.jsonl``; None without tracking.
    """
    uri = tracking_uri(uri)
    if uri is None:
        return None
    identity: dict[str, Any] = {}
    if storage.exists(storage.join(output_uri, IDENTITY_FILE)):
        identity = json.loads(storage.read_text(storage.join(output_uri, IDENTITY_FILE)))
    tracker = Tracker(output_uri, uri, experiment)
    tags = base_tags({
        "kind": kind,
        "output": output_uri,
        "weights_hash": summary.get("model_id"),
        "model_uri": summary.get("model"),
        "source": summary.get("source") or summary.get("truth"),
        "source_fingerprint": identity.get("source_fingerprint"),
        "pred": summary.get("pred"),
    })
    tracker.start(f"{kind} {os.path.basename(output_uri.rstrip('/'))}", tags)
    config = dict(summary.get("config") or {})
    config.pop("resolved", None)
    tracker.send({"op": "params", "params": flat_params(config)})
    tracker.send({"op": "metrics", "step": 0, "timestamp": now_ms(), "metrics": summary_metrics(summary)})
    for name in OUTPUT_FILES:
        if storage.exists(storage.join(output_uri, name)):
            tracker.send({"op": "artifact", "file": name, "path": None})
    if per_class is not None and len(per_class):
        table = json.loads(per_class.to_json(orient="split", index=False))
        tracker.send({"op": "json", "name": "per_class.json", "data": table})
    tracker.send({"op": "end", "status": "FINISHED"})
    return len(read_pending(output_uri))
