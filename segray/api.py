"""The Python API: one call per job, for notebooks and scripts (``segray.ingest`` ...).

Each call checks its config, starts a local Ray or joins the cluster in
``RAY_ADDRESS`` (once per process), runs the job and returns what it made,
the tables as pandas DataFrames. The CLI and ``jobs/`` are thin callers of
these functions: ``COMMANDS`` names the subcommand of each, ``segray``
re-exports ``__all__``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import os

from segray.config import (
    Config,
    EvaluateConfig,
    ExportConfig,
    IngestConfig,
    PlanConfig,
    PredictConfig,
    QueryConfig,
    ReportConfig,
    ServeConfig,
    TrainConfig,
    TuneConfig,
)
from segray.runtime import DATA_PIPELINE_CPUS, check_fits, cluster_limits, init_ray, local_cpus, local_gpus

C = TypeVar("C", bound=Config)

__all__ = ["evaluate", "export_model", "ingest", "load_model", "plan", "predict", "query", "report", "serve", "train", "tune"]


def _config(cls: type[C], cfg: C | dict[str, Any]) -> C:
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, dict):
        return cls.from_dict(cfg)
    raise TypeError(f"expected a {cls.__name__} or a dict of its fields, got {type(cfg).__name__}")


def ingest(cfg: IngestConfig | dict[str, Any], command: str = ""):
    """Checks every image/mask pair of ``cfg.source`` and writes the dataset to ``cfg.destination``.

    Args:
        cfg: an ``IngestConfig`` (or a dict of its fields).
        command: the command line to record in ``dataset.json`` (the CLI passes its own).

    Returns:
        ``IngestResult``: ``dst``, ``info`` (the ``DatasetInfo`` of dataset.json) and
        the rejected inputs as ``(uri, reason)``.
    """
    from segray.data import ingest as run_ingest
    from segray.data import ingest_instances

    cfg = _config(IngestConfig, cfg)
    init_ray()
    if cfg.instance_layout:
        return ingest_instances(cfg, command=command)
    return run_ingest(cfg, command=command)


def plan(cfg: PlanConfig | dict[str, Any]):
    """Fingerprints a dataset's train split and writes ``plan.json``: every training choice with its reason; no Ray needed.

    Args:
        cfg: a ``PlanConfig`` (or a dict of its fields): ``data``,
            ``time_budget`` (seconds), ``gpu``, ``output`` (default DATA/plan.json).

    Returns:
        ``Plan``: ``choices`` (entry -> value and reason), ``fingerprint``; ``table()`` prints it.

    Raises:
        ConfigError: one class only or an empty train split (named).
    """
    from segray.planning import make_plan, plan_uri, write_plan

    cfg = _config(PlanConfig, cfg)
    made = make_plan(cfg.data, cfg.time_budget, cfg.gpu, max_images=cfg.max_images)
    write_plan(made, cfg.output or plan_uri(cfg.data))
    return made


def train(cfg: TrainConfig | dict[str, Any]):
    """Trains a model with Ray Train; every value is checked before Ray starts.

    Args:
        cfg: a ``TrainConfig`` (used as it is), or a dict of the fields to
            set: the dataset's plan (DATA/plan.json, or one made now) fills
            the others (``segray.training.config_from``).

    Returns:
        ``TrainResult``: ``run_uri``, ``history`` (DataFrame, one row per
        epoch), ``best_epoch`` and ``best`` (that epoch's metrics).
    """
    from segray.training import resolve
    from segray.training import train as run_train

    from segray.training import config_from

    if isinstance(cfg, dict):
        cfg = config_from(cfg)
    run = resolve(_config(TrainConfig, cfg))
    c = run.config
    cpus = c.workers * c.cpus_per_worker + DATA_PIPELINE_CPUS
    init_ray(num_cpus=local_cpus(cpus))
    check_fits(cpus, c.workers if c.gpu else 0, "workers", f"training with {c.workers} worker(s) of {c.cpus_per_worker} CPU(s)")
    return run_train(run)


def tune(cfg: TuneConfig | dict[str, Any]):
    """Searches hyperparameters on Ray Tune: every trial a Ray Train run, poor trials stopped by ASHA.

    The search space and every trial it can make are checked before Ray
    starts (a bad key or value is named). Locally, as many trials run at once
    as the machine's cores hold workers, each with a CPU for its data pipeline.

    Args:
        cfg: a ``TuneConfig`` (or a dict of its fields).

    Returns:
        ``TuneResult``: ``uri`` (``STORAGE/NAME``), ``trials`` (DataFrame, one
        row per trial, as ``trials.parquet``), ``best`` (``best.json``) and ``seconds``.
    """
    import ray

    from segray.tuning import concurrent_trials, prepare, ray_cpus, trial_count
    from segray.tuning import run as run_search

    cfg = _config(TuneConfig, cfg)
    prepared = prepare(cfg)
    trials = trial_count(prepared)
    if not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        concurrent = concurrent_trials(cfg, float(os.cpu_count() or 1), local_gpus() if cfg.gpu else 0.0, trials, local=True)
        init_ray(num_cpus=local_cpus(ray_cpus(cfg, concurrent)))
    else:
        # A cluster, or a Ray this process started before (a notebook's, an earlier call's):
        # its CPUs are what they are, so each trial's data pipeline must find one among them.
        init_ray()
        have = (cluster_limits() if os.environ.get("RAY_ADDRESS") else None) or ray.cluster_resources()
        concurrent = concurrent_trials(cfg, have.get("CPU", 0.0), have.get("GPU", 0.0), trials, local=False)
    per_trial = cfg.workers_per_trial * cfg.cpus_per_worker + DATA_PIPELINE_CPUS
    what = f"a trial of {cfg.workers_per_trial} worker(s) of {cfg.cpus_per_worker} CPU(s)"
    check_fits(per_trial, cfg.workers_per_trial if cfg.gpu else 0, "workers_per_trial", what)
    return run_search(prepared, concurrent)


def predict(cfg: PredictConfig | dict[str, Any]):
    """Segments every image of ``cfg.input`` and, where truth masks come with them, scores them.

    Args:
        cfg: a ``PredictConfig`` (or a dict of its fields).

    Returns:
        ``PredictResult``: ``output_uri``, ``summary`` (dict), ``per_class``,
        ``per_image`` and ``confusion`` (DataFrames), ``errors``.
    """
    from segray.inference import predict as run_predict

    cfg = _config(PredictConfig, cfg)
    cpus = cfg.workers + DATA_PIPELINE_CPUS  # one CPU per predictor actor, plus decoding and writing
    init_ray(num_cpus=local_cpus(cpus))
    check_fits(cpus, cfg.workers * cfg.gpus_per_worker, "workers", f"predicting with {cfg.workers} actor(s)")
    return _tracked(run_predict(cfg), "predict", cfg)


def evaluate(cfg: EvaluateConfig | dict[str, Any]):
    """Scores existing predicted masks against truth masks; returns a ``PredictResult``.

    Args:
        cfg: an ``EvaluateConfig`` (or a dict of its fields).
    """
    from segray.inference import evaluate as run_evaluate

    cfg = _config(EvaluateConfig, cfg)
    init_ray()
    return _tracked(run_evaluate(cfg), "evaluate", cfg)


def _tracked(result, kind: str, cfg: PredictConfig | EvaluateConfig):
    """``result`` after its MLflow run was sent (with ``mlflow`` or ``$MLFLOW_TRACKING_URI``; see segray.tracking)."""
    from segray.tracking import log_output

    log_output(result.output_uri, kind, result.summary, result.per_class, cfg.mlflow, cfg.mlflow_experiment)
    return result


def report(cfg: ReportConfig | dict[str, Any]):
    """Writes one self-contained HTML report of a predict (or evaluate) output; no Ray needed.

    Args:
        cfg: a ``ReportConfig`` (or a dict of its fields): ``out``, ``run``
            (training curves), ``output`` (the .html file), ``worst`` (strips per class).

    Returns:
        ``ReportResult``: ``uri``, ``size_bytes``, ``strips``.

    Raises:
        FileNotFoundError: OUT, one of its tables or the run's history is missing (named).
        ValueError: OUT is not a finished predict or evaluate output.
    """
    from segray.reporting import write_report

    return write_report(_config(ReportConfig, cfg))


def query(cfg: QueryConfig | dict[str, Any] | str, sql: str | None = None):
    """Answers SQL (or a named question) over an output's tables with DuckDB; no Ray needed.

    ``segray.query("preds", "SELECT * FROM per_class")`` is short for
    ``segray.query(segray.QueryConfig(out="preds", sql=...))``. The views are
    ``per_image``, ``per_class``, ``confusion``, ``errors`` and ``image_confusion``.

    Args:
        cfg: a ``QueryConfig`` (or a dict of its fields), or the output folder.
        sql: the query, when ``cfg`` is the output folder.

    Returns:
        The rows as a pandas DataFrame (also written to ``cfg.output`` when given).

    Raises:
        ValueError: the SQL fails (DuckDB's message), an unknown class, or
            ``cfg.output`` inside an output folder.
        FileNotFoundError: a table the query needs is missing from the output.
        FileExistsError: ``cfg.output`` exists and segray did not write it,
            or ``cfg.overwrite`` is off.
    """
    from segray.reporting import OutputTables, below, check_output_file, confused, worst, write_result

    cfg = QueryConfig(out=cfg, sql=sql) if isinstance(cfg, str) else _config(QueryConfig, cfg)
    if cfg.output:
        check_output_file(cfg.output, cfg.overwrite, "query result")  # before the work; again when writing
    try:
        tables = OutputTables(cfg.out)
    except (FileNotFoundError, ValueError) as e:
        from segray.config import about

        raise about("out", type(e)(f"out {e}")) from None
    if cfg.worst is not None:
        frame = worst(tables, cfg.worst, cfg.k)
    elif cfg.below is not None:
        frame = below(tables, *cfg.below)
    elif cfg.confused is not None:
        frame = confused(tables, *cfg.confused)
    else:
        frame = tables.sql(cfg.sql)
    if cfg.output:
        write_result(frame, cfg.output, cfg.overwrite)
    return frame
def export_model(cfg: ExportConfig | dict[str, Any]):
    """Writes a run's model as a SavedModel, ONNX or plain Keras file that loads without segray.

    (``export_model``, not ``export``: ``segray.export`` is the package.)

    Args:
        cfg: an ``ExportConfig`` (or a dict of its fields).

    Returns:
        ``ExportResult``: ``output``, ``format``, ``files`` and ``card`` (the
        model card, also in ``OUTPUT/model_card.json``).
    """
    import dataclasses

    from segray.export import export as run_export

    cfg = _config(ExportConfig, cfg)
    result = run_export(cfg)
    if cfg.register:
        from segray.runs import MODEL_FILE, PREPROCESSING_FILE
        from segray.tracking import register

        registered = register(result.output, cfg.run, result.card, cfg.register, cfg.mlflow, cfg.mlflow_experiment,
                              keras_file=MODEL_FILE, preprocessing_file=PREPROCESSING_FILE)
        result = dataclasses.replace(result, registered=registered)
    return result


def serve(cfg: ServeConfig | dict[str, Any]):
    """Serves a run's model over HTTP on Ray Serve (``POST /segment``, ``GET /healthz``, ``GET /model``).

    Args:
        cfg: a ``ServeConfig`` (or a dict of its fields). With ``blocking``
            False it returns once the application answers.

    Returns:
        ``Served``: ``url``, ``model_id``, ``card``; ``shutdown()`` stops it.
    """
    from segray.serving import serve as run_serve

    cfg = _config(ServeConfig, cfg)
    init_ray()
    return run_serve(cfg)


def load_model(run_uri: str):
    """The trained ``keras.Model`` of a run (``STORAGE/RUN``), its ``model/`` folder or a ``.keras`` file.

    segray's custom layers are registered first, so nothing else needs importing.
    """
    from segray.runs import load_model as load

    return load(run_uri)


# Subcommand -> the call it makes, its config class (whose fields are its flags) and its line in `segray --help`.
# `segray NAME` prints what the call returns (its ``describe()``) unless segray.cli has a handler of its own.
COMMANDS: dict[str, tuple[Any, type[Config], str]] = {
    "ingest": (ingest, IngestConfig, "check a raw dataset and write Parquet shards + dataset.json"),
    "plan": (plan, PlanConfig, "fingerprint a dataset and write plan.json: every training choice with its reason"),
    "train": (train, TrainConfig, "train a model on an ingested dataset with Ray Train; the dataset's plan fills what no flag sets"),
    "tune": (tune, TuneConfig, "search hyperparameters on Ray Tune: trials of `segray train`, poor ones stopped by ASHA"),
    "predict": (predict, PredictConfig, "segment images with a trained model; evaluate where masks exist"),
    "evaluate": (evaluate, EvaluateConfig, "IoU/Dice tables from existing predicted and true masks"),
    "report": (report, ReportConfig, "write one self-contained HTML report of a predict output"),
    "query": (query, QueryConfig, "SQL (DuckDB) over a predict output's tables, or a named question"),
    "export": (export_model, ExportConfig, "write a run's model as a SavedModel, ONNX or plain Keras file that loads without segray"),
    "serve": (serve, ServeConfig, "serve a run's model over HTTP on Ray Serve"),
}
