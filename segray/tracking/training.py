"""A training run's MLflow run: started (or continued) by the driver, epochs sent by rank 0, closed by the driver.

- ``start_train_run`` (driver, before Ray Train starts): the run with the
  resolved config and plan as params, the plan's reasons as ``plan.json``,
  and tags (dataset URI, model, segray version, git commit when known). A
  resumed run continues the MLflow run named in ``RUN/mlflow/run.json``.
- ``EpochLogger`` (rank 0, after each epoch): the epoch's metrics, step = epoch.
- ``finish_train_run`` (driver, after Ray Train): the run folder's files as
  artifacts, the dataset's fingerprint, the weights' hash, and the end status.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
from typing import Any

from segray import storage
from segray.tracking.client import Tracker, flat_params, now_ms, read_pending, read_run_record, send_pending, tracking_uri

TAG = "segray."
FINGERPRINT_FILE = "dataset_fingerprint.json"
# History columns that are no metric: the step itself and a wall-clock time.
NOT_METRICS = ("epoch", "ended_at")


def segray_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("segray")
    except PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The commit of the segray checkout that runs, when it is a git checkout (an installed wheel is not)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def base_tags(extra: dict[str, Any]) -> dict[str, str]:
    tags = {f"{TAG}version": segray_version(), **{f"{TAG}{k}": str(v) for k, v in extra.items() if v is not None}}
    commit = git_commit()
    if commit:
        tags[f"{TAG}git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def start_train_run(run_uri: str, config: dict[str, Any], uri: str | None, experiment: str, resume: bool,
                    extra_tags: dict[str, str] | None = None, *, plan_name: str) -> dict[str, Any] | None:
    """Starts the MLflow run of the training run at ``run_uri`` (or continues it on resume).

    Args:
        config: the resolved config (``TrainConfig.to_dict``).
        uri: the ``mlflow`` field; None: ``$MLFLOW_TRACKING_URI``, else no tracking.
        extra_tags: more tags for a new MLflow run (``mlflow.parentRunId`` of a search's trial).
        plan_name: the artifact name of the plan, the run folder's (``segray.runs.PLAN_FILE``).

    Returns:
        The record the workers log with (``{"uri", "experiment", "run_id"}``), or None without tracking.
    """
    uri = tracking_uri(uri)
    if uri is None:
        return None
    before = read_run_record(run_uri) if resume else None
    if before and before.get("tracking_uri") == uri:
        tracker = Tracker(run_uri, uri, before.get("experiment", experiment), before.get("run_id"))
        if tracker.down:
            send_pending(run_uri, warn=True)  # what an earlier session could not send goes first
            tracker = Tracker(run_uri, uri, tracker.experiment, (read_run_record(run_uri) or {}).get("run_id"))
        tracker.send({"op": "status", "status": "RUNNING"})
        tracker.send({"op": "tags", "tags": {f"{TAG}resumed_at_ms": now_ms(), f"{TAG}epochs": config.get("epochs")}})
    else:
        tracker = Tracker(run_uri, uri, experiment)
        tags = {**base_tags({"run_uri": run_uri, "dataset": config.get("data"), "model": config.get("model")}), **(extra_tags or {})}
        tracker.start(config.get("name") or os.path.basename(run_uri), tags)
        params = {k: v for k, v in config.items() if k != "plan"}
        plan = config.get("plan") or {}
        if plan:
            params["plan.source"] = plan.get("source")
            params["plan.applied"] = sorted(plan.get("applied") or [])
            params["plan.overridden"] = sorted(plan.get("overridden") or [])
        tracker.send({"op": "params", "params": flat_params(params)})
        if plan:
            tracker.send({"op": "json", "name": plan_name, "data": plan})
    return {"uri": uri, "experiment": tracker.experiment, "run_id": tracker.run_id}


def epoch_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The epoch's numbers MLflow takes: finite, not the epoch or a clock time."""
    out = {}
    for key, value in metrics.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class EpochLogger:
    """Rank 0's sender of each epoch's metrics (``train_loss``, ``val_loss``, ``val_miou``, ``val_iou_<class>`` ...)."""

    def __init__(self, run_uri: str, record: dict[str, Any]):
        self.tracker = Tracker(run_uri, record["uri"], record["experiment"], record.get("run_id"))

    def log(self, metrics: dict[str, Any]) -> None:
        stamp = int(float(metrics.get("ended_at") or 0) * 1000) or now_ms()
        self.tracker.send({"op": "metrics", "step": int(metrics["epoch"]), "timestamp": stamp, "metrics": epoch_metrics(metrics)})


def dataset_fingerprint(data_uri: str, info: dict[str, Any]) -> dict[str, Any]:
    """The dataset a run trained on: its URI, the SHA-256 of its ``dataset.json``, classes and split counts."""
    text = storage.read_bytes(storage.join(data_uri, "dataset.json"))
    return {
        "data": data_uri,
        "dataset_json_sha256": hashlib.sha256(text).hexdigest(),
        "num_classes": info.get("num_classes"),
        "class_names": [c.get("name") for c in info.get("classes", [])] if isinstance(info.get("classes"), list) else None,
        "splits": info.get("splits"),
    }


def finish_train_run(run_uri: str, record: dict[str, Any] | None, files: list[str], fingerprint: dict[str, Any] | None,
                     tags: dict[str, Any], status: str) -> int:
    """Sends the run folder's ``files`` (those present) as artifacts, the fingerprint, ``tags`` and the end.

    Returns:
        The records left waiting in ``RUN/mlflow/pending.jsonl`` (0: all sent).
    """
    if record is None:
        return 0
    tracker = Tracker(run_uri, record["uri"], record["experiment"], (read_run_record(run_uri) or {}).get("run_id"))
    for name in files:
        if storage.exists(storage.join(run_uri, name)):
            tracker.send({"op": "artifact", "file": name, "path": None})
    if fingerprint is not None:
        tracker.send({"op": "json", "name": FINGERPRINT_FILE, "data": fingerprint})
        tracker.send({"op": "tags", "tags": {f"{TAG}dataset_sha256": fingerprint["dataset_json_sha256"]}})
    if tags:
        tracker.send({"op": "tags", "tags": {f"{TAG}{k}": v for k, v in tags.items() if v is not None}})
    tracker.send({"op": "end", "status": status})
    return len(read_pending(run_uri))


def describe_pending(folder: str, left: int) -> str:
    return (f"MLflow: {left} record(s) could not be sent and wait in {folder}/mlflow/pending.jsonl; "
            f"send them with `segray mlflow sync {folder}`")
