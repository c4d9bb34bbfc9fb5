"""Distributed training on Ray Train: the per-worker loop, what rank 0 writes as it trains, and the trainer that launches it."""

from segray.training.loop import WorkerLoop
from segray.training.losses import masked_cross_entropy
from segray.training.trainer import ResolvedRun, TrainResult, config_from, data_config, resolve, train

__all__ = [
    "ResolvedRun",
    "TrainResult",
    "WorkerLoop",
    "config_from",
    "data_config",
    "masked_cross_entropy",
    "resolve",
    "train",
]
