"""Box and anchor operations of the detection models (TensorFlow, in-graph).

Boxes are ``(y1, x1, y2, x2)`` normalised to the image (0..1, edges, not
pixel centres), the convention of ``tf.image.crop_and_resize`` and
``tf.image.combined_non_max_suppression``; a model's outputs are turned into
pixels only at the end (``segray.models.maskrcnn.predict_instances``).
Everything keeps the batch axis and static sizes where a graph needs them:
per-image counts that vary are padded, with a mask saying what is real.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

# Box deltas are divided by these (Mask R-CNN's BBOX_STD_DEV), so their targets have about unit scale.
DELTA_STD = (0.1, 0.1, 0.2, 0.2)
# exp() of a larger log-size delta would overflow a box (Detectron's clamp: log(1000 / 16)).
MAX_LOG_SIZE = math.log(1000.0 / 16.0)


def level_anchors(height: tf.Tensor, width: tf.Tensor, stride: int, size: float, ratios: Sequence[float]) -> tf.Tensor:
    """The anchors of one pyramid level in pixels: ``(h * w * len(ratios), 4)``.

    Ordered row, column, ratio: the order of an RPN output ``(B, h, w, R * k)``
    reshaped to ``(B, h * w * R, k)``. A ratio is width / height; every
    anchor has the area ``size ** 2``.
    """
    ratios_t = tf.constant(ratios, tf.float32)
    half_h = size / tf.sqrt(ratios_t) / 2.0
    half_w = size * tf.sqrt(ratios_t) / 2.0
    cy = (tf.cast(tf.range(height), tf.float32) + 0.5) * stride
    cx = (tf.cast(tf.range(width), tf.float32) + 0.5) * stride
    cy, cx = tf.meshgrid(cy, cx, indexing="ij")  # (h, w)
    cy, cx = cy[..., None], cx[..., None]  # (h, w, 1) against (R,)
    boxes = tf.stack([cy - half_h, cx - half_w, cy + half_h, cx + half_w], axis=-1)  # (h, w, R, 4)
    return tf.reshape(boxes, [-1, 4])


def pyramid_anchors(
    feature_sizes: Sequence[tuple[tf.Tensor, tf.Tensor]],
    image_size: tuple[tf.Tensor, tf.Tensor],
    sizes: Sequence[float],
    ratios: Sequence[float],
) -> tf.Tensor:
    """All anchors over the levels P2, P3 ... (stride 4, 8 ...), normalised: ``(A, 4)``."""
    out = [
        level_anchors(hw[0], hw[1], 2 ** (level + 2), float(size), ratios)
        for level, (hw, size) in enumerate(zip(feature_sizes, sizes))
    ]
    scale = tf.cast(tf.stack([image_size[0], image_size[1], image_size[0], image_size[1]]), tf.float32)
    return tf.concat(out, axis=0) / scale


def encode_boxes(boxes: tf.Tensor, anchors: tf.Tensor, std: Sequence[float] = DELTA_STD) -> tf.Tensor:
    """Deltas ``(dy, dx, log dh, log dw) / std`` that move ``anchors`` onto ``boxes`` (same shapes, ``(..., 4)``)."""
    ah, aw = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ay, ax = anchors[..., 0] + 0.5 * ah, anchors[..., 1] + 0.5 * aw
    bh, bw = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    by, bx = boxes[..., 0] + 0.5 * bh, boxes[..., 1] + 0.5 * bw
    ah, aw = tf.maximum(ah, 1e-6), tf.maximum(aw, 1e-6)
    deltas = tf.stack(
        [(by - ay) / ah, (bx - ax) / aw, tf.math.log(tf.maximum(bh, 1e-6) / ah), tf.math.log(tf.maximum(bw, 1e-6) / aw)],
        axis=-1,
    )
    return deltas / tf.constant(std, tf.float32)


def decode_boxes(deltas: tf.Tensor, anchors: tf.Tensor, std: Sequence[float] = DELTA_STD) -> tf.Tensor:
    """Inverse of ``encode_boxes``: the boxes ``deltas`` make of ``anchors`` (broadcasting), not clipped."""
    deltas = tf.cast(deltas, tf.float32) * tf.constant(std, tf.float32)
    ah, aw = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ay, ax = anchors[..., 0] + 0.5 * ah, anchors[..., 1] + 0.5 * aw
    cy, cx = ay + deltas[..., 0] * ah, ax + deltas[..., 1] * aw
    h = ah * tf.exp(tf.minimum(deltas[..., 2], MAX_LOG_SIZE))
    w = aw * tf.exp(tf.minimum(deltas[..., 3], MAX_LOG_SIZE))
    return tf.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def box_iou(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Pairwise IoU of ``a`` ``(..., N, 4)`` and ``b`` ``(..., M, 4)``: ``(..., N, M)`` (0 for empty boxes)."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    ih = tf.maximum(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0.0)
    iw = tf.maximum(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = ih * iw
    area_a = tf.maximum(a[..., 2] - a[..., 0], 0.0) * tf.maximum(a[..., 3] - a[..., 1], 0.0)
    area_b = tf.maximum(b[..., 2] - b[..., 0], 0.0) * tf.maximum(b[..., 3] - b[..., 1], 0.0)
    union = area_a + area_b - inter
    return tf.where(union > 0, inter / tf.maximum(union, 1e-12), 0.0)


def instance_boxes(instances: tf.Tensor, max_instances: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Boxes of the objects of an id map, derived in-graph.

    Args:
        instances: ``(B, H, W)`` int, 0 background, ``k`` in ``1..M`` object ``k``.
        max_instances: ``M``; ids above it are ignored.

    Returns:
        ``(boxes, present, onehot)``: ``(B, M, 4)`` normalised boxes around
        each object's pixels (zeros where absent), ``(B, M)`` bool whether
        object ``k`` has pixels, and the ``(B, H, W, M)`` bool masks.
    """
    instances = tf.cast(instances, tf.int32)
    onehot = tf.equal(instances[..., None], tf.range(1, max_instances + 1, dtype=tf.int32))
    rows = tf.cast(tf.reduce_any(onehot, axis=2), tf.int32)  # (B, H, M)
    cols = tf.cast(tf.reduce_any(onehot, axis=1), tf.int32)  # (B, W, M)
    present = tf.reduce_any(rows > 0, axis=1)
    height, width = tf.shape(instances)[1], tf.shape(instances)[2]
    y1 = tf.argmax(rows, axis=1, output_type=tf.int32)
    y2 = height - tf.argmax(tf.reverse(rows, [1]), axis=1, output_type=tf.int32)
    x1 = tf.argmax(cols, axis=1, output_type=tf.int32)
    x2 = width - tf.argmax(tf.reverse(cols, [1]), axis=1, output_type=tf.int32)
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    boxes = tf.stack([tf.cast(y1, tf.float32) / h, tf.cast(x1, tf.float32) / w, tf.cast(y2, tf.float32) / h, tf.cast(x2, tf.float32) / w], -1)
    return tf.where(present[..., None], boxes, 0.0), present, onehot


def align_boxes(boxes: tf.Tensor, height: tf.Tensor, width: tf.Tensor, crop: int) -> tf.Tensor:
    """Normalised boxes -> ``crop_and_resize`` boxes that sample the centres of a ``crop x crop`` grid of bins (RoIAlign).

    ``crop_and_resize`` maps 0..1 to pixel *centres* 0..size-1 and samples the
    box's edges; RoIAlign samples bin centres in continuous coordinates
    (pixel ``i`` spans ``i .. i + 1``).
    """
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
    half_bin_y, half_bin_x = 0.5 * (y2 - y1) * h / crop, 0.5 * (x2 - x1) * w / crop
    ys, ye = y1 * h + half_bin_y - 0.5, y2 * h - half_bin_y - 0.5
    xs, xe = x1 * w + half_bin_x - 0.5, x2 * w - half_bin_x - 0.5
    dh, dw = tf.maximum(h - 1.0, 1.0), tf.maximum(w - 1.0, 1.0)
    return tf.stack([ys / dh, xs / dw, ye / dh, xe / dw], axis=-1)


def roi_levels(boxes: tf.Tensor, image_size: tuple[tf.Tensor, tf.Tensor], base_size: float, levels: int) -> tf.Tensor:
    """Which pyramid level (0: P2) each box is pooled from: ``floor(log2(side / base_size))``, clipped.

    ``side`` is the square root of the box's area in pixels and ``base_size``
    the anchor size of P2, so a box is pooled from the finest level whose
    anchors are not larger than it (FPN's rule, scaled to the anchors).
    """
    h = (boxes[..., 2] - boxes[..., 0]) * tf.cast(image_size[0], tf.float32)
    w = (boxes[..., 3] - boxes[..., 1]) * tf.cast(image_size[1], tf.float32)
    side = tf.sqrt(tf.maximum(h * w, 1e-6))
    level = tf.floor(tf.math.log(side / base_size) / math.log(2.0))
    return tf.cast(tf.clip_by_value(level, 0.0, float(levels - 1)), tf.int32)


def multilevel_roi_align(
    features: Sequence[tf.Tensor],
    boxes: tf.Tensor,
    crop: int,
    image_size: tuple[tf.Tensor, tf.Tensor],
    base_size: float,
) -> tf.Tensor:
    """RoIAlign over an FPN: each box pooled from its level (``roi_levels``) to ``crop x crop``.

    Args:
        features: ``[P2, P3, ...]``, each ``(B, h, w, C)``.
        boxes: ``(B, N, 4)`` normalised.
        crop: output side.
        image_size: the input image's ``(H, W)``.
        base_size: the anchor size of P2.

    Returns:
        ``(B * N, crop, crop, C)`` in the features' dtype, box ``n`` of image ``b`` at ``b * N + n``.
    """
    batch, count = tf.shape(boxes)[0], tf.shape(boxes)[1]
    flat = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    image_index = tf.repeat(tf.range(batch), count)
    level = roi_levels(flat, image_size, base_size, len(features))
    pooled, order = [], []
    for index, feature in enumerate(features):
        where = tf.cast(tf.where(tf.equal(level, index))[:, 0], tf.int32)
        shape = tf.shape(feature)
        level_boxes = align_boxes(tf.gather(flat, where), shape[1], shape[2], crop)
        crops = tf.image.crop_and_resize(tf.cast(feature, tf.float32), level_boxes, tf.gather(image_index, where), (crop, crop))
        pooled.append(crops)
        order.append(where)
    # Back to the boxes' order: position j of the concatenation holds box order[j].
    result = tf.gather(tf.concat(pooled, 0), tf.math.invert_permutation(tf.concat(order, 0)))
    result = tf.ensure_shape(result, [None, crop, crop, features[0].shape[-1]])
    return tf.cast(result, features[0].dtype)


def flatten_rpn(logits: Sequence[tf.Tensor], deltas: Sequence[tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-level RPN maps ``(B, h, w, R)`` and ``(B, h, w, 4R)`` -> ``(B, A)`` logits and ``(B, A, 4)`` deltas (``pyramid_anchors``' order)."""
    batch = tf.shape(logits[0])[0]
    flat_logits = tf.concat([tf.reshape(tf.cast(l, tf.float32), [batch, -1]) for l in logits], axis=1)
    flat_deltas = tf.concat([tf.reshape(tf.cast(d, tf.float32), [batch, -1, 4]) for d in deltas], axis=1)
    return flat_logits, flat_deltas


def propose(
    logits: tf.Tensor,
    deltas: tf.Tensor,
    anchors: tf.Tensor,
    pre_nms: int,
    post_nms: int,
    iou_threshold: float,
) -> tuple[tf.Tensor, tf.Tensor]:
    """RPN proposals: the ``pre_nms`` best anchors per image, decoded, clipped and thinned by NMS.

    Args:
        logits: ``(B, A)`` objectness logits.
        deltas: ``(B, A, 4)``.
        anchors: ``(A, 4)`` normalised.
        pre_nms: anchors kept by score before NMS.
        post_nms: proposals kept after it.
        iou_threshold: NMS overlap.

    Returns:
        ``(boxes, valid)``: ``(B, post_nms, 4)`` normalised, padded with
        zeros, and ``(B, post_nms)`` bool.
    """
    logits, deltas = tf.stop_gradient(logits), tf.stop_gradient(deltas)
    k = tf.minimum(pre_nms, tf.shape(logits)[1])
    scores, index = tf.math.top_k(logits, k=k)
    boxes = decode_boxes(tf.gather(deltas, index, batch_dims=1), tf.gather(anchors, index))
    boxes = tf.clip_by_value(boxes, 0.0, 1.0)
    nms = tf.image.combined_non_max_suppression(
        boxes[:, :, None, :], tf.sigmoid(scores)[..., None], post_nms, post_nms, iou_threshold=iou_threshold, clip_boxes=True
    )
    valid = tf.range(post_nms)[None, :] < nms.valid_detections[:, None]
    return nms.nmsed_boxes, valid


def sample(candidates: tf.Tensor, count: tf.Tensor | int, most: int) -> tf.Tensor:
    """A random subset of ``candidates`` ``(B, N)`` bool: ``min(count, candidates)`` per row (``count`` <= ``most``)."""
    noise = tf.where(candidates, tf.random.uniform(tf.shape(candidates)), -1.0)
    k = tf.minimum(most, tf.shape(candidates)[1])
    values = tf.math.top_k(noise, k=k).values  # (B, k), descending
    take = tf.minimum(tf.cast(count, tf.int32) * tf.ones([tf.shape(candidates)[0]], tf.int32), k)
    take = tf.minimum(take, tf.reduce_sum(tf.cast(candidates, tf.int32), axis=1))
    threshold = tf.gather(values, tf.maximum(take - 1, 0), batch_dims=1)
    threshold = tf.where(take > 0, threshold, 2.0)  # above every noise value: none
    return candidates & (noise >= threshold[:, None])


def smooth_l1(diff: tf.Tensor, beta: float = 1.0 / 9.0) -> tf.Tensor:
    """Elementwise smooth L1 (Huber / beta): quadratic below ``beta``, linear above."""
    a = tf.abs(diff)
    return tf.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)
