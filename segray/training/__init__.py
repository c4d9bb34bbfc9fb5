"""Distributed training on Ray Train: the per-worker loop, the run's artifacts, and the trainer that launches it."""

from segray.training.trainer import ResolvedRun, TrainResult, resolve, train


def config_from(values: dict):
    """The TrainConfig of a run from the fields the user gave; the dataset's plan fills the rest (``segray.planning.config_from``)."""
    from segray.planning.apply import config_from as _config_from

    return _config_from(values)


__all__ = ["ResolvedRun", "TrainResult", "config_from", "resolve", "train"]
