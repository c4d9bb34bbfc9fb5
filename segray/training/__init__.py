"""Distributed training on Ray Train: the per-worker loop, the run's artifacts, and the trainer that launches it."""

from segray.training.trainer import ResolvedRun, TrainResult, resolve, train

__all__ = ["ResolvedRun", "TrainResult", "resolve", "train"]
