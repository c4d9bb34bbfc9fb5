"""Flags, models, inputs and OUT are checked before any Ray work starts (no Ray here)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from segray import storage
from segray.config import ConfigError
from segray.data.imageio import encode_png
from segray.data.info import ClassInfo, DatasetInfo
from segray.config import PredictConfig
from segray.runs import resolve_model
from segray.runs import load_keras
from segray.inference.output import Output, claim
from segray.inference.pipeline import resolve_geometry
from segray.inference.sources import list_source
from tests.inference.helpers import CLASS_NAMES, preprocessing, save_keras, tiny_unet, write_raw


def cfg(**kw) -> PredictConfig:
    return PredictConfig(**{"model": "m", "input": "i", "output": "o", **kw})


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"workers": 1.5}, "workers"),
        ({"gpus_per_worker": -1}, "gpus_per_worker"),
        ({"overlap": 0.95}, "overlap"),
        ({"tile": [32]}, "tile"),
        ({"tile": [32, 0]}, "tile"),
        ({"overlays": -1}, "overlays"),
        ({"split": "a/b"}, "split"),
        ({"model": ""}, "model"),
        ({"min_component": -1}, "min_component"),
        ({"tta": "flips"}, "tta"),
        ({"weighting": "box"}, "weighting"),
    ],
)
def test_bad_values_raise_naming_the_field(kw, field):
    with pytest.raises(ConfigError) as raised:
        cfg(**kw)
    assert raised.value.field == field and str(raised.value).startswith(field), str(raised.value)


def test_config_is_strict_and_round_trips():
    c = cfg(tile=(64, 48), gpus_per_worker=1)
    assert c.tile == [64, 48] and c.gpus_per_worker == 1.0
    assert PredictConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown config key.*batchsize"):
        PredictConfig.from_dict({**c.to_dict(), "batchsize": 4})
    with pytest.raises(ConfigError, match="batch_size"):
        PredictConfig.from_dict({**c.to_dict(), "batch_size": "4"})


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "net.keras")
    save_keras(tiny_unet(), path)
    return path


def test_keras_file_without_preprocessing_warns_and_assumes(keras_file):
    with pytest.warns(UserWarning, match="no preprocessing.json.*mean 0, std 1.*class_0..class_2"):
        spec = resolve_model(keras_file)
    assert [c.name for c in spec.classes] == ["class_0", "class_1", "class_2"]
    assert spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)
    assert spec.size is None and spec.multiple == 4
    assert len(spec.model_id) == 16 and spec.warnings


def make_run(root, keras_file: str, pre: dict) -> str:
    (root / "model").mkdir(parents=True)
    shutil.copy(keras_file, root / "model" / "model.keras")
    (root / "model" / "preprocessing.json").write_text(json.dumps(pre))
    return str(root)


def test_run_folder_and_model_folder_read_preprocessing(tmp_path, keras_file):
    run = make_run(tmp_path / "run", keras_file, preprocessing([32, 32]))
    a, b = resolve_model(run), resolve_model(str(tmp_path / "run" / "model"))
    assert a == b
    assert a.size == (32, 32) and a.mean == tuple(preprocessing([32, 32])["mean"])
    assert [c.name for c in a.classes] == ["background", "circle", "rectangle"] and not a.warnings
    # The id hashes the weights, not the file: saved again (new timestamps), the id stays.
    save_keras(load_keras(keras_file), str(tmp_path / "again.keras"))
    assert open(tmp_path / "again.keras", "rb").read() != open(keras_file, "rb").read()
    storage.write_text(str(tmp_path / "preprocessing.json"), json.dumps(preprocessing(None)))
    again = resolve_model(str(tmp_path / "again.keras"))
    assert again.model_id == a.model_id and again.preprocessing_uri == str(tmp_path / "preprocessing.json")


def test_missing_model_and_mismatched_preprocessing(tmp_path, keras_file):
    with pytest.raises(FileNotFoundError, match=r"model/model.keras"):
        resolve_model(str(tmp_path / "nothing"))
    run = make_run(tmp_path / "run", keras_file, preprocessing(None, ["a", "b"]))
    with pytest.raises(ValueError, match="declares 2 classes.*outputs 3 channels"):
        resolve_model(run)


def test_tile_must_suit_the_model(keras_file):
    with pytest.warns(UserWarning):
        spec = resolve_model(keras_file)
    with pytest.raises(ValueError, match=r"^tile 30x32.*divisible by 4; nearest valid height 28 or 32"):
        resolve_geometry(cfg(tile=[30, 32]), spec)
    g = resolve_geometry(cfg(tile=[32, 48], overlap=0.25), spec)
    assert g.mode == "tile" and g.tile == (32, 48) and g.overlap == (8, 12)
    assert resolve_geometry(cfg(), spec).mode == "whole"


def test_inputs_are_recognised(tmp_path):
    raw = str(tmp_path / "raw")
    write_raw(raw, {"a": (8, 8), "b": (8, 12)})
    storage.write_bytes(str(tmp_path / "raw" / "images" / "c.png"), encode_png(np.zeros((4, 4, 3), np.uint8)))
    s = list_source(raw)
    assert s.kind == "raw" and s.has_truth and s.ids == ["a", "b"]
    assert [r for _, r in s.errors] == [f"{tmp_path}/raw/images/c.png: image has no mask (id 'c')"]
    bare = str(tmp_path / "bare")
    write_raw(bare, {"x": (8, 8)}, masks=False)
    assert not list_source(bare).has_truth
    with pytest.raises(FileNotFoundError, match="^split val: .* not an ingested dataset"):
        list_source(raw, split="val")
    with pytest.raises(FileNotFoundError, match="expected a raw layout"):
        list_source(str(tmp_path / "empty"))
    info = DatasetInfo(
        classes=[ClassInfo(k, n) for k, n in enumerate(CLASS_NAMES)], splits={"train": 3, "val": 1}, pixel_counts=[1, 1, 1],
        pixel_frequency={n: 1 / 3 for n in CLASS_NAMES}, mean=[0.0] * 3, std=[1.0] * 3, layout="ids", source="x", command="",
    )
    storage.write_text(str(tmp_path / "ds" / "dataset.json"), info.to_json())
    with pytest.raises(ValueError, match="ingested dataset; name the split to predict with `split` \\(train, val, or all\\)"):
        list_source(str(tmp_path / "ds"))
    with pytest.raises(FileNotFoundError, match="^split val: no Parquet shards"):
        list_source(str(tmp_path / "ds"), split="val")


def test_out_is_claimed_once(tmp_path):
    out = Output(str(tmp_path / "out"))
    claim(out, {"model_id": "a", "source": "s"})
    claim(out, {"model_id": "a", "source": "s"})  # same run: resumes
    with pytest.raises(FileExistsError, match=r"holds results of another run \(model_id: 'a' there, 'b' now\)"):
        claim(out, {"model_id": "b", "source": "s"})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a segray results folder"):
        claim(Output(str(other)), {"model_id": "a"})
