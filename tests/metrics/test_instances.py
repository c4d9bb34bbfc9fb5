"""COCO-rule instance metrics and panoptic quality: against pycocotools' COCOeval, split-and-merge, hand-worked PQ."""

from __future__ import annotations

import contextlib
import io
import json
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segray.metrics import InstanceMetrics, match_image, object_boxes, semantic_from_instances


def paint(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """An instance map of up to ``count`` random overlapping ellipses (later ones on top), ids renumbered 1..K."""
    yy, xx = np.mgrid[:size, :size]
    ids = np.zeros((size, size), np.int64)
    for k in range(1, count + 1):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(3, size / 4, 2)
        ids[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = k
    present = np.unique(ids[ids > 0])
    lookup = np.zeros(count + 1, np.int64)
    lookup[present] = np.arange(1, len(present) + 1)
    return lookup[ids]


def perturb(rng: np.random.Generator, truth: np.ndarray, truth_classes: np.ndarray, num_classes: int):
    """A prediction: truth objects shifted, grown or shrunk, some dropped, some with the wrong class, extra objects."""
    from scipy import ndimage

    size = truth.shape[0]
    pred = np.zeros_like(truth)
    classes, k = [], 0
    for t in range(1, truth.max() + 1):
        if rng.random() < 0.2:
            continue  # missed
        mask = truth == t
        if rng.random() < 0.5:
            mask = np.roll(mask, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
        op = rng.integers(4)
        mask = ndimage.binary_dilation(mask) if op == 0 else ndimage.binary_erosion(mask) if op == 1 else mask
        if not mask.any():
            continue
        k += 1
        pred[mask] = k
        classes.append(truth_classes[t - 1] if rng.random() < 0.85 else rng.integers(1, num_classes))
    extra = paint(rng, size, int(rng.integers(0, 4)))
    for e in range(1, extra.max() + 1):
        k += 1
        pred[extra == e] = k
        classes.append(rng.integers(1, num_classes))
    # Pasting may hide whole objects: keep the ids with pixels, renumbered.
    present = np.unique(pred[pred > 0])
    lookup = np.zeros(k + 1, np.int64)
    lookup[present] = np.arange(1, len(present) + 1)
    classes = np.asarray(classes, np.int64)[present - 1] if len(present) else np.zeros(0, np.int64)
    # Scores on a coarse grid, so ties within and across images occur.
    scores = np.round(rng.uniform(0.05, 1.0, len(classes)), 1).astype(np.float32)
    return lookup[pred], classes, scores


def scenes(seed: int, n_images: int, num_classes: int, size: int = 48):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_images):
        truth = paint(rng, size, int(rng.integers(0, 9)))
        # Class num_classes - 1 never appears in truth (COCO gives it -1).
        truth_classes = rng.integers(1, num_classes - 1, truth.max()).astype(np.int64)
        pred, pred_classes, scores = perturb(rng, truth, truth_classes, num_classes)
        out.append((f"{i:04d}", truth, truth_classes, pred, pred_classes, scores))
    return out


def coco_eval(images, num_classes: int):
    """COCOeval (segm) on the same objects, RLE-encoded from the maps; returns the evaluator after accumulate."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def rle(mask):
        return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))

    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in range(1, num_classes)]}
    dets = []
    for image_id, truth, truth_classes, pred, pred_classes, scores in images:
        number = int(image_id)
        gt["images"].append({"id": number, "height": truth.shape[0], "width": truth.shape[1]})
        for t, c in enumerate(truth_classes, start=1):
            encoded = rle(truth == t)
            gt["annotations"].append(
                {"id": len(gt["annotations"]) + 1, "image_id": number, "category_id": int(c), "segmentation": encoded,
                 "area": float(mask_utils.area(encoded)), "bbox": list(mask_utils.toBbox(encoded)), "iscrowd": 0}
            )
        for p, (c, s) in enumerate(zip(pred_classes, scores), start=1):
            dets.append({"image_id": number, "category_id": int(c), "segmentation": rle(pred == p), "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        result = coco.loadRes(dets) if dets else COCO()
        evaluator = COCOeval(coco, result, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def accumulate(images, num_classes: int) -> InstanceMetrics:
    metrics = InstanceMetrics(num_classes)
    for image in images:
        metrics.add(*image)
    return metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_and_ar_equal_cocoeval(seed):
    num_classes = 5
    images = scenes(seed, 12, num_classes)
    evaluator = coco_eval(images, num_classes)
    metrics = accumulate(images, num_classes)
    per_class, summary = metrics.scores(), metrics.summary()

    precision = evaluator.eval["precision"][:, :, :, 0, 2]  # (T, R, K) area "all", maxDets 100
    recall = evaluator.eval["recall"][:, :, 0, 2]  # (T, K)
    t75 = list(evaluator.params.iouThrs).index(0.75)
    assert evaluator.params.catIds == list(range(1, num_classes))
    for k in range(num_classes - 1):
        if (precision[:, :, k] == -1).all():  # no truth of this class: COCO's -1, our NaN
            assert math.isnan(per_class["ap"][k]) and math.isnan(per_class["ar100"][k]) and per_class["truth"][k] == 0
            continue
        assert abs(per_class["ap"][k] - precision[:, :, k].mean()) < 1e-6
        assert abs(per_class["ap50"][k] - precision[0, :, k].mean()) < 1e-6
        assert abs(per_class["ap75"][k] - precision[t75, :, k].mean()) < 1e-6
        assert abs(per_class["ar100"][k] - recall[:, k].mean()) < 1e-6
    # stats: AP, AP50, AP75, ..., AR@100 at index 8.
    stats = evaluator.stats
    assert abs(summary["ap"] - stats[0]) < 1e-6
    assert abs(summary["ap50"] - stats[1]) < 1e-6
    assert abs(summary["ap75"] - stats[2]) < 1e-6
    assert abs(summary["ar100"] - stats[8]) < 1e-6
    assert summary["ap_classes"] == num_classes - 2
    assert 0.1 < summary["ap50"] < 0.95 and summary["ap75"] < summary["ap50"]  # neither trivial nor hopeless


def test_score_ties_break_as_cocoeval_does():
    # All scores equal: the order of detections is (image, id), exactly COCOeval's mergesort order.
    images = [(i, t, tc, p, pc, np.full(len(pc), 0.5, np.float32)) for i, t, tc, p, pc, _ in scenes(7, 10, 4)]
    evaluator = coco_eval(images, 4)
    summary = accumulate(images, 4).summary()
    assert abs(summary["ap"] - evaluator.stats[0]) < 1e-6
    assert abs(summary["ap50"] - evaluator.stats[1]) < 1e-6


def test_more_than_max_detections_keeps_the_best_per_class():
    # 120 one-pixel truth objects, 120 exact detections: COCO keeps the top 100 by score.
    truth = np.arange(1, 121, dtype=np.int64).reshape(10, 12)
    classes = np.ones(120, np.int64)
    scores = np.linspace(0.01, 0.99, 120).astype(np.float32)
    images = [("0000", truth, classes, truth, classes, scores)]
    evaluator = coco_eval(images, 2)
    summary = accumulate(images, 2).summary()
    assert abs(summary["ar100"] - 100 / 120) < 1e-12
    assert abs(summary["ar100"] - evaluator.stats[8]) < 1e-6
    assert abs(summary["ap"] - evaluator.stats[0]) < 1e-6


@pytest.mark.parametrize("seed", [3, 4])
def test_split_into_parts_merges_to_one_pass_exactly(seed, tmp_path):
    num_classes = 5
    images = scenes(seed, 15, num_classes)
    whole = accumulate(images, num_classes)
    rng = np.random.default_rng(seed)
    part_of = rng.integers(0, 3, len(images))
    parts = [accumulate([im for im, p in zip(images, part_of) if p == k], num_classes) for k in range(3)]
    # Through each serialised form: a JSON round trip, a Parquet file, a pickle.
    parts[0] = InstanceMetrics.from_dict(json.loads(json.dumps(parts[0].to_dict())))
    import pyarrow.parquet as pq

    pq.write_table(parts[1].to_arrow(), tmp_path / "part1.parquet")  # a saved part, as a resumed predict reads it
    parts[1] = InstanceMetrics.from_arrow(pq.read_table(tmp_path / "part1.parquet"))
    parts[2] = pickle.loads(pickle.dumps(parts[2]))  # what a Ray task's return goes through
    merged = InstanceMetrics.merged([parts[2], parts[0], parts[1]])
    a, b = whole.scores(), merged.scores()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])  # bit for bit, NaNs in the same places
    assert whole.summary() == pytest.approx(merged.summary(), nan_ok=True, rel=0, abs=0)


RECORDS = [InstanceMetrics(5).add(*image) for image in scenes(9, 10, 5)]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=len(RECORDS), max_size=len(RECORDS)), st.permutations(range(len(RECORDS))))
def test_any_split_and_order_of_images_gives_the_same_scores(part_of, order):
    whole = InstanceMetrics(5)
    for record in RECORDS:
        whole.add_record(record)
    parts = [InstanceMetrics(5) for _ in range(4)]
    for i in order:
        parts[part_of[i]].add_record(RECORDS[i])
    a, b = whole.scores(), InstanceMetrics.merged(parts).scores()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_merging_an_image_twice_raises():
    images = scenes(5, 3, 3)
    part = accumulate(images, 3)
    with pytest.raises(ValueError, match="'0001' was counted twice"):
        InstanceMetrics.merged([part, accumulate(images[1:2], 3)]).summary()


def brute_force_pq(images, num_classes: int) -> dict[int, tuple[int, int, int, float]]:
    """PQ counts from every (prediction, truth) pair's IoU by full masks, matched when IoU > 0.5 and same class."""
    out = {c: [0, 0, 0, 0.0] for c in range(1, num_classes)}
    for _, truth, truth_classes, pred, pred_classes, _ in images:
        matched_truth = set()
        for p, pc in enumerate(pred_classes, start=1):
            hit = None
            for t, tc in enumerate(truth_classes, start=1):
                inter = np.logical_and(pred == p, truth == t).sum()
                union = np.logical_or(pred == p, truth == t).sum()
                if tc == pc and inter / union > 0.5:
                    hit = (t, inter / union)
            if hit:
                out[pc][0] += 1
                out[pc][3] += hit[1]
                matched_truth.add(hit[0])
            else:
                out[pc][1] += 1
        for t, tc in enumerate(truth_classes, start=1):
            if t not in matched_truth:
                out[tc][2] += 1
    return out


def test_pq_equals_brute_force():
    num_classes = 4
    images = scenes(11, 8, num_classes)
    per_class = accumulate(images, num_classes).scores()
    brute = brute_force_pq(images, num_classes)
    for k, c in enumerate(per_class["class_id"]):
        tp, fp, fn, iou_sum = brute[int(c)]
        assert (per_class["tp"][k], per_class["fp"][k], per_class["fn"][k]) == (tp, fp, fn)
        if tp + fp + fn == 0:
            assert math.isnan(per_class["pq"][k])
            continue
        assert per_class["pq"][k] == pytest.approx(iou_sum / (tp + 0.5 * fp + 0.5 * fn), abs=1e-12)
        assert per_class["rq"][k] == pytest.approx(tp / (tp + 0.5 * fp + 0.5 * fn), abs=1e-12)
        assert per_class["sq"][k] == pytest.approx(iou_sum / tp if tp else 0.0, abs=1e-12)


def test_pq_hand_worked():
    # 1 x 10 image. Truth: object 1 (class 1) pixels 0-3, object 2 (class 1) pixels 6-9.
    # Prediction: object 1 (class 1) pixels 0-2 -> IoU 3/4 with truth 1 (TP);
    #             object 2 (class 1) pixels 5-6 -> IoU 1/5 with truth 2 (FP), truth 2 unmatched (FN);
    #             object 3 (class 2) pixels 8-9 -> class 2 has no truth (FP of class 2).
    # Class 1: TP 1, FP 1, FN 1, SQ 0.75, RQ 1 / (1 + 0.5 + 0.5) = 0.5, PQ 0.375.
    # Class 2: TP 0, FP 1, FN 0, SQ 0, RQ 0, PQ 0.  Mean PQ over the 2 present classes: 0.1875.
    truth = np.array([[1, 1, 1, 1, 0, 0, 2, 2, 2, 2]])
    pred = np.array([[1, 1, 1, 0, 0, 2, 2, 0, 3, 3]])
    metrics = InstanceMetrics(num_classes=4)
    metrics.add("x", truth, [1, 1], pred, [1, 1, 2], [0.9, 0.8, 0.7])
    per_class, summary = metrics.scores(), metrics.summary()
    assert per_class["tp"].tolist() == [1, 0, 0] and per_class["fp"].tolist() == [1, 1, 0] and per_class["fn"].tolist() == [1, 0, 0]
    assert per_class["sq"][0] == 0.75 and per_class["rq"][0] == 0.5 and per_class["pq"][0] == 0.375
    assert per_class["pq"][1] == 0.0 and per_class["sq"][1] == 0.0
    assert math.isnan(per_class["pq"][2])  # class 3: in neither truth nor prediction
    assert summary["pq"] == 0.1875 and summary["pq_classes"] == 2
    # AP of class 1 at IoU 0.5: detections by score TP (0.9), FP (0.8); recall reaches 1/2 at precision 1.
    assert per_class["ap50"][0] == pytest.approx(51 / 101)
    assert math.isnan(per_class["ap"][1]) and summary["ap_classes"] == 1


def test_match_image_and_helpers():
    truth = np.array([[1, 1, 0], [2, 2, 0]])
    pred = np.array([[1, 1, 1], [0, 2, 0]])
    match = match_image(truth, [1, 1], pred, [1, 1], [0.3, 0.6])
    assert match.truth_id.tolist() == [1, 0]  # pred 1: IoU 2/3 with truth 1; pred 2: IoU 1/2 with truth 2, not > 0.5
    assert match.best_iou.tolist() == pytest.approx([2 / 3, 0.5])
    assert semantic_from_instances(pred, [3, 7]).tolist() == [[3, 3, 3], [0, 7, 0]]
    assert object_boxes(pred, 3).tolist() == [[0, 0, 1, 3], [1, 1, 2, 2], [-1, -1, -1, -1]]
    with pytest.raises(ValueError, match="holds id 2 but only 1 classes"):
        match_image(truth, [1], pred, [1, 1], [0.3, 0.6])
    metrics = InstanceMetrics(3)
    with pytest.raises(ValueError, match=r"image 'b7': truth instance map is 3x2, prediction is 2x2"):
        metrics.add("b7", truth, [1, 1], pred[:, :2], [1, 1], [0.3, 0.6])
    with pytest.raises(ValueError, match=r"image 'b7': predicted class 3 outside 1..2"):
        metrics.add("b7", truth, [1, 1], pred, [1, 3], [0.3, 0.6])
    with pytest.raises(ValueError, match="got 1 scores for 2 predicted classes"):
        metrics.add("b7", truth, [1, 1], pred, [1, 1], [0.3])
