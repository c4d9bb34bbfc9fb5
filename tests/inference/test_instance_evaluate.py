"""segray evaluate on instance maps: a predict's OUT/instances against the ingested dataset or the raw instance-ids folder."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from segray import storage
from segray.cli import main as cli_main
from segray.config import ConfigError
from tests.instance_run import instance_run

pytestmark = pytest.mark.usefixtures("ray_cluster")
SCORES = ("ap", "ap50", "ap75", "ar100", "pq", "sq", "rq", "miou", "mean_dice", "truth_objects", "predicted_objects")


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    return instance_run(tmp_path_factory.mktemp("insteval"))


def _same(a, b) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return bool(np.isclose(a, b, rtol=0, atol=1e-12))


def _check_equal_to_predict(out: str, predict_out: str) -> dict:
    summary = json.loads(storage.read_text(os.path.join(out, "summary.json")))
    want = json.loads(storage.read_text(os.path.join(predict_out, "summary.json")))
    assert summary["task"] == "instance" and summary["images"] == want["images"]
    for key in SCORES:
        assert _same(summary[key], want[key]), (key, summary[key], want[key])
    got_pc = pd.read_parquet(os.path.join(out, "per_class.parquet"))
    want_pc = pd.read_parquet(os.path.join(predict_out, "per_class.parquet"))
    assert list(got_pc.columns) == list(want_pc.columns)
    pd.testing.assert_frame_equal(got_pc.drop(columns=["model_id"]), want_pc.drop(columns=["model_id"]), check_exact=False, rtol=1e-12)
    columns = ["image_id", "instance_id", "class_id", "class_name", "score", "y1", "x1", "y2", "x2", "area", "truth_id", "iou", "model_id"]
    got_objects = pd.read_parquet(os.path.join(out, "instances.parquet"))[columns]
    want_objects = pd.read_parquet(os.path.join(predict_out, "instances.parquet"))[columns]
    pd.testing.assert_frame_equal(got_objects, want_objects)
    assert len(want_objects) > 0
    return summary


def test_evaluate_a_predict_gives_its_numbers(predicted, tmp_path):
    from segray.api import evaluate

    out = str(tmp_path / "ev")
    # Task, split and model inferred: PRED is a predict's instances/ folder, TRUTH the dataset it read.
    result = evaluate({"pred": os.path.join(predicted.out, "instances"), "truth": predicted.data, "output": out})
    assert result.errors == [], result.errors
    summary = _check_equal_to_predict(out, predicted.out)
    assert summary["model_id"] == predicted.result.summary["model_id"]
    quality = pd.read_parquet(os.path.join(out, "instance_images.parquet"))
    pd.testing.assert_frame_equal(quality, pd.read_parquet(os.path.join(predicted.out, "instance_images.parquet")))
    assert len(quality) == summary["images"] and (quality.truth_objects > 0).all()
    # An image's PQ from its row: matched IoUs summed over tp + fp/2 + fn/2 (the table's own counts agree).
    objects = pd.read_parquet(os.path.join(out, "instances.parquet"))
    for row in quality.itertuples():
        mine = objects[objects.image_id == row.image_id]
        tp = int(mine.truth_id.notna().sum())
        assert (row.tp, row.fp) == (tp, len(mine) - tp)
        denominator = row.tp + 0.5 * row.fp + 0.5 * row.fn
        assert np.isclose(row.pq, mine.iou[mine.truth_id.notna()].sum() / denominator) if denominator else np.isnan(row.pq)
    # The query view reads an evaluate output too.
    from segray.reporting.query import OutputTables

    assert len(OutputTables(out).sql("SELECT * FROM instances")) == len(objects)


def test_evaluate_against_the_raw_instance_folder(predicted, tmp_path):
    out = str(tmp_path / "raw_ev")
    code = cli_main(["evaluate", "--pred", os.path.join(predicted.out, "instances"), "--truth", predicted.raw, "--output", out,
                     "--task", "instance", "--instance-layout", "instance-ids"])
    assert code == 0
    _check_equal_to_predict(out, predicted.out)
    errors = pd.read_parquet(os.path.join(out, "_errors.parquet"))
    # The train half of the raw folder has no prediction, and says so.
    assert len(errors) == 3 and errors.reason.str.contains("truth has no prediction").all()


def test_maps_without_their_table_are_class_1_with_score_1(predicted, tmp_path):
    from segray.api import evaluate

    pred = str(tmp_path / "maps")
    shutil.copytree(os.path.join(predicted.out, "instances"), pred)
    result = evaluate({"pred": pred, "truth": predicted.data, "split": "val", "output": str(tmp_path / "ev")})
    objects = pd.read_parquet(os.path.join(tmp_path, "ev", "instances.parquet"))
    assert len(objects) == predicted.result.summary["objects"]
    assert set(objects.class_id) == {1} and set(objects.score) == {1.0}
    assert result.summary["task"] == "instance" and result.summary["model_id"] is None


def test_refusals(predicted, tmp_path):
    from segray.api import evaluate

    pred = os.path.join(predicted.out, "instances")
    with pytest.raises(ConfigError, match="layout ids reads semantic truth masks"):
        evaluate({"pred": pred, "truth": predicted.raw, "output": str(tmp_path / "a"), "layout": "ids", "task": "instance"})
    with pytest.raises(ValueError, match="name the split"):
        evaluate({"pred": str(tmp_path), "truth": predicted.data, "output": str(tmp_path / "b"), "task": "instance"})
