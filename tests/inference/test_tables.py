"""Records -> tables against independent numpy computations (no Ray, no TensorFlow)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segray.inference import format_per_class, read_confusion
from segray.inference.tables import (
    OK,
    dense_counts,
    error_record,
    latest_records,
    ok_record,
    per_class_frame,
    per_image_frame,
    record_cells,
    records_table,
    score_tables,
)
from segray.inference.output import Output, write_results
from segray.metrics import confusion_matrix, sparse_confusion
from tests.inference.helpers import assert_frames_match, oracle_tables

NAMES = ["background", "road", "car", "sky", "never"]  # class 4 appears nowhere


def random_masks(rng: np.random.Generator, n: int, num_classes: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{id: (truth, pred)} of varied sizes; truth has 255 pixels, some images lack some classes."""
    pairs = {}
    for i in range(n):
        h, w = int(rng.integers(3, 20)), int(rng.integers(3, 20))
        present = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
        truth = rng.choice(present, size=(h, w)).astype(np.uint8)
        truth[rng.random((h, w)) < 0.15] = 255
        pred = rng.choice(present if rng.random() < 0.5 else np.arange(num_classes), size=(h, w)).astype(np.uint8)
        pairs[f"img{i:03d}"] = (truth, pred)
    # One image entirely ignored: no valid class, left out of the mean of images.
    pairs["all_ignored"] = (np.full((4, 5), 255, np.uint8), np.zeros((4, 5), np.uint8))
    return pairs


def records_of(pairs, run: int = 1) -> pa.Table:
    return records_table([ok_record(k, f"/x/{k}.png", t.shape[0], t.shape[1], t, p, 255, run) for k, (t, p) in sorted(pairs.items())])


def test_hand_computed_image():
    truth = np.array([[0, 0, 1], [1, 255, 2]], np.uint8)
    pred = np.array([[0, 1, 1], [1, 2, 0]], np.uint8)
    # Counted pixels (truth 255 left out), rows truth, columns prediction:
    #        p0 p1 p2
    #   t0 [  1  1  0 ]
    #   t1 [  0  2  0 ]
    #   t2 [  1  0  0 ]
    # class 3 is in neither: NaN.
    counts = dense_counts(records_table([ok_record("x", "/x", 2, 3, truth, pred, 255, 1)]), 4)
    np.testing.assert_array_equal(counts["confusion"], [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    row = per_image_frame(["x"], counts, ["a", "b", "c", "d"])
    assert row["tp"].tolist() == [1, 2, 0, 0] and row["fp"].tolist() == [1, 1, 0, 0] and row["fn"].tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(row["iou"][:3], [1 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(row["dice"][:3], [0.5, 0.8, 0.0])
    assert math.isnan(row["iou"][3]) and math.isnan(row["dice"][3])


def test_tables_equal_an_independent_computation():
    pairs = random_masks(np.random.default_rng(0), 40)
    records = records_of(pairs)
    counts = dense_counts(records, len(NAMES))
    per_image = per_image_frame(records["image_id"].to_pylist(), counts, NAMES, "m1")
    per_class = per_class_frame(counts["confusion"], NAMES, "m1")
    want_image, want_class, want_cm = oracle_tables(pairs, NAMES)
    want_image["model_id"] = want_class["model_id"] = "m1"
    assert_frames_match(per_image, want_image)
    assert_frames_match(per_class, want_class)
    np.testing.assert_array_equal(counts["confusion"], want_cm)
    # The class found nowhere is NaN on every score, in every row.
    assert per_image[per_image["class_name"] == "never"]["iou"].isna().all()
    assert per_class.set_index("class_name").loc["never"].drop(["class_id", "support", "model_id"]).isna().all()
    # The all-ignored image has rows, every score NaN.
    ignored = per_image[per_image["image_id"] == "all_ignored"]
    assert len(ignored) == len(NAMES) and ignored["iou"].isna().all() and (ignored["support"] == 0).all()


def test_confusion_of_many_blocks_equals_one_pass():
    rng = np.random.default_rng(1)
    pairs = random_masks(rng, 60)
    ids = sorted(pairs)
    # Blocks of random sizes, written in a shuffled order, some ids repeated by a retried task.
    cuts = np.sort(rng.choice(np.arange(1, len(ids)), size=9, replace=False))
    blocks = [records_of({k: pairs[k] for k in chunk}) for chunk in np.split(np.array(ids), cuts)]
    blocks.append(records_of({k: pairs[k] for k in ids[:5]}, run=2))
    order = rng.permutation(len(blocks))
    merged = latest_records(pa.concat_tables([blocks[i] for i in order])).sort_by("image_id")
    assert merged["image_id"].to_pylist() == ids
    summed = dense_counts(merged, len(NAMES))["confusion"]
    truth = np.concatenate([pairs[k][0].ravel() for k in ids])
    pred = np.concatenate([pairs[k][1].ravel() for k in ids])
    np.testing.assert_array_equal(summed, confusion_matrix(truth, pred, len(NAMES)))
    keep = truth != 255
    one_pass = np.bincount(truth[keep].astype(np.int64) * len(NAMES) + pred[keep], minlength=len(NAMES) ** 2).reshape(len(NAMES), -1)
    np.testing.assert_array_equal(summed, one_pass)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 12), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**32 - 1)
)
def test_sparse_cells_hold_the_image_matrix(h, w, c, seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, c, (h, w)).astype(np.uint8)
    truth[rng.random((h, w)) < 0.3] = 255
    pred = rng.integers(0, c, (h, w)).astype(np.uint8)
    cells, counts = sparse_confusion(truth, pred, 255)
    dense = np.zeros((256, 256), np.int64)
    dense[cells // 256, cells % 256] = counts
    np.testing.assert_array_equal(dense[:c, :c], confusion_matrix(truth, pred, c))
    assert dense.sum() == (truth != 255).sum()


@pytest.mark.parametrize("num_classes", [1, 2, 5, 40])
def test_record_cells_give_each_images_matrix_and_the_tables_sum(num_classes):
    """The one reading of records' cells (tables, evaluate and query use it) against per-image matrices from the masks."""
    rng = np.random.default_rng(num_classes)
    pairs = {}
    for i in range(12):
        h, w = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        truth = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
        truth[rng.random((h, w)) < 0.2] = 255
        pairs[f"img{i:02d}"] = (truth, rng.integers(0, num_classes, (h, w)).astype(np.uint8))
    records = records_of(pairs)
    cells = record_cells(records)
    ids = records["image_id"].to_pylist()
    for row, image_id in enumerate(ids):
        truth, pred = pairs[image_id]
        mine = cells.owner == row
        dense = np.zeros((num_classes, num_classes), np.int64)
        dense[cells.truth[mine], cells.pred[mine]] = cells.pixels[mine]
        np.testing.assert_array_equal(dense, confusion_matrix(truth, pred, num_classes), err_msg=image_id)
    want = sum(confusion_matrix(t, p, num_classes) for t, p in pairs.values())
    np.testing.assert_array_equal(dense_counts(records, num_classes)["confusion"], want)
    empty = record_cells(records_table([]))
    assert all(len(a) == 0 for a in empty)


def test_latest_record_wins_and_ok_beats_error():
    t = np.zeros((2, 2), np.uint8)
    table = records_table(
        [
            error_record("a", "/a", "old error", 1),
            ok_record("a", "/a", 2, 2, t, t, 255, 2),
            error_record("a", "/a", "later error", 3),  # an ok record already exists
            error_record("b", "/b", "first", 1),
            error_record("b", "/b", "second", 2),
            ok_record("c", "/c", 2, 2, t, t, 255, 1),
            ok_record("c", "/c", 2, 2, t, t + 1, 255, 5),
        ]
    )
    latest = {r["image_id"]: r for r in latest_records(table).to_pylist()}
    assert sorted(latest) == ["a", "b", "c"]
    assert latest["a"]["status"] == OK and latest["a"]["run"] == 2
    assert latest["b"]["reason"] == "second"
    assert latest["c"]["run"] == 5


def test_class_id_beyond_the_classes_names_the_image():
    t = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="image 'x'.*class id 7 outside 0..2"):
        dense_counts(records_table([ok_record("x", "/x", 2, 2, t, t + 7, 255, 1)]), 3)


def test_written_tables_read_back(tmp_path):
    pairs = random_masks(np.random.default_rng(2), 10)
    scores, frames = score_tables(records_of(pairs), NAMES, "m2")
    result = write_results(Output(str(tmp_path)), frames, len(NAMES), scores, [])
    per_class = result.per_class
    assert (tmp_path / "summary.json").exists() and (tmp_path / "_errors.parquet").exists()
    want_image, want_class, want_cm = oracle_tables(pairs, NAMES)
    want_class["model_id"] = "m2"
    assert set(pd.read_parquet(tmp_path / "per_image.parquet")["model_id"]) == {"m2"}
    np.testing.assert_array_equal(read_confusion(str(tmp_path / "confusion.parquet")), want_cm)
    assert_frames_match(per_class, want_class)
    assert scores["images_scored"] == len(pairs)
    valid = want_class["iou"].notna()
    assert math.isclose(scores["miou"], want_class["iou"][valid].mean(), rel_tol=1e-12)
    assert scores["valid_classes"] == int(valid.sum())
    assert scores["pixels"] == int(want_cm.sum())


def test_format_per_class_shows_every_class_and_nan_as_dash():
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    text = format_per_class(per_class_frame(cm, ["background", "road", "absent"]))
    lines = text.splitlines()
    assert "IoU" in lines[0] and "support" in lines[0]
    absent = next(line for line in lines if "absent" in line)
    assert absent.split()[2:6] == ["-", "-", "-", "-"]
    assert "0.625" in next(line for line in lines if "background" in line)  # 5 / (5 + 2 + 1)
    assert "mean of 2 valid" in lines[-1]
