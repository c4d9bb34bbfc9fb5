"""The driver side of training: check the config, launch Ray Train, collect the run."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from segray import storage
from segray.config import ConfigError
from segray.data.info import DatasetInfo, load_dataset_info
from segray.train.config import TrainConfig


@dataclass(frozen=True)
class TrainResult:
    run_uri: str
    history: Any  # pandas.DataFrame, one row per epoch
    best: dict[str, Any]  # the best epoch's metrics


def resolve(cfg: TrainConfig) -> tuple[TrainConfig, DatasetInfo, str]:
    """Checks every flag before any work starts; fills in the dataset-dependent defaults.

    Raises:
        ConfigError: a flag value that cannot work, naming it.
        FileNotFoundError: DATA is not an ingested dataset.
        FileExistsError: the run exists and --resume was not given.
    """
    from segray import models

    if cfg.model not in models.available():
        raise ConfigError(f"--model {cfg.model!r} is unknown; choose from {', '.join(models.available())}")
    if cfg.xla and cfg.model in models.NO_XLA:
        raise ConfigError(f"--xla with --model {cfg.model}: {models.NO_XLA[cfg.model]}; drop --xla")
    if cfg.xla and cfg.workers > 1 and not cfg.gpu:
        # The gradient all-reduce sits inside the compiled step (tensorflow b/194942685).
        raise ConfigError(
            f"--xla with --workers {cfg.workers} on CPU: TensorFlow does not compile collectives for CPU devices; "
            "use --workers 1, add --gpu, or drop --xla"
        )
    for flag, value in (("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size), ("--workers", cfg.workers), ("--cpus-per-worker", cfg.cpus_per_worker)):
        if value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"--name {cfg.name!r}: expected a plain run name without '/'")
    info = load_dataset_info(cfg.data)
    n_train, n_val = info.splits.get("train", 0), info.splits.get("val", 0)
    if cfg.batch_size * cfg.workers > n_train:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} x --workers {cfg.workers} is larger than the train split of {cfg.data} ({n_train} images)"
        )
    if n_val == 0:
        raise ConfigError(f"{cfg.data} has no validation images; ingest it with --val-fraction > 0")
    if isinstance(cfg.class_weights, list) and len(cfg.class_weights) != info.num_classes:
        raise ConfigError(f"--class-weights gives {len(cfg.class_weights)} weights, the dataset has {info.num_classes} classes")
    if isinstance(cfg.class_weights, str) and cfg.class_weights not in ("auto", "none"):
        raise ConfigError(f"--class-weights {cfg.class_weights!r}: expected auto, none or w0,w1,...")
    size = cfg.size or info.size or [256, 256]
    for flag, hw in (("--size", size), ("--crop", cfg.crop)):
        if hw:
            # Building at the static size runs the model's own checks (sides divisible
            # by its stride, valid options) before any worker starts.
            try:
                models.build(cfg.model, info.num_classes, input_shape=(hw[0], hw[1], 3), **cfg.model_options)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{flag} {hw[0]}x{hw[1]} with --model {cfg.model}: {e}") from None
    run_uri = storage.join(cfg.storage, cfg.name)
    exists = storage.exists(storage.join(run_uri, "config.json"))
    if exists and not cfg.resume:
        raise FileExistsError(f"run {run_uri} already exists; pass --resume to continue it or choose another --name")
    if cfg.resume and not exists:
        raise FileNotFoundError(f"--resume: there is no run at {run_uri} to continue")
    return replace(cfg, size=list(size)), info, run_uri


def data_config(workers: int):
    """Which datasets Ray Train splits across workers: train, and only when there is more than one.

    One worker reads the whole train split itself: a split of one would route
    every batch through a SplitCoordinator actor for nothing.
    """
    import ray.train

    return ray.train.DataConfig(datasets_to_split=["train"] if workers > 1 else [])


def train(cfg: TrainConfig) -> TrainResult:
    """Trains ``cfg.model`` on ``cfg.data`` with Ray Train; see TrainConfig for the knobs."""
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from segray.data import read_split
    from segray.train.loop import train_loop_per_worker, val_dataset_name

    cfg, info, run_uri = resolve(cfg)
    config_json = json.dumps({**cfg.to_dict(), "dataset": json.loads(info.to_json())}, indent=2)
    storage.write_text(storage.join(run_uri, "config.json"), config_json)

    size = tuple(cfg.size)
    crop = tuple(cfg.crop) if cfg.crop else None
    datasets = {"train": read_split(cfg.data, "train", size=size, crop=crop, augment=cfg.augment, seed=cfg.seed, info=info)}
    # Ray Train splits datasets equally, dropping the remainder: right for training
    # steps that must stay in lockstep, wrong for validation, which must see every
    # image once. Each worker gets its own hash part of the val split instead.
    for rank in range(cfg.workers):
        datasets[val_dataset_name(rank)] = read_split(cfg.data, "val", size=size, info=info, part=(rank, cfg.workers))
    for ds in datasets.values():
        # Ray Data's bars, redrawn by every worker for every epoch's pass, would
        # bury the epoch lines that rank 0 prints (see train_loop_per_worker).
        ds.context.enable_progress_bars = False
    fs, path = storage.filesystem(cfg.storage)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "dataset_info": info.to_json(), "run_uri": run_uri},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="val_miou", checkpoint_score_order="max"
            ),
        ),
        datasets=datasets,
        dataset_config=data_config(cfg.workers),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    history = storage.read_parquet(storage.join(run_uri, "history.parquet")).to_pandas()
    best = history.loc[history["val_miou"].fillna(-1).idxmax()].to_dict()
    return TrainResult(run_uri, history, best)
