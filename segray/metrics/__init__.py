"""Segmentation metrics: one additive int64 confusion matrix, scores from it.

Instance metrics (COCO mask AP, AR@100, panoptic quality) keep per-image
records that merge by concatenation: ``InstanceMetrics``
(``segray.metrics.instances``).

Rows of every matrix are truth, columns prediction; ``ignore_index`` (255 by
default) pixels never count. ``ConfusionMatrixMetric`` and
``tf_confusion_matrix`` live in ``segray.metrics.tf_ops``; they are re-exported
here lazily, so scoring a per-image table with numpy does not import
TensorFlow.
"""

from typing import Any

from segray.metrics.confusion import (
    CELL_BASE,
    SparseCellError,
    class_counts,
    confusion_matrix,
    counts_from_sparse,
    decode_cells,
    encode_cells,
    image_counts,
    per_image_counts,
    sparse_confusion,
)
from segray.metrics.instances import (
    IOU_THRESHOLDS,
    MAX_DETECTIONS,
    RECALL_POINTS,
    ImageMatch,
    InstanceMetrics,
    image_record,
    match_image,
    object_boxes,
    semantic_from_instances,
)
from segray.metrics.scores import (
    dice,
    dice_from_counts,
    iou,
    iou_from_counts,
    mean_of_images,
    pixel_accuracy,
    precision,
    precision_from_counts,
    recall,
    recall_from_counts,
    summary,
    summary_from_counts,
)

_TF_NAMES = ("ConfusionMatrixMetric", "tf_confusion_matrix")

__all__ = [
    "CELL_BASE",
    "IOU_THRESHOLDS",
    "ImageMatch",
    "InstanceMetrics",
    "MAX_DETECTIONS",
    "RECALL_POINTS",
    "ConfusionMatrixMetric",
    "SparseCellError",
    "class_counts",
    "confusion_matrix",
    "counts_from_sparse",
    "decode_cells",
    "dice",
    "dice_from_counts",
    "encode_cells",
    "image_record",
    "image_counts",
    "iou",
    "iou_from_counts",
    "match_image",
    "mean_of_images",
    "object_boxes",
    "per_image_counts",
    "pixel_accuracy",
    "precision",
    "precision_from_counts",
    "recall",
    "recall_from_counts",
    "semantic_from_instances",
    "sparse_confusion",
    "summary",
    "summary_from_counts",
    "tf_confusion_matrix",
]


def __getattr__(name: str) -> Any:
    # PEP 562: TensorFlow loads on first use of a TF name, not on import.
    if name in _TF_NAMES:
        from segray.metrics import tf_ops

        return getattr(tf_ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
