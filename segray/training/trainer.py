"""The driver side of training: check the config, launch Ray Train, collect the run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

from segray import storage
from segray.config import ConfigError, TrainConfig, about, field_defaults, from_dict, resumable_fields
from segray.data import DatasetInfo, load_dataset_info
from segray.ownership import canonical
from segray.runtime import is_verbose
from segray.runs import HISTORY_FILE, PLAN_FILE, clear_end, has_history, read_config, read_history, run_exists, run_state, write_config, write_end, write_plan
from segray.tracking import dataset_fingerprint, describe_pending, finish_train_run, start_train_run

# What a resumed run may change (the fields marked resumable): how long it goes on and how failures are handled.
# Anything else (data, model, loss, sizes, learning rate ...) would make its
# checkpoints and history a mix of two runs.
RESUMABLE_FIELDS = resumable_fields(TrainConfig)


@dataclass(frozen=True)
class TrainResult:
    """What ``segray.train`` returns.

    Attributes:
        run_uri: ``STORAGE/NAME``, where the model, history and curves are.
        history: the ``history.parquet`` DataFrame, one row per epoch.
        best_epoch: the epoch (from 0) with the best val mIoU (an instance run:
            val mask AP50, then val loss): the saved model's.
        best: that epoch's metrics (the row of ``history``).
    """

    run_uri: str
    history: Any
    best_epoch: int
    best: dict[str, Any]


@dataclass(frozen=True)
class ResolvedRun:
    """A checked training config with its dataset-dependent values filled in."""

    config: TrainConfig
    info: DatasetInfo
    run_uri: str


def config_from(values: dict[str, Any], plan=None) -> TrainConfig:
    """The TrainConfig of a run from the fields the user gave; the dataset's plan fills the rest.

    The CLI, ``segray.train(dict)`` and the tuner build their configs here.
    With ``resume`` the run's own config.json is the base instead: a resumed
    run keeps what it was started with. Otherwise the plan is applied by
    ``segray.planning.config_from`` (given values win over it).

    Args:
        values: the fields given.
        plan: ``(plan, source)`` made already, as a search does once for all
            its trials; None: the plan for the values.

    Raises:
        ConfigError: a bad value (named), an unknown key, or a plan file that
            does not validate.
    """
    from segray.planning import config_from as planned

    cfg = TrainConfig.from_dict(values)  # the given values alone: unknown keys, types, ranges
    if "plan" in values:
        return cfg
    if cfg.resume:
        run_uri = storage.join(cfg.storage, cfg.name)
        if run_exists(run_uri):
            saved = read_config(run_uri)
            known = {f.name for f in dataclasses.fields(TrainConfig)}
            base = {k: v for k, v in saved.items() if k in known and k not in ("data", "storage")}
            return from_dict(TrainConfig, {**base, **values})
        return cfg
    return planned(values, plan)


def resolve(cfg: TrainConfig) -> ResolvedRun:
    """Checks what depends on the dataset and the model before any work starts; fills in the size.

    Raises:
        ConfigError: a value that cannot work with this dataset or model, naming the field.
        FileNotFoundError: ``data`` is not an ingested dataset, or ``resume`` without a run.
        FileExistsError: the run exists and ``resume`` is off.
    """
    from segray import models

    try:
        entry = models.spec(cfg.model)
    except ValueError as e:
        if ":" in cfg.model:  # MODULE:NAME: the error says what is wrong with the module
            raise ConfigError(str(e), field="model") from None
        raise ConfigError(f"model {cfg.model!r} is unknown; choose from {', '.join(models.available())}", field="model") from None
    if cfg.xla and entry.no_xla:
        raise ConfigError(f"xla with `model` {cfg.model}: {entry.no_xla}; drop `xla`", field="xla")
    info = load_dataset_info(cfg.data)
    if entry.task != info.task:
        raise ConfigError(
            f"model {cfg.model} is a{'n' if entry.task == 'instance' else ''} {entry.task} segmentation model and {cfg.data} "
            f"is a{'n' if info.task == 'instance' else ''} {info.task} dataset (dataset.json); train a{'n' if info.task == 'instance' else ''} "
            f"{info.task} model on it ({', '.join(models.available(info.task))})"
            + (", or ingest the data with `--task semantic`" if info.task == "instance" else ", or ingest instance data with `--task instance`"),
            field="model",
        )
    if info.task == "instance":
        _check_instance_options(cfg)
    n_train, n_val = info.splits.get("train", 0), info.splits.get("val", 0)
    if cfg.batch_size * cfg.workers > n_train:
        raise ConfigError(
            f"batch_size {cfg.batch_size} x `workers` {cfg.workers} is larger than the train split of {cfg.data} ({n_train} images)",
            field="batch_size",
        )
    if n_val == 0:
        raise about("data", ConfigError(f"data {cfg.data} has no validation images; ingest it with `val_fraction` above 0"))
    if isinstance(cfg.class_weights, list) and len(cfg.class_weights) != info.num_classes:
        raise ConfigError(
            f"class_weights gives {len(cfg.class_weights)} weights, the dataset has {info.num_classes} classes", field="class_weights"
        )
    size = cfg.size or info.size or [256, 256]
    for name, hw in (("size", size), ("crop", cfg.crop)):
        if hw:
            # Building at the static size runs the model's own checks (sides divisible
            # by its stride, valid options) before any worker starts.
            try:
                models.build(cfg.model, info.num_classes, input_shape=(hw[0], hw[1], 3), **cfg.model_options)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{name} {hw[0]}x{hw[1]} with `model` {cfg.model}: {e}", field=name) from None
    if cfg.deep_supervision:  # after the build: the options are valid
        levels = entry.supervised_levels(**cfg.model_options)
        if levels < models.DEEP_SUPERVISION_LEVELS:
            raise ConfigError(
                f"deep_supervision trains heads on {models.DEEP_SUPERVISION_LEVELS} lower decoder levels; "
                f"`model` {cfg.model} with `model_options` {cfg.model_options} has {levels}",
                field="deep_supervision",
            )
    run_uri = storage.join(cfg.storage, cfg.name)
    exists = run_exists(run_uri)
    if exists and not cfg.resume:
        raise about("name", FileExistsError(f"name {cfg.name}: the run {run_uri} already exists; set `resume` to continue it or choose another `name`"))
    if cfg.resume and not exists:
        raise about("resume", FileNotFoundError(f"resume: there is no run at {run_uri} to continue"))
    resolved = replace(cfg, size=list(size))
    if cfg.resume:
        _check_resumable(run_uri, resolved)
    return ResolvedRun(resolved, info, run_uri)


def _check_instance_options(cfg: TrainConfig) -> None:
    """Refuses options of pixel-wise training that an instance run (the model's own loss, object ids) cannot honour."""
    from segray.data import INSTANCE_AUGMENT

    if cfg.foreground_oversample:
        raise ConfigError(f"foreground_oversample with the instance dataset {cfg.data}: patches are cut at random; drop it", field="foreground_oversample")
    if cfg.deep_supervision:
        raise ConfigError(f"deep_supervision with `model` {cfg.model} on the instance dataset {cfg.data}: an instance model trains with its own loss; drop it",
                          field="deep_supervision")
    if cfg.class_weights != "none":
        raise ConfigError(f"class_weights with `model` {cfg.model} on the instance dataset {cfg.data}: an instance model trains with its own loss; drop it",
                          field="class_weights")
    unknown = [a for a in cfg.augment_set if a not in INSTANCE_AUGMENT]
    if cfg.augment and unknown:
        raise ConfigError(f"augment_set: {', '.join(unknown)} not available for the instance dataset {cfg.data}; choose from {', '.join(INSTANCE_AUGMENT)}",
                          field="augment_set")


def _check_resumable(run_uri: str, cfg: TrainConfig) -> None:
    """Refuses to resume with a changed field that alters the run, naming each (old vs new)."""
    old, new = read_config(run_uri), cfg.to_dict()
    for key in ("data", "storage"):  # runs written before paths were made absolute
        if isinstance(old.get(key), str):
            old[key] = canonical(old[key])
    # A field the run's config predates had its default there.
    defaults = field_defaults(TrainConfig)
    changed = [k for k in new if k not in RESUMABLE_FIELDS and old.get(k, defaults.get(k)) != new[k]]
    if changed:
        shown = "; ".join(f"`{k}` {old.get(k)!r} there, {new[k]!r} now" for k in changed)
        raise ConfigError(
            f"resume: the run {run_uri} was trained with other values ({shown}); only "
            f"{', '.join(f'`{k}`' for k in sorted(RESUMABLE_FIELDS - {'resume'}))} may change when resuming. "
            "Resume with the run's values, or start a new run under another `name`",
            field="resume",
        )


def _record_failure(run_uri: str, epochs: int, error: BaseException) -> None:
    """``ended.json`` of a run Ray Train gave up on: the epochs done and the error's last line."""
    done = len(read_history(run_uri)) if has_history(run_uri) else 0
    state = run_state(run_uri)
    if state is not None and state.finished and state.epochs_done == done:
        # The loop had recorded its end (all epochs, say) before the workers died: a search's
        # scheduler stops a trial from outside at its last report, which Ray Train sees as an
        # error. What the run did is already on record; its end is not a failure.
        return
    lines = str(error).strip().splitlines()
    write_end(run_uri, done, epochs, "failed", f"{type(error).__name__}: {lines[-1][:300]}" if lines else type(error).__name__)


def _finish_tracking(run_uri: str, tracked: dict[str, Any] | None, cfg: TrainConfig, info: DatasetInfo, status: str) -> None:
    """Sends the run's files, its dataset's fingerprint and its weights' hash to its MLflow run, and ends it."""
    if tracked is None:
        return
    from segray.runs import BEST_FILE, CONFIG_FILE, CURVES_FILE, MODEL_DIR, MODEL_FILE

    model_id = None
    if storage.exists(storage.join(run_uri, MODEL_DIR, MODEL_FILE)):
        from segray.runs import resolve_model

        model_id = resolve_model(run_uri).model_id
    files = [CONFIG_FILE, HISTORY_FILE, CURVES_FILE, f"{MODEL_DIR}/{BEST_FILE}"]  # the plan went at the start
    left = finish_train_run(run_uri, tracked, files, dataset_fingerprint(cfg.data, info.to_dict()),
                            {"weights_hash": model_id, "best_val_miou": _best_miou(run_uri)}, status)
    if left:
        print(describe_pending(run_uri, left))


def _best_miou(run_uri: str) -> float | None:
    if not storage.exists(storage.join(run_uri, HISTORY_FILE)):
        return None
    history = read_history(run_uri)
    if "val_miou" not in history:  # an instance run ranks by val_ap50
        return None
    scores = history["val_miou"].dropna()
    return float(scores.max()) if len(scores) else None


def class_draw_for(cfg: TrainConfig, info: DatasetInfo) -> tuple[float, ...]:
    """The weights by class id an oversampled patch's class is drawn with: () for ``uniform``.

    ``rare``: the ``auto`` class weights (inverse square root of the train
    pixel frequency), so among the classes present in an image a class 100
    times rarer is centred on 10 times as often.
    """
    from segray.training.losses import class_weights_from_frequency

    if cfg.oversample_classes != "rare":
        return ()
    return tuple(float(w) for w in class_weights_from_frequency([info.pixel_frequency[n] for n in info.class_names]))


def data_config(workers: int):
    """Which datasets Ray Train splits across workers: train, and only when there is more than one.

    One worker reads the whole train split itself: a split of one would route
    every batch through a SplitCoordinator actor for nothing.
    """
    import ray.train

    return ray.train.DataConfig(datasets_to_split=["train"] if workers > 1 else [])


def train(cfg: TrainConfig | ResolvedRun, callbacks: list | None = None, tracking_tags: dict[str, str] | None = None) -> TrainResult:
    """Trains ``cfg.model`` on ``cfg.data`` with Ray Train (on the Ray this process is connected to).

    Args:
        cfg: the config, or the ``resolve`` of it when the caller checked it
            already (``segray.train`` does, before it starts Ray).
        callbacks: Ray Train callbacks added to the run (``segray.tune`` passes
            Ray Tune's ``TuneReportCallback``, so each epoch reaches the search).
        tracking_tags: tags for the run's MLflow run (a search's trial: its parent run).
    """
    import ray.train

    from segray.data import read_split
    from segray.data import read_instances
    from segray.tf_backend import tensorflow_trainer
    from segray.training.loop import instance_score, train_loop_per_worker, val_dataset_name

    run = cfg if isinstance(cfg, ResolvedRun) else resolve(cfg)
    cfg, info, run_uri = run.config, run.info, run.run_uri
    if not write_config(run_uri, cfg.to_dict(), info.to_dict(), exclusive=not cfg.resume):
        raise about("name", FileExistsError(f"name {cfg.name}: the run {run_uri} was started by another process a moment ago; choose another `name`"))
    if cfg.resume:
        clear_end(run_uri)  # training again: the run is unfinished until its loop ends

    if cfg.plan:
        write_plan(run_uri, cfg.plan)
    tracked = start_train_run(run_uri, cfg.to_dict(), cfg.mlflow, cfg.mlflow_experiment, cfg.resume, tracking_tags,
                              plan_name=PLAN_FILE)
    size = tuple(cfg.size)
    crop = tuple(cfg.crop) if cfg.crop else None
    instance = info.task == "instance"  # resolve checked that the model's task is the dataset's
    if instance:
        # The instance batch contract: image, instances (ids 1..K), classes padded to the dataset's max_instances.
        datasets = {"train": read_instances(cfg.data, "train", size=size, crop=crop, augment=cfg.augment, seed=cfg.seed, info=info,
                                            augment_strength=cfg.augment_strength, augment_set=cfg.augment_set,
                                            patches_per_image=cfg.patches_per_image)}
    else:
        datasets = {"train": read_split(cfg.data, "train", size=size, crop=crop, augment=cfg.augment, seed=cfg.seed, info=info,
                                        augment_strength=cfg.augment_strength, augment_set=cfg.augment_set,
                                        patches_per_image=cfg.patches_per_image, foreground_oversample=cfg.foreground_oversample,
                                        class_draw=class_draw_for(cfg, info))}
    # Ray Train splits datasets equally, dropping the remainder: right for training
    # steps that must stay in lockstep, wrong for validation, which must see every
    # image once. Each worker gets its own hash part of the val split instead.
    for rank in range(cfg.workers):
        read = read_instances if instance else read_split
        datasets[val_dataset_name(rank)] = read(cfg.data, "val", size=size, info=info, part=(rank, cfg.workers))
    for ds in datasets.values():
        # Ray Data's bars, redrawn by every worker for every epoch's pass, would
        # bury the epoch lines that rank 0 prints (see train_loop_per_worker).
        ds.context.enable_progress_bars = False
    fs, path = storage.filesystem(cfg.storage)
    trainer = tensorflow_trainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "dataset_info": info.to_json(), "run_uri": run_uri, "mlflow": tracked},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            callbacks=callbacks,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's INFO lines (worker group, ranks, checkpoints) bury the epoch lines.
            logging_config=None if is_verbose() else ray.train.LoggingConfig(log_level="WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="val_ap50" if instance else "val_miou",
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=data_config(cfg.workers),
    )
    try:
        # Ray Train raises the run's error from fit() (older versions returned it in result.error).
        result = trainer.fit()
        if result.error:
            raise result.error
    except Exception as error:
        _record_failure(run_uri, cfg.epochs, error)
        try:
            _finish_tracking(run_uri, tracked, cfg, info, "FAILED")
        except Exception as tracking_error:  # noqa: BLE001 - the training error is the one to raise
            import warnings

            warnings.warn(f"MLflow: the failed run {run_uri} could not be closed in MLflow ({tracking_error})", stacklevel=2)
        raise
    _finish_tracking(run_uri, tracked, cfg, info, "FINISHED")
    history = read_history(run_uri)
    if instance:
        best_row = max(range(len(history)), key=lambda i: instance_score(history.iloc[i].to_dict()))
    else:
        best_row = int(history["val_miou"].fillna(-1).idxmax())
    best = history.loc[best_row].to_dict()
    return TrainResult(run_uri, history, int(best["epoch"]), best)
