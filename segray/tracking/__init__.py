"""Experiment tracking and the model registry on MLflow: an optional sink and source beside segray's own files.

segray's run and output folders stay the source of truth; MLflow gets a copy
(params, per-epoch metrics, artifacts, tags) so runs show up beside a team's
other work. Nothing here imports ``mlflow`` until a job is tracked
(``pip install 'segray[mlflow]'``).
"""

from segray.tracking.client import (
    PENDING_FILE,
    RECORD_DIR,
    RUN_FILE,
    TRACKING_ENV,
    Tracker,
    TrackingWarning,
    read_pending,
    read_run_record,
    send_pending,
    tracking_uri,
)
from segray.tracking.outputs import log_output
from segray.tracking.registry import Registered, is_registered, register, resolve_registered
from segray.tracking.search import finish_search_run, start_search_run, trial_tags
from segray.tracking.training import EpochLogger, dataset_fingerprint, describe_pending, finish_train_run, start_train_run

__all__ = [
    "PENDING_FILE",
    "RECORD_DIR",
    "RUN_FILE",
    "TRACKING_ENV",
    "EpochLogger",
    "Registered",
    "Tracker",
    "TrackingWarning",
    "dataset_fingerprint",
    "describe_pending",
    "finish_search_run",
    "finish_train_run",
    "is_registered",
    "log_output",
    "read_pending",
    "read_run_record",
    "register",
    "resolve_registered",
    "send_pending",
    "start_search_run",
    "start_train_run",
    "tracking_uri",
    "trial_tags",
]
