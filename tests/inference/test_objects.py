"""One row per predicted object, the instance per-class table, and semantic tables made from objects."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segray.inference import OBJECTS_SCHEMA, instance_per_class_frame, objects_table
from segray.inference.tables import ok_record, records_table, score_tables
from segray.metrics import InstanceMetrics, semantic_from_instances

# Truth (4 x 6): object 1 (class 1) the left 2x2 block, object 2 (class 2) the right 2x3 block.
TRUTH = np.array(
    [
        [1, 1, 0, 2, 2, 2],
        [1, 1, 0, 2, 2, 2],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]
)
# Prediction: object 1 (class 2, score 0.9) covers truth 2 plus one more pixel: IoU 6/7, matched;
# object 2 (class 1, 0.4) is truth 1's top row: IoU 2/4, not > 0.5, unmatched; object 3 (class 1, 0.7) a stray pixel.
PRED = np.array(
    [
        [2, 2, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 0, 1],
        [3, 0, 0, 0, 0, 0],
    ],
    np.uint16,
)
NAMES = ["background", "cell", "debris"]


def test_one_row_per_object_hand_worked():
    table = objects_table(PRED, [2, 1, 1], [0.9, 0.4, 0.7], TRUTH, [1, 2], image_id="a", class_names=NAMES, model_id="m1")
    assert table.schema == OBJECTS_SCHEMA
    rows = table.to_pylist()
    assert [r["instance_id"] for r in rows] == [1, 2, 3]
    assert [r["class_name"] for r in rows] == ["debris", "cell", "cell"]
    assert [(r["y1"], r["x1"], r["y2"], r["x2"]) for r in rows] == [(0, 3, 3, 6), (0, 0, 1, 2), (3, 0, 4, 1)]
    assert [r["area"] for r in rows] == [7, 2, 1]
    assert [r["truth_id"] for r in rows] == [2, None, None]
    assert rows[0]["iou"] == pytest.approx(6 / 7) and rows[1]["iou"] == 0.5 and rows[2]["iou"] == 0.0
    assert {r["image_id"] for r in rows} == {"a"} and {r["model_id"] for r in rows} == {"m1"}


def test_without_truth_match_columns_are_null():
    rows = objects_table(PRED, [2, 1, 1], [0.9, 0.4, 0.7]).to_pylist()
    assert [r["truth_id"] for r in rows] == [None] * 3 and [r["iou"] for r in rows] == [None] * 3
    assert [r["class_name"] for r in rows] == ["2", "1", "1"]


def test_padding_ids_have_no_row():
    assert objects_table(PRED, [2, 0, 1, 0], [0.9, 0.0, 0.7, 0.0])["instance_id"].to_pylist() == [1, 3]


def test_table_matches_agree_with_the_pq_counts():
    metrics = InstanceMetrics(num_classes=3)
    metrics.add("a", TRUTH, [1, 2], PRED, [2, 1, 1], [0.9, 0.4, 0.7])
    frame = instance_per_class_frame(metrics, NAMES, "m1")
    rows = objects_table(PRED, [2, 1, 1], [0.9, 0.4, 0.7], TRUTH, [1, 2]).to_pylist()
    matched = sum(r["truth_id"] is not None for r in rows)
    assert int(frame["tp"].sum()) == matched == 1
    assert frame["class_name"].tolist() == ["cell", "debris"]
    assert frame["pq"].tolist() == pytest.approx([0.0, 6 / 7])  # class 2: one TP of IoU 6/7, nothing else
    # COCO matches at IoU >= 0.5: object 2 (IoU exactly 1/2) is a TP for AP50 though not for PQ;
    # class 1 ranks the stray (0.7, FP) above it (0.4, TP): precision 1/2 at every recall point.
    assert frame["ap50"].tolist() == pytest.approx([0.5, 1.0])
    # IoU 6/7 = 0.857 matches at the thresholds 0.50..0.85 (8 of 10), not at 0.90 and 0.95.
    assert frame["ap"][1] == pytest.approx(8 / 10)


def test_semantic_tables_from_objects_equal_tables_from_class_maps():
    truth_semantic = semantic_from_instances(TRUTH, [1, 2])
    pred_semantic = semantic_from_instances(PRED, [2, 1, 1])
    assert pred_semantic.tolist() == [[1, 1, 0, 2, 2, 2], [0, 0, 0, 2, 2, 2], [0, 0, 0, 0, 0, 2], [1, 0, 0, 0, 0, 0]]
    records = records_table([ok_record("a", "/x/a.png", 4, 6, truth_semantic, pred_semantic, 255, 1)])
    summary, frames = score_tables(records, NAMES)
    # Class 2 (debris): tp 6, fp 1, fn 0 -> IoU 6/7.
    assert frames["per_class"]["iou"].tolist()[2] == pytest.approx(6 / 7)
    assert summary["pixels"] == 24
