"""Distributed training on Ray Train: the per-worker loop, the run's artifacts, and the trainer that launches it."""

from segray.training.artifacts import CONFIG_FILE, HISTORY_FILE, RunState, read_config, read_history, run_exists, run_state
from segray.training.loop import WorkerLoop
from segray.training.losses import masked_cross_entropy
from segray.training.trainer import ResolvedRun, TrainResult, config_from, data_config, resolve, train

__all__ = [
    "CONFIG_FILE",
    "HISTORY_FILE",
    "ResolvedRun",
    "RunState",
    "TrainResult",
    "WorkerLoop",
    "config_from",
    "data_config",
    "masked_cross_entropy",
    "read_config",
    "read_history",
    "resolve",
    "run_exists",
    "run_state",
    "train",
]
