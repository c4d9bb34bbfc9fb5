"""segray train on an instance dataset: synth -> ingest -> Mask R-CNN through Ray Train -> predict the run; resume; task mismatch.

The resume test adds a Ray Train start (~40 s on 2 busy cores): deselect it with ``-k 'not resume'`` for the short run.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from segray import models, storage
from segray.cli import main as cli_main
from segray.config import ConfigError

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _config(data: str, root: str, name: str, **overrides) -> dict:
    return {
        "data": data, "storage": root, "name": name, "model": "maskrcnn", "epochs": 2, "batch_size": 2, "workers": 1,
        "lr": 3e-3, "optimizer": "adam", "schedule": "constant", "size": [64, 64],
        "model_options": dict(models.spec("maskrcnn").tiny_options), **overrides,
    }


@pytest.fixture(scope="module")
def instance_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("insttrain")
    raw, data = str(root / "raw"), str(root / "data")
    assert cli_main(["synth", raw, "--task", "instance", "--n", "12", "--size", "64", "--classes", "3"]) == 0
    assert cli_main(["ingest", raw, data, "--task", "instance", "--val-fraction", "0.25"]) == 0
    return root, data


@pytest.fixture(scope="module")
def trained(instance_data):
    from segray.api import train

    root, data = instance_data
    t0 = time.time()
    result = train(_config(data, str(root / "runs"), "mrcnn"))
    print(f"train 2 epochs {time.time() - t0:.1f} s")
    return result


@pytest.mark.slow
def test_train_maskrcnn_then_predict(instance_data, trained):
    from segray.api import predict

    root, data = instance_data
    result = trained
    history = result.history
    assert list(history["epoch"]) == [0, 1]
    for column in ("train_loss", "val_loss", "val_ap50", "val_ap", "val_pq", "lr", "train_images_per_s"):
        assert column in history.columns, column
    assert np.isfinite(history["train_loss"]).all() and np.isfinite(history["val_loss"]).all()
    assert "val_miou" not in history.columns
    # val has truth objects: AP50 is defined (0 for an untrained model is a value, not NaN).
    assert history["val_ap50"].between(0, 1).all()
    ended = json.loads(storage.read_text(os.path.join(result.run_uri, "ended.json")))
    assert ended["stopped"] == "epochs" and ended["epochs_done"] == 2
    best = json.loads(storage.read_text(os.path.join(result.run_uri, "model", "best.json")))
    assert best["epoch"] == result.best_epoch and "val_ap50" in best
    assert os.path.exists(os.path.join(result.run_uri, "model", "preprocessing.json"))
    assert storage.read_bytes(os.path.join(result.run_uri, "curves.png")).startswith(b"\x89PNG")

    out = str(root / "pred")
    t1 = time.time()
    predicted = predict({"model": result.run_uri, "input": data, "split": "val", "output": out, "batch_size": 2})
    predicted_s = time.time() - t1
    assert predicted.errors == [], predicted.errors
    assert predicted.summary["task"] == "instance"
    objects = pq.read_table(os.path.join(out, "instances.parquet"))
    assert "instance_id" in objects.schema.names
    assert len(os.listdir(os.path.join(out, "instances"))) == predicted.summary["images"] > 0
    print(f"predict {predicted_s:.1f} s; history {history[['train_loss', 'val_loss', 'val_ap50']].to_dict('records')}")


@pytest.mark.slow
def test_resume_one_more_epoch(instance_data, trained):
    """Resume for one more epoch: the history goes on from the checkpoint (its best is [AP50, -val loss])."""
    from segray.api import train

    root, data = instance_data
    result, history = trained, trained.history
    t2 = time.time()
    resumed = train(_config(data, str(root / "runs"), "mrcnn", epochs=3, resume=True))
    resumed_s = time.time() - t2
    assert list(resumed.history["epoch"]) == [0, 1, 2]
    assert resumed.history["train_loss"].iloc[:2].tolist() == history["train_loss"].tolist()
    assert json.loads(storage.read_text(os.path.join(result.run_uri, "ended.json")))["epochs_done"] == 3
    print(f"resume 1 epoch {resumed_s:.1f} s")


def test_task_mismatch_is_refused(instance_data, tmp_path):
    from segray.training import config_from, resolve

    root, data = instance_data
    with pytest.raises(ConfigError, match=r"model unet is a semantic segmentation model and .*data is an instance dataset"):
        resolve(config_from(_config(data, str(tmp_path), "u", model="unet", model_options={"depth": 2, "width": 8})))
    raw, sem = str(tmp_path / "raw"), str(tmp_path / "sem")
    assert cli_main(["synth", raw, "--n", "8", "--size", "32", "--classes", "3"]) == 0
    assert cli_main(["ingest", raw, sem, "--val-fraction", "0.25"]) == 0
    with pytest.raises(ConfigError, match=r"model maskrcnn is an instance segmentation model and .*sem is a semantic dataset"):
        resolve(config_from(_config(sem, str(tmp_path), "m", size=[32, 32])))
    with pytest.raises(ConfigError, match=r"foreground_oversample with the instance dataset"):
        resolve(config_from(_config(data, str(tmp_path), "f", crop=[32, 32], foreground_oversample=0.3)))


@pytest.mark.slow
def test_cli_train_unet_instance_then_predict(instance_data):
    """The bottom-up model goes through `segray train` (one epoch) and `segray predict` as Mask R-CNN does."""
    root, data = instance_data
    runs, out = str(root / "bu_runs"), str(root / "bu_pred")
    assert cli_main(["train", "--data", data, "--storage", runs, "--name", "bu", "--model", "unet-instance", "--epochs", "1",
                     "--batch-size", "2", "--workers", "1", "--lr", "3e-3", "--size", "64", "--schedule", "constant",
                     "--model-option", "depth=2", "--model-option", "width=8"]) == 0
    run = os.path.join(runs, "bu")
    history = pq.read_table(os.path.join(run, "history.parquet")).to_pandas()
    assert list(history["epoch"]) == [0] and np.isfinite(history["train_loss"]).all()
    assert history["val_ap50"].between(0, 1).all() and "val_miou" not in history.columns
    assert cli_main(["predict", "--model", run, "--input", data, "--split", "val", "--output", out, "--batch-size", "2"]) == 0
    summary = json.loads(storage.read_text(os.path.join(out, "summary.json")))
    assert summary["task"] == "instance" and summary["errors"] == 0 and summary["images"] == 3
    objects = pq.read_table(os.path.join(out, "instances.parquet")).to_pandas()
    maps = sorted(os.listdir(os.path.join(out, "instances")))
    assert len(maps) == 3
    import cv2

    for name in maps:  # every object row has its pixels in the 16-bit map, and only those ids are there
        ids = cv2.imread(os.path.join(out, "instances", name), cv2.IMREAD_UNCHANGED)
        rows = objects[objects["image_id"] == name[: -len(".png")]]
        assert ids.dtype == np.uint16 and ids.shape == (64, 64)
        assert sorted(rows["instance_id"]) == sorted(int(v) for v in np.unique(ids) if v)
    assert objects["score"].between(0, 1).all() and objects["class_id"].between(1, 2).all()
    assert {"ap50", "pq"} <= set(pq.read_table(os.path.join(out, "per_class.parquet")).schema.names)
