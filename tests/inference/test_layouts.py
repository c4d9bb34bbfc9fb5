"""predict and evaluate on a held-out folder in the training data's own layout (per-class, palette), and ``split all``."""

from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from segray import storage
from segray.cli import main as cli_main
from segray.config import ConfigError, EvaluateConfig, IngestConfig, PredictConfig
from segray.data import ingest
from segray.data.imageio import decode_mask, encode_png
from segray.inference import evaluate, predict
from tests.conftest import EPFL_MINI
from tests.inference.helpers import classes_json, preprocessing, save_keras, tiny_unet, write_run

pytestmark = pytest.mark.usefixtures("ray_cluster")

ORDER = ["membranes", "mitochondrion", "mitochondrial boundaries", "PSD", "vesicles", "axon"]
PRIORITY = ["mitochondrial boundaries", "PSD", "vesicles", "mitochondrion", "membranes", "axon"]
NAMES = ["background", *ORDER]
IDS = ["training0000", "training0001", "training0002"]
TABLES = ("per_image.parquet", "per_class.parquet", "confusion.parquet")


def painted_truth(image_id: str, priority: list[str] = PRIORITY) -> np.ndarray:
    """The class-id mask of one EPFL slice, read from its layer files independently: the first class in priority that sets a pixel."""
    truth = None
    taken = None
    for name in priority:
        layer = cv2.imread(os.path.join(EPFL_MINI, name, image_id + ".png"), cv2.IMREAD_UNCHANGED)[..., :3].max(2) > 127
        if truth is None:
            truth, taken = np.zeros(layer.shape, np.uint8), np.zeros(layer.shape, bool)
        on = layer & ~taken
        truth[on] = ORDER.index(name) + 1
        taken |= on
    return truth


@pytest.fixture(scope="module")
def epfl_run(tmp_path_factory):
    """A tiny 7-class U-Net saved as a run trained on the per-class EPFL layout, with its priority recorded."""
    run = str(tmp_path_factory.mktemp("epfl") / "run")
    save_keras(tiny_unet(num_classes=len(NAMES), seed=3), storage.join(run, "model", "model.keras"))
    storage.write_text(storage.join(run, "model", "preprocessing.json"), json.dumps({**preprocessing(None, NAMES), "priority": PRIORITY}))
    return run


def test_a_held_out_per_class_folder_is_scored_in_one_command(epfl_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    # Class order and priority come from the model: the folder is read as the model's training data was.
    code = cli_main(["predict", "--model", epfl_run, "--input", EPFL_MINI, "--output", out, "--layout", "per-class", "--images-dir", "slices"])
    assert code == 0, capsys.readouterr().err
    per_image = pd.read_parquet(f"{out}/per_image.parquet")
    summary = json.loads(open(f"{out}/summary.json").read())
    assert summary["images"] == 3 and summary["has_truth"] and summary["errors"] == 0
    for image_id in IDS:
        truth = painted_truth(image_id)
        pred = decode_mask(storage.read_bytes(f"{out}/masks/{image_id}.png"))
        rows = per_image[per_image["image_id"] == image_id].sort_values("class_id")
        assert rows["support"].tolist() == [int((truth == k).sum()) for k in range(len(NAMES))]
        assert rows["tp"].tolist() == [int(((truth == k) & (pred == k)).sum()) for k in range(len(NAMES))]
    # The same slices ingested (train and val) and predicted with --split all give the same tables.
    data = str(tmp_path / "data")
    info = ingest(IngestConfig(source=EPFL_MINI, destination=data, layout="per-class", images_dir="slices", class_order=ORDER, priority=PRIORITY, val_fraction=0.34)).info
    assert info.splits == {"train": 2, "val": 1}
    both = str(tmp_path / "all")
    result = predict(PredictConfig(model=epfl_run, input=data, split="all", output=both))
    assert result.summary["images"] == 3
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(f"{both}/{name}"), pd.read_parquet(f"{out}/{name}"))


def test_evaluate_reads_the_truth_in_its_layout(epfl_run, tmp_path):
    out = str(tmp_path / "out")
    predict(PredictConfig(model=epfl_run, input=EPFL_MINI, output=out, layout="per-class", images_dir="slices"))
    scored = str(tmp_path / "scored")
    result = evaluate(EvaluateConfig(pred=f"{out}/masks", truth=EPFL_MINI, output=scored, layout="per-class", images_dir="slices"))
    assert list(result.per_class["class_name"]) == NAMES
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(f"{scored}/{name}"), pd.read_parquet(f"{out}/{name}"))
    # Another class order than the predictions': refused, naming both.
    swapped = ["membranes", "mitochondrial boundaries", "mitochondrion", "PSD", "vesicles", "axon"]
    with pytest.raises(ValueError, match=r"class_order: .*\[background, membranes, mitochondrial boundaries, mitochondrion, .*\[background, membranes, mitochondrion, mitochondrial boundaries"):
        evaluate(EvaluateConfig(pred=f"{out}/masks", truth=EPFL_MINI, output=str(tmp_path / "x"), layout="per-class", images_dir="slices", class_order=swapped))


def test_a_class_order_or_priority_other_than_the_models_is_refused(epfl_run, tmp_path, capsys):
    swapped = ["membranes", "mitochondrial boundaries", "mitochondrion", "PSD", "vesicles", "axon"]
    common = ["predict", "--model", epfl_run, "--input", EPFL_MINI, "--layout", "per-class", "--images-dir", "slices"]
    assert cli_main([*common, "--output", str(tmp_path / "a"), "--class-order", ",".join(swapped)]) == 2
    err = capsys.readouterr().err
    assert "--class-order: " in err and "[background, membranes, mitochondrial boundaries, mitochondrion, PSD, vesicles, axon]" in err, err
    assert "predicts [background, membranes, mitochondrion, mitochondrial boundaries, PSD, vesicles, axon]" in err, err
    assert cli_main([*common, "--output", str(tmp_path / "b"), "--priority", ",".join(ORDER)]) == 2
    err = capsys.readouterr().err
    assert f"--priority [{', '.join(ORDER)}] differs" in err and f"[{', '.join(PRIORITY)}]" in err, err
    # A held-out folder that lacks one of the model's class folders: the message says the order came from the model.
    partial = tmp_path / "partial"
    shutil.copytree(EPFL_MINI, partial, ignore=shutil.ignore_patterns("axon"))
    assert cli_main(["predict", "--model", epfl_run, "--input", str(partial), "--layout", "per-class", "--images-dir", "slices", "--output", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--class-order (the model's classes after background, membranes, mitochondrion" in err and "['axon'] not found" in err, err
    assert not any(os.path.exists(tmp_path / x) for x in "abd")  # refused before anything was written
    # Layout options without the layout, and a split with a raw layout, are refused at once.
    with pytest.raises(ConfigError, match="class_order is for the per-class layout"):
        PredictConfig(model=epfl_run, input=EPFL_MINI, output=str(tmp_path / "c"), class_order=ORDER)
    with pytest.raises(ConfigError, match="split 'val' is for an ingested dataset"):
        PredictConfig(model=epfl_run, input=EPFL_MINI, output=str(tmp_path / "c"), layout="per-class", split="val")


def test_a_palette_folder_is_read_with_its_colours_and_quarantine(tmp_path):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    run = write_run(str(tmp_path / "run"), None)
    colours = {c["id"]: c["color"] for c in classes_json()}
    storage.write_text(f"{raw}/classes.json", json.dumps(classes_json()))
    rng = np.random.default_rng(5)
    truths = {}
    for k in range(3):
        ids = rng.integers(0, 3, (16, 16)).astype(np.uint8)
        rgb = np.array([colours[i] for i in range(3)], np.uint8)[ids]
        storage.write_bytes(f"{raw}/images/p{k}.png", encode_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
        storage.write_bytes(f"{raw}/masks/p{k}.png", encode_png(rgb))  # encode_png takes RGB
        truths[f"p{k}"] = ids
    odd = np.zeros((16, 16, 3), np.uint8)
    odd[0, 0] = (1, 2, 3)
    storage.write_bytes(f"{raw}/images/odd.png", encode_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    storage.write_bytes(f"{raw}/masks/odd.png", encode_png(odd))
    result = predict(PredictConfig(model=run, input=raw, output=out, layout="palette"))
    assert result.summary["images"] == 3
    per_image = result.per_image
    for image_id, ids in truths.items():
        rows = per_image[per_image["image_id"] == image_id].sort_values("class_id")
        assert rows["support"].tolist() == [int((ids == k).sum()) for k in range(3)]
    (reason,) = [r for _, r in result.errors]
    assert "odd.png" in reason and "not in classes.json" in reason


def test_training_records_the_per_class_priority_the_model_was_trained_with(tmp_path):
    from types import SimpleNamespace

    from segray.runs import Preprocessing
    from segray.training.loop import preprocessing_of

    info = ingest(IngestConfig(source=EPFL_MINI, destination=str(tmp_path / "d"), layout="per-class", images_dir="slices", class_order=ORDER, priority=PRIORITY)).info
    pre = preprocessing_of(SimpleNamespace(model="unet", size=None, crop=None), info)
    assert pre.priority == tuple(PRIORITY)
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))).priority == tuple(PRIORITY)
    # Another layout records none, and its preprocessing.json reads as before.
    assert "priority" not in Preprocessing.from_dict(preprocessing(None)).to_dict()
