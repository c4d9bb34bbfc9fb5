"""predict with an instance model: synth -> ingest -> a few Mask R-CNN steps -> predict with truth, then a resume."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from segray import storage
from tests.instance_run import instance_run as shared_instance_run, split_rows

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def instance_run(tmp_path_factory):
    return shared_instance_run(tmp_path_factory.mktemp("inst"))


def _truth(data: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {k: (ids, classes) for k, (_, ids, classes) in split_rows(data, "val").items()}


def test_files_and_schemas(instance_run):
    from segray.inference.objects import OBJECTS_SCHEMA

    out = instance_run.out
    truth = _truth(instance_run.data)
    assert sorted(os.listdir(os.path.join(out, "instances"))) == sorted(f"{i}.png" for i in truth)
    assert sorted(os.listdir(os.path.join(out, "masks"))) == sorted(f"{i}.png" for i in truth)
    objects = pq.read_table(os.path.join(out, "instances.parquet"))
    assert objects.schema.names == OBJECTS_SCHEMA.names
    frame = objects.to_pandas()
    for image_id, (ids, _) in truth.items():
        pred = cv2.imread(os.path.join(out, "instances", f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        assert pred.dtype == np.uint16 and pred.shape == ids.shape
        # Every id in the PNG is one row of the table, and every row an id of the PNG.
        assert sorted(set(np.unique(pred)) - {0}) == sorted(frame[frame.image_id == image_id].instance_id), image_id
    assert set(frame.model_id) <= {instance_run.result.summary["model_id"]}
    per_class = pd.read_parquet(os.path.join(out, "per_class.parquet"))
    for column in ("iou", "dice", "ap", "ap50", "ap75", "pq", "sq", "rq"):
        assert column in per_class.columns
    summary = json.loads(storage.read_text(os.path.join(out, "summary.json")))
    assert summary["task"] == "instance" and summary["images"] == len(truth) and summary["objects"] == len(frame)
    for key in ("ap", "ap50", "ap75", "pq", "sq", "rq", "miou"):
        assert key in summary
    assert len(frame) > 0  # the AP / PQ comparisons below score real detections
    print({k: summary[k] for k in ("images", "objects", "truth_objects", "ap", "ap50", "pq", "miou", "wall_time_s")})


def test_per_class_equals_metrics_of_the_written_maps(instance_run):
    from segray.metrics import InstanceMetrics

    out = instance_run.out
    objects = pq.read_table(os.path.join(out, "instances.parquet")).to_pandas()
    metrics = InstanceMetrics(3)
    for image_id, (ids, classes) in _truth(instance_run.data).items():
        pred = cv2.imread(os.path.join(out, "instances", f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        rows = objects[objects.image_id == image_id].sort_values("instance_id")
        n = int(pred.max())
        pred_classes, scores = np.zeros(n, np.int64), np.zeros(n)
        pred_classes[rows.instance_id - 1], scores[rows.instance_id - 1] = rows.class_id, rows.score.astype(np.float64)
        metrics.add(image_id, ids, classes, pred, pred_classes, scores.astype(np.float32))
    # The records that travelled through Ray Data rows and parts equal the ones recomputed here
    # (scores, COCO matches, panoptic IoUs: non-trivial even where a few steps' model scores AP 0).
    from segray.inference.objects import objects_table

    parts = pd.concat([pd.read_parquet(os.path.join(out, "_instance_parts", f)) for f in os.listdir(os.path.join(out, "_instance_parts"))])
    for record in metrics.records:
        row = parts[parts.image_id == record["image_id"]].iloc[-1]
        for field in ("det_id", "det_class", "det_matched", "truth_classes", "tp_class", "fp_class", "fn_class"):
            assert list(row[field]) == list(record[field]), (record["image_id"], field)
        np.testing.assert_allclose(list(row["det_score"]), record["det_score"], rtol=1e-6)
        np.testing.assert_allclose(list(row["tp_iou"]), record["tp_iou"], rtol=1e-9)
    truth = _truth(instance_run.data)
    for image_id in truth:
        pred = cv2.imread(os.path.join(out, "instances", f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        rows = objects[objects.image_id == image_id].sort_values("instance_id")
        classes, scores = np.zeros(int(pred.max()), np.int64), np.zeros(int(pred.max()), np.float32)
        classes[rows.instance_id - 1], scores[rows.instance_id - 1] = rows.class_id, rows.score
        again = objects_table(pred, classes, scores, *truth[image_id], image_id).to_pandas()
        np.testing.assert_allclose(again.iou.to_numpy(), rows.iou.to_numpy())
        assert list(again.area) == list(rows.area) and list(again.truth_id.fillna(0)) == list(rows.truth_id.fillna(0))
    assert objects.iou.max() > 0  # some detection overlaps its class's truth
    expected = metrics.scores()
    per_class = pd.read_parquet(os.path.join(out, "per_class.parquet")).set_index("class_id")
    for k, c in enumerate(expected["class_id"]):
        for column in ("ap", "ap50", "ap75", "pq", "sq", "rq"):
            np.testing.assert_allclose(per_class.loc[int(c), column], expected[column][k], equal_nan=True, err_msg=f"{column} class {c}")
    summary = json.loads(storage.read_text(os.path.join(out, "summary.json")))
    got = summary["ap"]
    want = metrics.summary()["ap"]
    assert (got is None and np.isnan(want)) or np.isclose(got, want)


def test_resume_reproduces_the_tables(instance_run):
    from segray.api import predict

    out = instance_run.out
    names = ("instances.parquet", "per_class.parquet", "per_image.parquet", "confusion.parquet")
    before = {n: pd.read_parquet(os.path.join(out, n)) for n in names}
    victim = sorted(os.listdir(os.path.join(out, "instances")))[0][: -len(".png")]
    os.remove(os.path.join(out, "instances", f"{victim}.png"))
    os.remove(os.path.join(out, "masks", f"{victim}.png"))
    result = predict(instance_run.cfg)
    assert result.errors == [] and result.summary["errors"] == 0, result.errors
    assert result.summary["images_this_run"] == 1
    assert os.path.exists(os.path.join(out, "instances", f"{victim}.png"))
    for n in names:
        pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(out, n)), before[n], check_exact=False, rtol=1e-6)


def test_query_instances_view(instance_run):
    from segray.reporting.query import OutputTables

    tables = OutputTables(instance_run.out)
    got = tables.sql("SELECT image_id, count(*) AS n FROM instances GROUP BY image_id ORDER BY image_id")
    objects = pq.read_table(os.path.join(instance_run.out, "instances.parquet")).to_pandas()
    want = objects.groupby("image_id").size()
    assert dict(zip(got.image_id, got.n)) == {k: int(v) for k, v in want.items()}
    assert "ap" in tables.sql("SELECT * FROM per_class").columns
