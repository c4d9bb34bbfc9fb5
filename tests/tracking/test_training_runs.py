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
from segray.runs import read_history, resolve_model
from segray.tracking import read_pending, read_run_record
from segray.training import train

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


@pytest.fixture(scope="module")
def tracked(shapes, mlflow_server, tmp_path_factory):
    """A 2-epoch run tracked on the server: ``(runs folder, run URI)``."""
    runs = str(tmp_path_factory.mktemp("runs"))
    cfg = config(shapes, runs, "tracked", mlflow=mlflow_server.uri, mlflow_experiment="segray-tests")
    return runs, train(cfg).run_uri


def test_a_run_and_its_resumption_are_one_mlflow_run_equal_to_the_run_folder(shapes, mlflow_server, tracked):
    client = MlflowClient(mlflow_server.uri)
    runs, run_uri = tracked
    first = check_mlflow_equals_run(client, run_uri, 2)
    assert client.get_experiment_by_name("segray-tests").experiment_id == client.get_run(first).info.experiment_id

    resumed = train(config(shapes, runs, "tracked", mlflow=mlflow_server.uri, epochs=3, resume=True))
    assert check_mlflow_equals_run(client, resumed.run_uri, 3) == first
    assert client.get_run(first).data.tags["segray.epochs"] == "3"


def test_the_server_stopped_mid_training_neither_fails_nor_stalls_it_and_sync_sends_the_rest(shapes, mlflow_server, tmp_path):
    """`segray train` (MLFLOW_TRACKING_URI) loses its server after epoch 0: it trains on, warns once, and sync catches up."""
    from segray.cli import main as cli_main

    client = MlflowClient(mlflow_server.uri)
    run_uri = str(tmp_path / "runs" / "cut")
    env = {**os.environ, "PYTHONPATH": ROOT, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    command = [sys.executable, "-m", "segray.cli", "train", "--data", shapes, "--storage", str(tmp_path / "runs"), "--name", "cut",
               "--epochs", "4", "--batch-size", "4", "--workers", "1", "--lr", "0.01", "--schedule", "constant",
               "--model-option", "depth=2", "--model-option", "width=8", "--mlflow-experiment", "segray-cut"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline, seen = time.time() + 300, 0
    while time.time() < deadline and proc.poll() is None:
        record = storage.exists(storage.join(run_uri, "mlflow", "run.json")) and read_run_record(run_uri)
        if record and record.get("run_id"):
            seen = len(client.get_metric_history(record["run_id"], "val_miou"))
            if seen:
                break
        time.sleep(0.2)
    assert seen == 1, "".join(lines)[-3000:]
    mlflow_server.stop()  # while training goes on
    mlflow_server.start()  # back on the same store; training keeps what it cannot send, whatever the server does now
    assert proc.wait(timeout=300) == 0, "".join(lines)[-3000:]
    reader.join(timeout=10)
    output = "".join(lines)
    assert output.count("could not be reached") == 1, output[-3000:]
    assert "segray mlflow sync" in output
    assert len(read_history(run_uri)) == 4
    waiting = read_pending(run_uri)
    assert waiting and waiting[-1] == {"op": "end", "status": "FINISHED"}
    mlflow_server.wait()
    record = read_run_record(run_uri)
    assert len(client.get_metric_history(record["run_id"], "val_miou")) < 4
    assert client.get_run(record["run_id"]).info.status == "RUNNING"

    assert cli_main(["mlflow", "sync", run_uri]) == 0
    assert check_mlflow_equals_run(client, run_uri, 4) == record["run_id"]
    assert not storage.exists(storage.join(run_uri, "mlflow", "pending.jsonl"))


def test_predict_and_evaluate_runs_hold_the_summary_and_per_class_table_in_a_file_store(shapes, tracked, tmp_path, monkeypatch):
    """A plain file store (no server): the runs' metrics are summary.json's, the table is per_class.parquet's, tags trace the model."""
    import pandas as pd

    import segray
    from segray.config import EvaluateConfig, PredictConfig

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    store = f"file://{tmp_path}/mlruns"
    client = MlflowClient(store)
    run_uri = tracked[1]
    model_id = resolve_model(run_uri).model_id
    predicted = segray.predict(PredictConfig(model=run_uri, input=shapes, split="val", output=str(tmp_path / "preds"),
                                             mlflow=store, mlflow_experiment="segray-predict"))
    truth = os.path.join(os.path.dirname(shapes), "raw", "masks")
    evaluated = segray.evaluate(EvaluateConfig(pred=str(tmp_path / "preds" / "masks"), truth=truth, output=str(tmp_path / "scores"),
                                               mlflow=store, mlflow_experiment="segray-predict"))
    for result, kind in ((predicted, "predict"), (evaluated, "evaluate")):
        run = client.get_run(read_run_record(result.output_uri)["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["segray.kind"] == kind
        assert run.data.tags["segray.weights_hash"] == model_id == result.summary["model_id"]
        if kind == "predict":
            identity = json.loads(storage.read_text(storage.join(result.output_uri, "_run.json")))
            assert run.data.tags["segray.source_fingerprint"] == identity["source_fingerprint"]
            assert run.data.params["split"] == "val"
        for key in ("miou", "mean_dice", "pixel_accuracy", "images"):
            assert run.data.metrics[key] == pytest.approx(float(result.summary[key])), key
        with tempfile.TemporaryDirectory() as tmp:
            table = pd.read_parquet(client.download_artifacts(run.info.run_id, "per_class.parquet", tmp))
            pd.testing.assert_frame_equal(table, result.per_class.reset_index(drop=True), check_dtype=False)
            shown = json.load(open(client.download_artifacts(run.info.run_id, "per_class.json", tmp)))
            assert shown["columns"] == list(result.per_class.columns) and len(shown["data"]) == len(result.per_class)


PYFUNC_SCRIPT = r"""
import importlib.util, os, sys
# segray is installed (editable) in this Python: take it out of reach, so the model must load without it.
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if p and not os.path.exists(os.path.join(p, "segray"))]
if importlib.util.find_spec("segray") is not None:
    raise SystemExit(f"segray is importable: {importlib.util.find_spec('segray').origin}")
sys.modules["segray"] = None  # and stays so, whatever the model's code tries
import numpy as np
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
images = np.load(sys.argv[2])
np.save(sys.argv[3], model.predict(images))
print("loaded without segray:", sorted(m for m, v in sys.modules.items() if m.startswith("segray") and v is not None))
"""


def test_a_registered_model_loads_without_segray_and_predicts_as_the_run_does(shapes, tracked, mlflow_server, tmp_path, monkeypatch):
    import glob

    import pandas as pd
    from PIL import Image

    import segray
    from segray.config import ExportConfig, PredictConfig

    client = MlflowClient(mlflow_server.uri)
    run_uri = tracked[1]
    model_id = resolve_model(run_uri).model_id
    exported = segray.export_model(ExportConfig(run=run_uri, output=str(tmp_path / "exported"), format="onnx", register="segray-tiny",
                                                mlflow=mlflow_server.uri, mlflow_experiment="segray-registry"))
    version = exported.registered["version"]
    assert exported.registered["model_uri"] == f"models:/segray-tiny/{version}"
    mv = client.get_model_version("segray-tiny", version)
    assert mv.tags["segray.weights_hash"] == model_id and mv.tags["segray.run_uri"] == run_uri
    client.set_registered_model_alias("segray-tiny", "champion", version)

    on_run = segray.predict(PredictConfig(model=run_uri, input=shapes, split="val", output=str(tmp_path / "on_run")))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    for reference in (f"models:/segray-tiny/{version}", "models:/segray-tiny@champion"):
        out = tmp_path / reference.split("/")[-1].replace("@", "_")
        on_model = segray.predict(PredictConfig(model=reference, input=shapes, split="val", output=str(out)))
        assert on_model.summary["model_id"] == model_id
        pd.testing.assert_frame_equal(on_model.per_class, on_run.per_class)
        names = sorted(os.listdir(tmp_path / "on_run" / "masks"))
        assert names and names == sorted(os.listdir(out / "masks"))
        for name in names:
            assert (out / "masks" / name).read_bytes() == (tmp_path / "on_run" / "masks" / name).read_bytes(), name

    # The pyfunc, in a Python where segray cannot be imported, gives segray predict's masks.
    raw = os.path.join(os.path.dirname(shapes), "raw", "images")
    ids = [n.rsplit(".", 1)[0] for n in names]
    images = np.stack([np.asarray(Image.open(glob.glob(os.path.join(raw, f"{i}.*"))[0]).convert("RGB")) for i in ids])
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", PYFUNC_SCRIPT, f"models:/segray-tiny/{version}", str(tmp_path / "images.npy"),
                           str(tmp_path / "masks.npy")], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded without segray: []" in done.stdout
    masks = np.load(tmp_path / "masks.npy")
    assert masks.dtype == np.uint8 and masks.shape == images.shape[:3]
    for mask, name in zip(masks, names):
        assert np.array_equal(mask, np.asarray(Image.open(tmp_path / "on_run" / "masks" / name))), name

    # Weights that are not the registered version's are refused.
    client.set_model_version_tag("segray-tiny", version, "segray.weights_hash", "0" * 16)
    with pytest.raises(ValueError, match="the registered version"):
        resolve_model(f"models:/segray-tiny/{version}")
