"""dataset.json is checked field by field: a hand-edited file gives a message naming the field, not a KeyError."""

from __future__ import annotations

import json

import pytest

from segray.cli import main as cli_main
from segray.config import ConfigError
from segray.data.info import ClassInfo, DatasetInfo, load_dataset_info

NAMES = ["background", "cell", "membrane"]


def valid() -> dict:
    info = DatasetInfo(
        classes=[ClassInfo(k, n) for k, n in enumerate(NAMES)], splits={"train": 8, "val": 2}, pixel_counts=[70, 20, 10],
        pixel_frequency={"background": 0.7, "cell": 0.2, "membrane": 0.1}, mean=[120.0, 110.0, 100.0], std=[30.0, 30.0, 30.0],
        layout="ids", source="raw", command="",
    )
    return json.loads(info.to_json())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("classes"), "classes is required"),
        (lambda d: d.pop("splits"), "splits is required"),
        (lambda d: d.update(classes=[{"id": 0, "name": "a"}, {"id": 2, "name": "b"}]), "class ids must be 0..C-1 without gaps"),
        (lambda d: d.update(classes=[{"id": 0, "name": "a"}, {"id": 1, "name": "b"}, {"id": 2, "name": "b"}]), "class names repeat: ['b']"),
        (lambda d: d.update(num_classes=5), "num_classes is 5 but classes lists 3"),
        (lambda d: d.update(splits={"train": -1, "val": 2}), "splits.train must be a count of images"),
        (lambda d: d.update(std=[30.0, 0.0, 30.0]), "std positive"),
        (lambda d: d.update(mean="grey"), "mean: expected a list"),
        (lambda d: d["pixel_frequency"].pop("cell"), "pixel_frequency names"),
        (lambda d: d.update(pixel_counts=[1]), "pixel_counts holds 1 values for 3 classes"),
        (lambda d: d.update(size=[0, 64]), "size must be [H, W]"),
        (lambda d: d.update(format="other/9"), "format 'other/9'"),
        (lambda d: d.update(layuot="ids"), "unknown config key.*layuot"),
    ],
)
def test_a_broken_dataset_json_names_the_field(tmp_path, edit, message):
    data = valid()
    edit(data)
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")) as raised:
        load_dataset_info(str(tmp_path))
    assert str(tmp_path / "dataset.json") in str(raised.value)


def test_cli_reports_it_in_one_line(tmp_path, capsys):
    data = valid()
    data.pop("mean")
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    assert cli_main(["train", "--data", str(tmp_path), "--storage", str(tmp_path / "runs"), "--name", "r"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset.json: mean is required" in err and "Traceback" not in err


def test_a_valid_file_round_trips(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps(valid()))
    info = load_dataset_info(str(tmp_path))
    assert info.class_names == NAMES and DatasetInfo.from_json(info.to_json()) == info
