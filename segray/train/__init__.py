"""Distributed training on Ray Train: the per-worker loop and the trainer that launches it."""

from segray.train.config import TrainConfig
from segray.train.trainer import TrainResult, resolve, train

__all__ = ["TrainConfig", "TrainResult", "resolve", "train"]
