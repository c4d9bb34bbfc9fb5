"""The predict config (flags -> frozen dataclass) and what predict and evaluate return."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from segray.config import ConfigError, from_dict, to_dict


@dataclass(frozen=True)
class PredictConfig:
    """What ``segray predict`` was asked to do.

    Attributes:
        model: a training run (``STORAGE/RUN``, holding ``model/model.keras``
            and ``model/preprocessing.json``), its ``model/`` folder, or a
            ``.keras`` file (``preprocessing.json`` beside it is used when present).
        input: a raw layout (``images/`` with or without ``masks/``), a folder
            of Parquet shards (``DATA/val``), or an ingested dataset with ``split``.
        output: where masks, overlays and tables go (local or s3://).
        batch_size: images per model call; windows per call with ``tile``.
        workers: predictor actors (``ActorPoolStrategy(size=workers)``).
        gpus_per_worker: GPUs per actor; 0 predicts on CPUs.
        tile: ``[H, W]`` sliding window at each image's own resolution, for
            images too large to predict whole; None predicts whole images.
        overlap: with ``tile``, the fraction of the window shared by
            neighbouring windows (0 <= overlap <= 0.9), per axis.
        overlays: colour overlays for the first K images by id (0: none).
        split: the split of an ingested dataset (``val``, ``train``).
    """

    model: str
    input: str
    output: str
    batch_size: int = 8
    workers: int = 1
    gpus_per_worker: float = 0.0
    tile: list[int] | None = None
    overlap: float = 0.25
    overlays: int = 8
    split: str | None = None

    def __post_init__(self) -> None:
        for name in ("model", "input", "output"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"--{name}: expected a path or s3:// URI, got {value!r}")
        for name, flag in (("batch_size", "--batch-size"), ("workers", "--workers")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
        if isinstance(self.overlays, bool) or not isinstance(self.overlays, int) or self.overlays < 0:
            raise ConfigError(f"--overlays must be 0 or more, got {self.overlays!r}")
        if isinstance(self.gpus_per_worker, bool) or not isinstance(self.gpus_per_worker, (int, float)) or self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker!r}")
        object.__setattr__(self, "gpus_per_worker", float(self.gpus_per_worker))
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float)) or not 0.0 <= self.overlap <= 0.9:
            raise ConfigError(f"--overlap must be a fraction of the tile in [0, 0.9], got {self.overlap!r}")
        object.__setattr__(self, "overlap", float(self.overlap))
        if self.tile is not None:
            tile = self.tile
            if (
                not isinstance(tile, (list, tuple))
                or len(tile) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in tile)
            ):
                raise ConfigError(f"--tile: expected HxW with positive integers, got {tile!r}")
            # parse_size gives a tuple; keep the field a list so asdict round-trips.
            object.__setattr__(self, "tile", list(tile))
        if self.split is not None and (not isinstance(self.split, str) or not self.split or "/" in self.split):
            raise ConfigError(f"--split: expected a split name such as val, got {self.split!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PredictConfig":
        """Strict: unknown keys and wrong types raise ConfigError naming the key."""
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclass(frozen=True)
class PredictResult:
    """What ``predict`` and ``evaluate`` leave, for the caller to print.

    Attributes:
        output: the OUT URI.
        summary: the contents of ``OUT/summary.json``.
        per_class: the ``per_class.parquet`` DataFrame (empty without truth).
        errors: ``(uri, reason)`` of the inputs in ``OUT/_errors.parquet``.
    """

    output: str
    summary: dict[str, Any]
    per_class: Any
    errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)
