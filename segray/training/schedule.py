"""The optimizer and its learning-rate schedule: the one owner of both.

``cosine`` is a Keras schedule inside the optimizer; ``poly`` is nnU-Net's
decay, set before every step from the share of training done (by steps or
by the time budget, whichever is further); ``plateau`` halves the rate after
every second epoch without a better val mIoU, and its rate travels in the
checkpoint; ``constant`` never changes.
"""

from __future__ import annotations

from typing import Any

from segray.config import TrainConfig


def poly_lr(lr: float, warmup: float, progress: float) -> float:
    """nnU-Net's poly decay ``lr * (1 - progress)^0.9`` after a linear warm-up over the first ``warmup`` of training.

    Args:
        lr: the peak rate.
        warmup: share of training (0..1) the warm-up takes.
        progress: share of training done (0..1).
    """
    if warmup > 0 and progress < warmup:
        return lr * max(progress / warmup, 0.01)
    rest = (progress - warmup) / max(1e-9, 1.0 - warmup)
    return lr * max(0.0, 1.0 - rest) ** 0.9


class Optimization:
    """The run's optimizer (Adam or Nesterov SGD, loss-scaled under float16) and what moves its learning rate.

    Build it inside the strategy's scope: the optimizer's variables are
    mirrored there.

    Args:
        cfg: the run's config (``optimizer``, ``lr``, ``schedule``, ``warmup``).
        total_steps: the run's steps (``epochs`` x steps per epoch).
        variables: what the optimizer trains.
        loss_scaling: wrap the optimizer in Keras' ``LossScaleOptimizer`` (float16).
    """

    def __init__(self, cfg: TrainConfig, total_steps: int, variables: list, loss_scaling: bool = False) -> None:
        import keras

        self.cfg, self.total_steps, self.loss_scaling = cfg, total_steps, loss_scaling
        if cfg.schedule == "cosine":
            lr: Any = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=total_steps, alpha=0.01)
        elif cfg.schedule == "poly":
            lr = self.poly(0.0)  # a variable, set before every step (``before_step``)
        else:
            lr = cfg.lr
        if cfg.optimizer == "sgd":
            optimizer = keras.optimizers.SGD(learning_rate=lr, momentum=0.99, nesterov=True)
        else:
            optimizer = keras.optimizers.Adam(learning_rate=lr)
        if loss_scaling:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(variables)
        self.optimizer = optimizer

    @property
    def per_step(self) -> bool:
        """Whether ``before_step`` sets the rate (``poly``)."""
        return self.cfg.schedule == "poly"

    def poly(self, progress: float) -> float:
        """The ``poly`` schedule's rate at ``progress`` (0..1) of training."""
        return poly_lr(self.cfg.lr, self.cfg.warmup, progress)

    def progress(self, steps_done: int, budget_share: float | None = None) -> float:
        """The share of training done: by steps, or by the time budget where that is further; at most 1."""
        progress = steps_done / max(1, self.total_steps)
        if budget_share is not None:
            progress = max(progress, budget_share)
        return min(progress, 1.0)

    def before_step(self, progress: float) -> None:
        """Sets a ``poly`` schedule's rate for the share of training done; other schedules are left alone."""
        if self.per_step:
            self.optimizer.learning_rate = self.poly(progress)

    def after_epoch(self, stale: int) -> None:
        """``plateau``: halves the rate after every second epoch in a row without a better val mIoU."""
        if self.cfg.schedule == "plateau" and stale > 0 and stale % 2 == 0:
            self.optimizer.learning_rate = self.learning_rate() * 0.5

    def restore(self, state: dict[str, Any]) -> None:
        """Takes back what a checkpoint's state holds of the schedule (``plateau``'s halved rate)."""
        if self.cfg.schedule == "plateau":
            self.optimizer.learning_rate = state["lr"]

    def apply(self, grads: list, variables: list) -> None:
        self.optimizer.apply(grads, variables)

    def scale_loss(self, loss):
        """The loss to differentiate: scaled under float16 loss scaling (``apply`` unscales the gradients)."""
        return self.optimizer.scale_loss(loss) if self.loss_scaling else loss

    def learning_rate(self) -> float:
        """The rate the next step uses (of the last step for a Keras schedule)."""
        lr = self.optimizer.learning_rate
        return float(lr.numpy() if hasattr(lr, "numpy") else lr)
