"""Instance metrics by COCO's rules, and panoptic quality, from one additive state.

The state is a list of per-image records, one per image, each an exact and
self-contained summary of what that image contributes:

- for average precision (COCO ``iouType="segm"``): each kept detection's
  class, score, instance id and whether it matched a truth object at each of
  the ten IoU thresholds 0.50:0.05:0.95 (COCO's greedy matching, at most
  ``max_detections`` = 100 detections per image *and class*, as COCOeval's
  ``maxDets``), and the class of every truth object;
- for panoptic quality at IoU 0.5: the class and IoU of each matched pair and
  the classes of unmatched predictions (FP) and truth objects (FN).

Records from images split over tasks or workers merge by concatenation
(``InstanceMetrics.merge``), and the scores are computed from the records
sorted by image id, so any split of the images gives bit-for-bit the same
numbers as one pass (the role the summed confusion matrix plays for
semantic metrics). The IoU sum of PQ is taken with ``math.fsum``, exact
whatever the order.

Scores (``InstanceMetrics.scores``): per class ``ap`` (mean over the ten
thresholds and COCO's 101 recall points), ``ap50``, ``ap75``, ``ar100``,
``pq``, ``sq``, ``rq``. A class without truth objects has no AP (COCOeval
writes -1 there): it is NaN and left out of the means, and ``ap_classes``
counts the classes averaged. PQ follows the panoptic API: a class with no
truth and no prediction is NaN and left out; a class present with no match
scores 0.

Input per image (``segray`` contract): a truth instance map ``(H, W)`` (0
background, object ``k`` has value ``k``) with truth classes indexed by
``k - 1``, and a predicted instance map with classes and scores indexed the
same way. A class entry of 0 marks an unused id (padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "IOU_THRESHOLDS",
    "MAX_DETECTIONS",
    "RECALL_POINTS",
    "ImageMatch",
    "InstanceMetrics",
    "image_record",
    "match_image",
    "object_boxes",
    "semantic_from_instances",
]

# Spelled as COCOeval spells them: the floats compared against must be the
# same bits (np.linspace(.5, .95, 10)[2] is 0.6000000000000001).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETECTIONS = 100
PQ_IOU = 0.5  # a pair matches when IoU > 0.5 (panoptic rule: such a match is unique)

RECORD_FIELDS = (
    "image_id", "det_id", "det_class", "det_score", "det_matched",
    "truth_classes", "tp_class", "tp_iou", "fp_class", "fn_class",
)


def _objects(name: str, instance_map: npt.ArrayLike, classes: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(H, W)`` int64 map and int64 classes; ids beyond the classes raise."""
    ids = np.asarray(instance_map)
    if ids.ndim != 2:
        raise ValueError(f"{name} instance map must be (H, W), got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} instance map must hold integer ids, got dtype {ids.dtype}")
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    ids = ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < 0:
        raise ValueError(f"{name} instance map holds negative id {int(ids.min())}")
    top = int(ids.max()) if ids.size else 0
    if top > len(classes):
        raise ValueError(f"{name} instance map holds id {top} but only {len(classes)} classes were given (one per id)")
    if len(classes) and classes.min() < 0:
        raise ValueError(f"{name} classes must be >= 1 (0 marks an unused id), got {int(classes.min())}")
    return ids, classes


def semantic_from_instances(instance_map: npt.ArrayLike, classes: npt.ArrayLike) -> np.ndarray:
    """The class map of an instance map: each object's pixels take its class.

    Args:
        instance_map: ``(H, W)`` ids, 0 background, object ``k`` has value ``k``.
        classes: class of object ``k`` at ``k - 1`` (class ids 1..255).

    Returns:
        uint8 ``(H, W)`` class ids (0 background), the mask every semantic
        table (IoU, Dice, confusion) is made from.
    """
    ids, classes = _objects("", instance_map, classes)
    if len(classes) and classes.max() > 255:
        raise ValueError(f"class ids must fit uint8 (at most 255), got {int(classes.max())}")
    lookup = np.concatenate([[0], classes]).astype(np.uint8)
    return lookup[ids]


def object_boxes(instance_map: npt.ArrayLike, count: int) -> np.ndarray:
    """Boxes ``(count, 4)`` int32 ``(y1, x1, y2, x2)`` of objects ``1..count``, pixel edges (y2 - y1 is the height); all -1 for an empty id."""
    from scipy import ndimage

    boxes = np.full((count, 4), -1, np.int32)
    for k, found in enumerate(ndimage.find_objects(np.asarray(instance_map), max_label=count)):
        if found is not None:
            boxes[k] = (found[0].start, found[1].start, found[0].stop, found[1].stop)
    return boxes


@dataclass(frozen=True)
class ImageMatch:
    """Overlaps of one image's predicted and truth objects, and the panoptic matching.

    Attributes:
        pred_area, truth_area: int64 ``(P,)``, ``(T,)`` pixel counts of ids ``1..P``, ``1..T``.
        pairs_pred, pairs_truth: int64 ``(K,)`` 0-based object indices of every overlapping pair.
        pairs_iou: float64 ``(K,)`` their IoU, ``intersection / union`` as COCO computes it.
        truth_id: int64 ``(P,)`` the truth id (1-based) each prediction matched at IoU > 0.5
            with the same class (greedy by score, which is the unique panoptic matching), 0 if none.
        best_iou: float64 ``(P,)`` each prediction's highest IoU with a truth object of its class.
    """

    pred_area: np.ndarray
    truth_area: np.ndarray
    pairs_pred: np.ndarray
    pairs_truth: np.ndarray
    pairs_iou: np.ndarray
    truth_id: np.ndarray
    best_iou: np.ndarray


def _score_order(scores: np.ndarray) -> np.ndarray:
    # COCOeval sorts with np.argsort(-score, kind="mergesort"): ties keep id order.
    return np.argsort(-scores, kind="mergesort")


def _check_scores(scores: npt.ArrayLike, count: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != count:
        raise ValueError(f"got {len(scores)} scores for {count} predicted classes (one per id)")
    if not np.isfinite(scores).all():
        raise ValueError("prediction scores must be finite numbers")
    return scores


def match_image(
    truth_map: npt.ArrayLike,
    truth_classes: npt.ArrayLike,
    pred_map: npt.ArrayLike,
    pred_classes: npt.ArrayLike,
    pred_scores: npt.ArrayLike,
) -> ImageMatch:
    """Every overlapping (prediction, truth) pair with its IoU, and the panoptic matching."""
    truth, t_classes = _objects("truth", truth_map, truth_classes)
    pred, p_classes = _objects("predicted", pred_map, pred_classes)
    if truth.shape != pred.shape:
        raise ValueError(f"truth instance map is {truth.shape[1]}x{truth.shape[0]}, prediction is {pred.shape[1]}x{pred.shape[0]}")
    scores = _check_scores(pred_scores, len(p_classes))
    n_p, n_t = len(p_classes), len(t_classes)
    pred_area = np.bincount(pred.reshape(-1), minlength=n_p + 1)[1:].astype(np.int64)
    truth_area = np.bincount(truth.reshape(-1), minlength=n_t + 1)[1:].astype(np.int64)
    both = (pred > 0) & (truth > 0)
    keys, inter = np.unique(pred[both] * (n_t + 1) + truth[both], return_counts=True)
    pairs_pred, pairs_truth = keys // (n_t + 1) - 1, keys % (n_t + 1) - 1
    union = pred_area[pairs_pred] + truth_area[pairs_truth] - inter
    pairs_iou = inter.astype(np.float64) / union.astype(np.float64)

    same = (p_classes[pairs_pred] == t_classes[pairs_truth]) & (p_classes[pairs_pred] > 0)
    best_iou = np.zeros(n_p, np.float64)
    np.maximum.at(best_iou, pairs_pred[same], pairs_iou[same])
    truth_id = np.zeros(n_p, np.int64)
    taken = np.zeros(n_t, bool)
    candidates = same & (pairs_iou > PQ_IOU)
    by_pred: dict[int, list[int]] = {}
    for k in np.flatnonzero(candidates):
        by_pred.setdefault(int(pairs_pred[k]), []).append(int(k))
    for p in _score_order(scores):
        best, best_k = -1.0, -1
        for k in by_pred.get(int(p), ()):
            t = pairs_truth[k]
            if not taken[t] and pairs_iou[k] > best:
                best, best_k = pairs_iou[k], k
        if best_k >= 0:
            taken[pairs_truth[best_k]] = True
            truth_id[p] = pairs_truth[best_k] + 1
    return ImageMatch(pred_area, truth_area, pairs_pred, pairs_truth, pairs_iou, truth_id, best_iou)


def _coco_matches(match: ImageMatch, t_classes: np.ndarray, p_classes: np.ndarray, scores: np.ndarray, max_detections: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept detection indices (per class top ``max_detections`` by score) and their match bits, as COCOeval.evaluateImg."""
    kept, bits = [], []
    for c in np.unique(p_classes[p_classes > 0]):
        dets = np.flatnonzero(p_classes == c)
        dets = dets[_score_order(scores[dets])][:max_detections]
        gts = np.flatnonzero(t_classes == c)  # truth in id order, as the annotations are listed
        # Dense IoU (detections x truth) of this class from the sparse pairs.
        row_of = np.full(len(p_classes), -1)
        row_of[dets] = np.arange(len(dets))
        col_of = np.full(len(t_classes), -1)
        col_of[gts] = np.arange(len(gts))
        ious = np.zeros((len(dets), len(gts)))
        here = (row_of[match.pairs_pred] >= 0) & (col_of[match.pairs_truth] >= 0)
        ious[row_of[match.pairs_pred[here]], col_of[match.pairs_truth[here]]] = match.pairs_iou[here]
        matched = np.zeros(len(dets), np.int64)
        if len(gts):
            for ti, threshold in enumerate(IOU_THRESHOLDS):
                free = np.ones(len(gts), bool)
                for di in range(len(dets)):
                    values = np.where(free, ious[di], -np.inf)
                    best = values.max()
                    # COCO walks the truth keeping `iou >= best so far` (from the threshold): the
                    # largest IoU wins and, among equal ones, the last in truth order.
                    if best >= min(threshold, 1 - 1e-10):
                        m = len(gts) - 1 - int(np.argmax(values[::-1] == best))
                        free[m] = False
                        matched[di] |= 1 << ti
        kept.append(dets)
        bits.append(matched)
    if not kept:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(kept), np.concatenate(bits)


def image_record(
    image_id: str,
    truth_map: npt.ArrayLike,
    truth_classes: npt.ArrayLike,
    pred_map: npt.ArrayLike,
    pred_classes: npt.ArrayLike,
    pred_scores: npt.ArrayLike,
    max_detections: int = MAX_DETECTIONS,
) -> dict[str, Any]:
    """What one image adds to the metrics' state: a JSON-able dict of lists (``RECORD_FIELDS``)."""
    match = match_image(truth_map, truth_classes, pred_map, pred_classes, pred_scores)
    t_classes = np.asarray(truth_classes, np.int64).reshape(-1)
    p_classes = np.asarray(pred_classes, np.int64).reshape(-1)
    scores = np.asarray(pred_scores, np.float64).reshape(-1)
    dets, bits = _coco_matches(match, t_classes, p_classes, scores, max_detections)
    real_p = p_classes > 0
    hit = match.truth_id > 0
    truth_hit = np.zeros(len(t_classes), bool)
    truth_hit[match.truth_id[hit] - 1] = True
    return {
        "image_id": str(image_id),
        "det_id": (dets + 1).tolist(),
        "det_class": p_classes[dets].tolist(),
        "det_score": scores[dets].tolist(),
        "det_matched": bits.tolist(),
        "truth_classes": t_classes[t_classes > 0].tolist(),
        "tp_class": p_classes[hit].tolist(),
        "tp_iou": match.best_iou[hit].tolist(),
        "fp_class": p_classes[real_p & ~hit].tolist(),
        "fn_class": t_classes[(t_classes > 0) & ~truth_hit].tolist(),
    }


def _precision_recall(matched: np.ndarray, scores: np.ndarray, truth_count: int) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.accumulate for one class: precision ``(T, R)`` at the recall points and recall ``(T,)``."""
    order = np.argsort(-scores, kind="mergesort")
    matched = matched[order]
    precision = np.zeros((len(IOU_THRESHOLDS), len(RECALL_POINTS)))
    recall = np.zeros(len(IOU_THRESHOLDS))
    for t in range(len(IOU_THRESHOLDS)):
        tps = (matched >> t) & 1 == 1
        tp = np.cumsum(tps).astype(np.float64)
        fp = np.cumsum(~tps).astype(np.float64)
        if len(tp) == 0:
            continue
        rc = tp / truth_count
        pr = tp / (fp + tp + np.spacing(1))
        recall[t] = rc[-1]
        # COCO's backward loop pr[i-1] = max(pr[i-1], pr[i]) is a reversed running maximum.
        pr = np.maximum.accumulate(pr[::-1])[::-1]
        at = np.searchsorted(rc, RECALL_POINTS, side="left")
        inside = at < len(pr)
        precision[t, inside] = pr[at[inside]]
    return precision, recall


def _nan_mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


class InstanceMetrics:
    """Accumulates COCO mask AP / AR@100 and panoptic quality over images; merges exactly.

    >>> metrics = InstanceMetrics(num_classes=3)
    >>> metrics.add("a", truth_map, truth_classes, pred_map, pred_classes, scores)  # doctest: +SKIP
    >>> InstanceMetrics.merged([part1, part2]).summary()["ap"]  # doctest: +SKIP

    Args:
        num_classes: ``C`` including background 0; object classes are ``1..C-1``.
        max_detections: detections kept per image and class (COCO's ``maxDets``).
    """

    def __init__(self, num_classes: int, max_detections: int = MAX_DETECTIONS):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background and one object class), got {num_classes}")
        self.num_classes = int(num_classes)
        self.max_detections = int(max_detections)
        self.records: list[dict[str, Any]] = []

    def add(self, image_id: str, truth_map, truth_classes, pred_map, pred_classes, pred_scores) -> dict[str, Any]:
        """Adds one image (see the module docstring for the inputs); returns its record."""
        for name, classes in (("truth", truth_classes), ("predicted", pred_classes)):
            values = np.asarray(classes, np.int64).reshape(-1)
            if len(values) and values.max() >= self.num_classes:
                raise ValueError(f"image {image_id!r}: {name} class {int(values.max())} outside 1..{self.num_classes - 1}")
        try:
            record = image_record(image_id, truth_map, truth_classes, pred_map, pred_classes, pred_scores, self.max_detections)
        except (ValueError, TypeError) as e:
            raise type(e)(f"image {image_id!r}: {e}") from None
        self.records.append(record)
        return record

    def add_record(self, record: dict[str, Any]) -> None:
        missing = [f for f in RECORD_FIELDS if f not in record]
        if missing:
            raise ValueError(f"instance record lacks fields {missing}")
        self.records.append({f: record[f] for f in RECORD_FIELDS})

    def merge(self, other: InstanceMetrics) -> InstanceMetrics:
        """Adds another accumulator's images (in place; returns self)."""
        if (other.num_classes, other.max_detections) != (self.num_classes, self.max_detections):
            raise ValueError(
                f"cannot merge metrics of {other.num_classes} classes / {other.max_detections} detections "
                f"into {self.num_classes} classes / {self.max_detections} detections"
            )
        self.records.extend(other.records)
        return self

    @classmethod
    def merged(cls, parts: list[InstanceMetrics]) -> InstanceMetrics:
        if not parts:
            raise ValueError("no parts to merge")
        out = cls(parts[0].num_classes, parts[0].max_detections)
        for part in parts:
            out.merge(part)
        return out

    # Serialisation: a JSON-able dict, and an Arrow table of one row per image.

    def to_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "max_detections": self.max_detections, "records": list(self.records)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> InstanceMetrics:
        out = cls(int(state["num_classes"]), int(state["max_detections"]))
        for record in state["records"]:
            out.add_record(record)
        return out

    def to_arrow(self):
        import pyarrow as pa

        table = pa.Table.from_pylist(self.records, schema=record_schema())
        meta = {b"num_classes": str(self.num_classes).encode(), b"max_detections": str(self.max_detections).encode()}
        return table.replace_schema_metadata(meta)

    @classmethod
    def from_arrow(cls, table, num_classes: int | None = None) -> InstanceMetrics:
        meta = table.schema.metadata or {}
        if num_classes is None:
            if b"num_classes" not in meta:
                raise ValueError("instance metrics table carries no num_classes metadata; pass num_classes")
            num_classes = int(meta[b"num_classes"])
        out = cls(num_classes, int(meta.get(b"max_detections", MAX_DETECTIONS)))
        for record in table.select(list(RECORD_FIELDS)).to_pylist():
            out.add_record(record)
        return out

    # Scores

    def _sorted_records(self) -> list[dict[str, Any]]:
        ordered = sorted(self.records, key=lambda r: r["image_id"])
        for a, b in zip(ordered, ordered[1:]):
            if a["image_id"] == b["image_id"]:
                raise ValueError(f"image {a['image_id']!r} was counted twice (merged parts overlap)")
        return ordered

    def scores(self) -> dict[str, np.ndarray]:
        """Per-class scores, rows for classes ``1..C-1``.

        Returns:
            ``class_id`` int32; ``ap``, ``ap50``, ``ap75``, ``ar100``, ``pq``,
            ``sq``, ``rq`` float64 (NaN where undefined, see the module
            docstring); ``truth``, ``predicted``, ``tp``, ``fp``, ``fn`` int64
            object counts (``predicted`` counts every prediction; ``tp`` /
            ``fp`` / ``fn`` are the panoptic ones at IoU > 0.5).
        """
        return self._compute()[0]

    def _compute(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """(per-class scores, COCO precision ``(T, R, C)``, recall ``(T, C)``; NaN for classes without truth)."""
        records = self._sorted_records()
        c = self.num_classes

        def flat(field: str, dtype) -> np.ndarray:
            return np.asarray([v for r in records for v in r[field]], dtype=dtype)

        det_class, det_score, det_matched = flat("det_class", np.int64), flat("det_score", np.float64), flat("det_matched", np.int64)
        truth = np.bincount(flat("truth_classes", np.int64), minlength=c)[:c]
        tp_class, tp_iou = flat("tp_class", np.int64), flat("tp_iou", np.float64)
        tp = np.bincount(tp_class, minlength=c)[:c]
        fp = np.bincount(flat("fp_class", np.int64), minlength=c)[:c]
        fn = np.bincount(flat("fn_class", np.int64), minlength=c)[:c]

        precision = np.full((len(IOU_THRESHOLDS), len(RECALL_POINTS), c), np.nan)
        recall = np.full((len(IOU_THRESHOLDS), c), np.nan)
        for k in range(1, c):
            if truth[k] == 0:
                continue
            # Records are in image-id order and each record's detections in score order,
            # so the stable sort inside breaks score ties by (image, id) as COCOeval does.
            mine = det_class == k
            precision[:, :, k], recall[:, k] = _precision_recall(det_matched[mine], det_score[mine], int(truth[k]))
        iou_sum = np.array([math.fsum(tp_iou[tp_class == k]) for k in range(c)])
        present = (tp + fp + fn) > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            denominator = tp + 0.5 * fp + 0.5 * fn
            pq = np.where(present, iou_sum / np.where(present, denominator, 1), np.nan)
            sq = np.where(present, np.where(tp > 0, iou_sum / np.maximum(tp, 1), 0.0), np.nan)
            rq = np.where(present, tp / np.where(present, denominator, 1), np.nan)
        t50, t75 = 0, int(np.flatnonzero(np.isclose(IOU_THRESHOLDS, 0.75))[0])
        rows = slice(1, c)
        predicted = tp + fp
        per_class = {
            "class_id": np.arange(1, c, dtype=np.int32),
            "ap": precision.mean(axis=(0, 1))[rows],
            "ap50": precision[t50].mean(axis=0)[rows],
            "ap75": precision[t75].mean(axis=0)[rows],
            "ar100": recall.mean(axis=0)[rows],
            "pq": pq[rows], "sq": sq[rows], "rq": rq[rows],
            "truth": truth[rows].astype(np.int64), "predicted": predicted[rows].astype(np.int64),
            "tp": tp[rows].astype(np.int64), "fp": fp[rows].astype(np.int64), "fn": fn[rows].astype(np.int64),
        }
        return per_class, precision, recall

    def summary(self) -> dict[str, Any]:
        """Means over classes: ``ap``, ``ap50``, ``ap75``, ``ar100`` over classes with truth
        (``ap_classes`` of them; COCO's -1 classes left out), ``pq``, ``sq``, ``rq`` over
        classes in truth or prediction (``pq_classes``), and object counts ``images``,
        ``truth_objects``, ``predicted_objects``.
        """
        per_class, precision, recall = self._compute()
        with_truth = per_class["truth"] > 0
        precision, recall = precision[:, :, 1:][:, :, with_truth], recall[:, 1:][:, with_truth]
        t75 = int(np.flatnonzero(np.isclose(IOU_THRESHOLDS, 0.75))[0])
        undefined = not with_truth.any()
        return {
            # COCOeval.summarize: np.mean over every (threshold, recall point, class) cell with truth.
            "ap": float("nan") if undefined else float(np.mean(precision)),
            "ap50": float("nan") if undefined else float(np.mean(precision[0])),
            "ap75": float("nan") if undefined else float(np.mean(precision[t75])),
            "ar100": float("nan") if undefined else float(np.mean(recall)),
            "ap_classes": int(with_truth.sum()),
            "pq": _nan_mean(per_class["pq"]),
            "sq": _nan_mean(per_class["sq"]),
            "rq": _nan_mean(per_class["rq"]),
            "pq_classes": int((~np.isnan(per_class["pq"])).sum()),
            "images": len(self.records),
            "truth_objects": int(per_class["truth"].sum()),
            "predicted_objects": int(per_class["predicted"].sum()),
        }


def record_schema():
    """Arrow schema of the per-image records (one row per image)."""
    import pyarrow as pa

    ints, floats = pa.list_(pa.int64()), pa.list_(pa.float64())
    return pa.schema(
        [
            ("image_id", pa.string()), ("det_id", ints), ("det_class", ints), ("det_score", floats),
            ("det_matched", ints), ("truth_classes", ints), ("tp_class", ints), ("tp_iou", floats),
            ("fp_class", ints), ("fn_class", ints),
        ]
    )
