"""A training run tracked on a real MLflow server: what MLflow holds equals the run folder's own files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from segray import storage
from segray.config import IngestConfig, TrainConfig
from segray.data import ingest, synthesize
from segray.runs import resolve_model
from segray.tracking import read_pending, read_run_record
from segray.training import read_history, train

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_UNET = {"depth": 2, "width": 8}
NOT_METRICS = ("epoch", "ended_at")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("shapes")
    synthesize(str(root / "raw"), n=16, size=(32, 32), num_classes=3, seed=0, show_progress=False)
    ingest(IngestConfig(source=str(root / "raw"), destination=str(root / "ds"), val_fraction=0.25))
    return str(root / "ds")


def config(data: str, runs: str, name: str, **overrides) -> TrainConfig:
    base = dict(data=data, storage=runs, name=name, model="unet", epochs=2, batch_size=4, workers=1, lr=0.01,
                schedule="constant", model_options=TINY_UNET)
    return TrainConfig(**{**base, **overrides})


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def check_mlflow_equals_run(client: MlflowClient, run_uri: str, epochs: int) -> str:
    """Params, per-epoch metrics, artifacts and tags of the run's MLflow run against its folder; returns the run id."""
    record = read_run_record(run_uri)
    assert record is not None and record["run_id"], record
    assert read_pending(run_uri) == []
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    saved = json.loads(storage.read_text(storage.join(run_uri, "config.json")))
    params = run.data.params
    for key in ("model", "data", "storage", "name", "lr", "batch_size", "size", "loss", "seed"):
        value = saved[key]
        assert params[key] == (value if isinstance(value, str) else json.dumps(value)), key
    assert params["model_options.depth"] == "2" and params["model_options.width"] == "8"
    history = read_history(run_uri)
    assert list(history["epoch"]) == list(range(epochs))
    logged = set(run.data.metrics)
    for key in ("train_loss", "val_loss", "val_miou", "val_iou_background"):
        assert key in logged, key
    for key in history.columns:
        if key in NOT_METRICS:
            continue
        expected = [(int(e), float(v)) for e, v in zip(history["epoch"], history[key]) if np.isfinite(v)]
        assert metric_steps(client, run.info.run_id, key) == pytest.approx(expected), key
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("curves.png", "history.parquet", "config.json"):
            local = client.download_artifacts(run.info.run_id, name, tmp)
            with open(local, "rb") as f:
                assert f.read() == storage.read_bytes(storage.join(run_uri, name)), name
        fingerprint = json.load(open(client.download_artifacts(run.info.run_id, "dataset_fingerprint.json", tmp)))
        import hashlib

        dataset_json = storage.read_bytes(storage.join(saved["data"], "dataset.json"))
        assert fingerprint["dataset_json_sha256"] == hashlib.sha256(dataset_json).hexdigest()
    tags = run.data.tags
    assert tags["segray.weights_hash"] == resolve_model(run_uri).model_id
    assert tags["segray.dataset"] == saved["data"] and tags["segray.model"] == "unet"
    assert tags["segray.version"] and tags["mlflow.runName"] == saved["name"]
    return run.info.run_id


def test_a_run_and_its_resumption_are_one_mlflow_run_equal_to_the_run_folder(shapes, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    cfg = config(shapes, str(tmp_path / "runs"), "tracked", mlflow=mlflow_server.uri, mlflow_experiment="segray-tests")
    result = train(cfg)
    first = check_mlflow_equals_run(client, result.run_uri, 2)
    assert client.get_experiment_by_name("segray-tests").experiment_id == client.get_run(first).info.experiment_id

    resumed = train(config(shapes, str(tmp_path / "runs"), "tracked", mlflow=mlflow_server.uri, epochs=3, resume=True))
    assert check_mlflow_equals_run(client, resumed.run_uri, 3) == first
    assert client.get_run(first).data.tags["segray.epochs"] == "3"
