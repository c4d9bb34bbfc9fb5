"""The resolved training config: flags -> TrainConfig -> asdict -> each worker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from segray.config import from_dict, to_dict


@dataclass(frozen=True)
class TrainConfig:
    data: str
    storage: str
    name: str
    model: str = "unet"
    epochs: int = 10
    batch_size: int = 8  # per worker
    lr: float = 1e-3
    workers: int = 2
    gpu: bool = False
    cpus_per_worker: int = 1
    mixed_precision: bool = False
    xla: bool = False
    loss: Literal["ce", "ce+dice"] = "ce"
    dice_weight: float = 1.0
    class_weights: str | list[float] = "none"  # "auto", "none" or one weight per class
    size: list[int] | None = None  # [H, W]; None: the dataset's own size, else 256x256
    crop: list[int] | None = None
    augment: bool = True
    schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    patience: int = 0  # early stopping on val mIoU; 0 = off
    keep_checkpoints: int = 2
    max_failures: int = 2
    seed: int = 0
    resume: bool = False
    model_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
