"""Mask R-CNN (He et al., 2017) in Keras 3 on TensorFlow, trained from scratch.

A ResNet-style backbone (basic blocks; ``blocks`` per stage and ``width``
are options), an FPN (P2..P5, P6 when five anchor sizes are given), an RPN
sharing one head over the levels, RoIAlign from the level that suits each
box, a box and class head, NMS per class, and a mask head on the final
detections.

The saved model maps normalised float32 images ``(B, H, W, 3)`` (sides
divisible by 32) to a dict of padded detections: ``boxes`` ``(B, D, 4)``
normalised ``(y1, x1, y2, x2)``, ``classes`` ``(B, D)`` int32 (>= 1),
``scores`` ``(B, D)``, ``masks`` ``(B, D, S, S)`` probabilities inside each
box, and ``count`` ``(B,)`` (the first ``count`` rows are real).

Training is not a forward pass of that model: proposals are sampled against
the truth between the RPN and the heads. ``MaskRCNNLoss`` runs the model's
parts (its sub-models ``fpn``, ``rpn_head``, ``box_head``, ``mask_head``)
on a batch of the instance contract and returns the loss to differentiate,
divided by the global batch, to be called inside ``strategy.run`` as
segray's own train step calls ``TrainingLoss``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from segray.models import blocks
from segray.models import detection as det
from segray.models.layers import DivisibleSizeCheck, check_static_size

# Height and width must be divisible by the stride of C5.
INPUT_MULTIPLE = 32


def input_multiple(**_: Any) -> int:
    """What Mask R-CNN needs height and width divisible by (the stride of its coarsest level)."""
    return INPUT_MULTIPLE


def _floats(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values]


@keras.saving.register_keras_serializable(package="segray")
class Proposals(keras.layers.Layer):
    """RPN outputs of every level -> ``(B, N, 4)`` proposals (normalised boxes, zero rows padding).

    Call on ``[image, logits_P2, ..., deltas_P2, ...]``; the image is read only for its size.
    """

    def __init__(self, anchor_sizes: Sequence[float], anchor_ratios: Sequence[float], pre_nms: int, post_nms: int, iou_threshold: float, **kwargs: Any) -> None:
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.anchor_sizes, self.anchor_ratios = _floats(anchor_sizes), _floats(anchor_ratios)
        self.pre_nms, self.post_nms, self.iou_threshold = int(pre_nms), int(post_nms), float(iou_threshold)
        self.supports_jit = False  # combined NMS has no XLA kernel

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        image, maps = inputs[0], inputs[1:]
        levels = len(self.anchor_sizes)
        logits, deltas = det.flatten_rpn(maps[:levels], maps[levels:])
        anchors = det.pyramid_anchors([tf.shape(m)[1:3] for m in maps[:levels]], tf.shape(image)[1:3], self.anchor_sizes, self.anchor_ratios)
        boxes, valid = det.propose(logits, deltas, anchors, self.pre_nms, self.post_nms, self.iou_threshold)
        return tf.where(valid[..., None], boxes, 0.0)

    def compute_output_shape(self, input_shape: list[tuple]) -> tuple:
        return (input_shape[0][0], self.post_nms, 4)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "anchor_sizes": self.anchor_sizes, "anchor_ratios": self.anchor_ratios,
                "pre_nms": self.pre_nms, "post_nms": self.post_nms, "iou_threshold": self.iou_threshold}


@keras.saving.register_keras_serializable(package="segray")
class RoIAlign(keras.layers.Layer):
    """Call on ``[image, boxes (B, N, 4), P2, P3, ...]`` -> ``(B * N, crop, crop, C)`` pooled from each box's level."""

    def __init__(self, crop: int, base_size: float, **kwargs: Any) -> None:
        # Boxes stay float32 under mixed precision (bfloat16 would move them by pixels); features keep their dtype.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.crop, self.base_size = int(crop), float(base_size)

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        image, boxes, features = inputs[0], inputs[1], inputs[2:]
        return det.multilevel_roi_align(features, boxes, self.crop, tuple(tf.unstack(tf.shape(image)[1:3])), self.base_size)

    def compute_output_shape(self, input_shape: list[tuple]) -> tuple:
        return (None, self.crop, self.crop, input_shape[2][-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "crop": self.crop, "base_size": self.base_size}


@keras.saving.register_keras_serializable(package="segray")
class Detections(keras.layers.Layer):
    """Box head outputs -> final detections by per-class NMS.

    Call on ``[rois (B, N, 4), class_logits (B * N, K), deltas (B * N, K * 4)]``;
    returns ``(boxes (B, D, 4), classes (B, D) int32 >= 1, scores (B, D), count (B,))``.
    """

    def __init__(self, num_classes: int, max_detections: int, iou_threshold: float, score_threshold: float, **kwargs: Any) -> None:
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.num_classes, self.max_detections = int(num_classes), int(max_detections)
        self.iou_threshold, self.score_threshold = float(iou_threshold), float(score_threshold)
        self.supports_jit = False

    def call(self, inputs: list[tf.Tensor]) -> tuple[tf.Tensor, ...]:
        rois, class_logits, deltas = inputs
        batch, count, k = tf.shape(rois)[0], tf.shape(rois)[1], self.num_classes
        probs = tf.reshape(tf.nn.softmax(tf.cast(class_logits, tf.float32)), [batch, count, k])
        deltas = tf.reshape(tf.cast(deltas, tf.float32), [batch, count, k, 4])[:, :, 1:]
        boxes = tf.clip_by_value(det.decode_boxes(deltas, rois[:, :, None, :]), 0.0, 1.0)
        real = (rois[..., 2] > rois[..., 0]) & (rois[..., 3] > rois[..., 1])
        scores = tf.where(real[..., None], probs[..., 1:], 0.0)
        nms = tf.image.combined_non_max_suppression(
            boxes, scores, self.max_detections, self.max_detections, iou_threshold=self.iou_threshold,
            score_threshold=self.score_threshold, clip_boxes=True,
        )
        return nms.nmsed_boxes, tf.cast(nms.nmsed_classes, tf.int32) + 1, nms.nmsed_scores, nms.valid_detections

    def compute_output_spec(self, inputs: list) -> tuple:
        b, d = inputs[0].shape[0], self.max_detections
        return (keras.KerasTensor((b, d, 4), "float32"), keras.KerasTensor((b, d), "int32"),
                keras.KerasTensor((b, d), "float32"), keras.KerasTensor((b,), "int32"))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes, "max_detections": self.max_detections,
                "iou_threshold": self.iou_threshold, "score_threshold": self.score_threshold}


@keras.saving.register_keras_serializable(package="segray")
class ClassMasks(keras.layers.Layer):
    """Call on ``[mask_logits (B * D, S, S, K), classes (B, D)]`` -> ``(B, D, S, S)`` probabilities of each detection's class."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        logits, classes = inputs
        batch, count = tf.shape(classes)[0], tf.shape(classes)[1]
        size = logits.shape[1]
        chosen = tf.gather(tf.cast(logits, tf.float32), tf.reshape(classes, [-1]), axis=3, batch_dims=1)  # (B*D, S, S)
        return tf.sigmoid(tf.reshape(chosen, [batch, count, size, size]))

    def compute_output_shape(self, input_shape: list[tuple]) -> tuple:
        logits, classes = input_shape
        return (classes[0], classes[1], logits[1], logits[2])


def _residual_block(x: Any, filters: int, name: str, strides: int = 1) -> Any:
    """ResNet basic block whose strided shortcut is a 2x2 average pool then a 1x1 conv (ResNet-D).

    Not ``blocks.residual_block``'s strided 1x1 conv: oneDNN's gradient of a
    strided 1x1 conv corrupts the heap on a batch of one image (TensorFlow
    2.21, CPU), and Mask R-CNN trains on batches that small.
    """
    shortcut = x
    if strides != 1:
        shortcut = keras.layers.AveragePooling2D(strides, padding="same", name=f"{name}_down")(shortcut)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = blocks.conv_bn_relu(shortcut, filters, f"{name}_proj", kernel_size=1, activation=False)
    y = blocks.conv_bn_relu(x, filters, f"{name}_1", strides=strides)
    y = blocks.conv_bn_relu(y, filters, f"{name}_2", activation=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _backbone_fpn(shape: tuple, blocks_per_stage: Sequence[int], width: int, fpn_filters: int, levels: int) -> keras.Model:
    """ResNet (basic blocks) + FPN: image -> ``[P2, ..., P(levels + 1)]``."""
    inputs = keras.Input(shape, name="image")
    x = blocks.conv_bn_relu(inputs, width, "stem", kernel_size=7, strides=2)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    stages = []
    for stage, count in enumerate(blocks_per_stage):
        for block in range(count):
            x = _residual_block(x, width * 2**stage, f"c{stage + 2}_{block + 1}", strides=2 if stage and not block else 1)
        stages.append(x)
    top = None
    outputs = []
    for stage in reversed(range(len(stages))):
        lateral = keras.layers.Conv2D(fpn_filters, 1, name=f"fpn_lateral{stage + 2}")(stages[stage])
        if top is not None:
            lateral = keras.layers.Add(name=f"fpn_add{stage + 2}")([lateral, keras.layers.UpSampling2D(2, name=f"fpn_up{stage + 2}")(top)])
        top = lateral
        if stage < levels:  # a level no anchors or RoIs use gets no output conv (it would train nothing)
            outputs.insert(0, keras.layers.Conv2D(fpn_filters, 3, padding="same", name=f"fpn_p{stage + 2}")(lateral))
    if levels > len(outputs):
        outputs.append(keras.layers.MaxPooling2D(1, strides=2, name="fpn_p6")(outputs[-1]))
    return keras.Model(inputs, outputs, name="fpn")


def _rpn_head(filters: int, anchors: int) -> keras.Model:
    inputs = keras.Input((None, None, filters), name="feature")
    init = keras.initializers.RandomNormal(stddev=0.01)
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_initializer=init, name="rpn_conv")(inputs)
    logits = keras.layers.Conv2D(anchors, 1, kernel_initializer=init, dtype="float32", name="rpn_logits")(x)
    deltas = keras.layers.Conv2D(4 * anchors, 1, kernel_initializer=init, dtype="float32", name="rpn_deltas")(x)
    return keras.Model(inputs, [logits, deltas], name="rpn_head")


def _box_head(roi_size: int, filters: int, hidden: int, num_classes: int) -> keras.Model:
    inputs = keras.Input((roi_size, roi_size, filters), name="roi")
    x = keras.layers.Flatten(name="box_flatten")(inputs)
    x = keras.layers.Dense(hidden, activation="relu", name="box_fc1")(x)
    x = keras.layers.Dense(hidden, activation="relu", name="box_fc2")(x)
    logits = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01), dtype="float32", name="class_logits")(x)
    deltas = keras.layers.Dense(4 * num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001), dtype="float32", name="box_deltas")(x)
    return keras.Model(inputs, [logits, deltas], name="box_head")


def _mask_head(roi_size: int, filters: int, mask_filters: int, convs: int, num_classes: int) -> keras.Model:
    inputs = keras.Input((roi_size, roi_size, filters), name="roi")
    x = inputs
    for i in range(convs):
        x = keras.layers.Conv2D(mask_filters, 3, padding="same", activation="relu", kernel_initializer="he_normal", name=f"mask_conv{i + 1}")(x)
    x = keras.layers.Conv2DTranspose(mask_filters, 2, strides=2, activation="relu", kernel_initializer="he_normal", name="mask_up")(x)
    logits = keras.layers.Conv2D(num_classes, 1, dtype="float32", name="mask_logits")(x)
    return keras.Model(inputs, logits, name="mask_head")


def build_maskrcnn(
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    *,
    blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
    width: int = 64,
    fpn_filters: int = 256,
    anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512),
    anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_pre_nms: int = 1000,
    proposals: int = 1000,
    rpn_nms_iou: float = 0.7,
    roi_size: int = 7,
    head_units: int = 1024,
    mask_roi_size: int = 14,
    mask_filters: int = 256,
    mask_convs: int = 4,
    max_detections: int = 100,
    detection_iou: float = 0.5,
    score_threshold: float = 0.05,
) -> keras.Model:
    """Builds Mask R-CNN's inference model (see the module's docstring for its outputs).

    Args:
        num_classes: classes including the background (class ids ``1..num_classes - 1`` are objects).
        input_shape: ``(H, W, C)``; ``H`` and ``W`` may be ``None`` (divisible by 32 when known).
        blocks_per_stage: residual blocks in each of the 4 ResNet stages ((2, 2, 2, 2): ResNet-18's).
        width: filters of the first stage; each stage doubles them.
        fpn_filters: channels of every pyramid level.
        anchor_sizes: anchor side in pixels on P2, P3 ... (one per level, 2 to 5 levels).
        anchor_ratios: anchor width / height ratios at every position.
        rpn_pre_nms: anchors kept by objectness before the proposal NMS.
        proposals: proposals kept after it (at inference).
        rpn_nms_iou: the proposal NMS overlap.
        roi_size: RoIAlign side for the box head.
        head_units: units of the box head's two dense layers.
        mask_roi_size: RoIAlign side for the mask head; masks are twice that.
        mask_filters: channels of the mask head's convs.
        mask_convs: 3x3 convs of the mask head.
        max_detections: detections kept per image.
        detection_iou: the per-class NMS overlap of the detections.
        score_threshold: detections scoring less are dropped.

    Returns:
        A ``keras.Model`` named ``maskrcnn``.

    Raises:
        ValueError: a bad option, or a known side not divisible by 32.
    """
    shape = blocks.check_common(num_classes, input_shape, "maskrcnn")
    if num_classes < 2:
        raise ValueError(f"maskrcnn: num_classes counts the background and at least one object class, got {num_classes}")
    blocks_per_stage = tuple(int(b) for b in blocks_per_stage)
    if len(blocks_per_stage) != 4:
        raise ValueError(f"maskrcnn: blocks_per_stage needs 4 stages, got {list(blocks_per_stage)}")
    blocks.check_positive("maskrcnn", width=width, fpn_filters=fpn_filters, rpn_pre_nms=rpn_pre_nms, proposals=proposals,
                          roi_size=roi_size, head_units=head_units, mask_roi_size=mask_roi_size, mask_filters=mask_filters,
                          max_detections=max_detections, **{f"blocks_per_stage[{i}]": b for i, b in enumerate(blocks_per_stage)})
    if not 2 <= len(anchor_sizes) <= 5 or any(s <= 0 for s in anchor_sizes):
        raise ValueError(f"maskrcnn: anchor_sizes needs 2 to 5 positive sizes (P2 ...), got {list(anchor_sizes)}")
    if not anchor_ratios or any(r <= 0 for r in anchor_ratios):
        raise ValueError(f"maskrcnn: anchor_ratios needs positive width/height ratios, got {list(anchor_ratios)}")
    label = "maskrcnn"
    check_static_size(label, shape, INPUT_MULTIPLE)
    levels = len(anchor_sizes)
    roi_levels = min(levels, 4)

    fpn = _backbone_fpn(shape, blocks_per_stage, width, fpn_filters, levels)
    rpn = _rpn_head(fpn_filters, len(anchor_ratios))
    box_head = _box_head(roi_size, fpn_filters, head_units, num_classes)
    mask_head = _mask_head(mask_roi_size, fpn_filters, mask_filters, mask_convs, num_classes)

    inputs = keras.Input(shape, name="image")
    x = inputs
    if shape[0] is None or shape[1] is None:
        x = DivisibleSizeCheck(INPUT_MULTIPLE, label, name="size_check")(x)
    features = fpn(x)
    rpn_out = [rpn(f) for f in features[:levels]]
    rois = Proposals(anchor_sizes, anchor_ratios, rpn_pre_nms, proposals, rpn_nms_iou, name="proposals")(
        [x] + [o[0] for o in rpn_out] + [o[1] for o in rpn_out]
    )
    pooled = RoIAlign(roi_size, anchor_sizes[0], name="roi_align")([x, rois] + features[:roi_levels])
    class_logits, deltas = box_head(pooled)
    boxes, classes, scores, count = Detections(num_classes, max_detections, detection_iou, score_threshold, name="detections")(
        [rois, class_logits, deltas]
    )
    mask_pooled = RoIAlign(mask_roi_size, anchor_sizes[0], name="mask_roi_align")([x, boxes] + features[:roi_levels])
    masks = ClassMasks(name="masks")([mask_head(mask_pooled), classes])
    outputs = {"boxes": boxes, "classes": classes, "scores": scores, "masks": masks, "count": count}
    return keras.Model(inputs, outputs, name="maskrcnn")


class MaskRCNNLoss:
    """Mask R-CNN's training loss on a batch of the instance contract, for one replica of a data-parallel step.

    Runs the model's parts with the truth in between: RPN targets from anchor
    IoU (positive >= 0.7 or the best anchor of an object, negative < 0.3,
    ``rpn_batch`` anchors sampled per image, up to half positive), proposals
    plus the truth boxes sampled to ``roi_batch`` RoIs (``roi_positive``
    of them with IoU >= 0.5), the box and class head on those, and the mask
    head on the positive ones against the object's mask cropped to the RoI.
    Each image's five terms are means over its samples; their sum is summed
    over the replica's images and divided by the *global* batch (the images
    of all replicas), as Keras' optimizer sums the replicas' gradients.

    Args:
        model: a model from ``build_maskrcnn``.
        max_instances: ``M`` of the batch's ``classes`` ``(B, M)``; None:
            read from their static shape when the step is traced.
        rpn_batch: anchors sampled per image for the RPN loss.
        roi_batch: RoIs sampled per image for the heads.
        roi_positive: the largest fraction of them that are positive.
        train_proposals: RPN proposals per image during training (None: the model's ``proposals``).
    """

    def __init__(self, model: keras.Model, max_instances: int | None = None, rpn_batch: int = 256, roi_batch: int = 256,
                 roi_positive: float = 0.25, train_proposals: int | None = None) -> None:
        self.model, self.max_instances = model, None if max_instances is None else int(max_instances)
        self.fpn, self.rpn = model.get_layer("fpn"), model.get_layer("rpn_head")
        self.box_head, self.mask_head = model.get_layer("box_head"), model.get_layer("mask_head")
        proposal_layer = model.get_layer("proposals")
        self.anchor_sizes, self.anchor_ratios = proposal_layer.anchor_sizes, proposal_layer.anchor_ratios
        self.pre_nms, self.nms_iou = proposal_layer.pre_nms, proposal_layer.iou_threshold
        self.proposals = int(train_proposals or proposal_layer.post_nms)
        self.roi_size, self.mask_roi_size = model.get_layer("roi_align").crop, model.get_layer("mask_roi_align").crop
        self.num_classes = model.get_layer("detections").num_classes
        self.rpn_batch, self.roi_batch = int(rpn_batch), int(roi_batch)
        self.roi_positive_max = max(1, int(math.ceil(self.roi_batch * roi_positive)))

    def __call__(self, images: tf.Tensor, instances: tf.Tensor, classes: tf.Tensor, training: bool = True) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """``(loss, parts)``: the replica's loss scaled for the global batch, and its terms summed over the replica's images.

        Args:
            images: ``(B, H, W, 3)`` normalised float (the model's input).
            instances: ``(B, H, W)`` int id map (0 background, ``k`` object ``k``).
            classes: ``(B, M)`` int class of object ``k`` at ``k - 1`` (0: padding).
            training: the mode the backbone's batch norm runs in.
        """
        replica = tf.distribute.get_replica_context()
        terms = self.image_terms(images, instances, classes, training)
        local = tf.cast(tf.shape(images)[0], tf.float32)
        global_batch = replica.all_reduce(tf.distribute.ReduceOp.SUM, local) if replica is not None else local
        parts = {name: tf.reduce_sum(value) for name, value in terms.items()}
        loss = tf.add_n(list(parts.values())) / tf.maximum(global_batch, 1.0)
        return loss, parts

    def image_terms(self, images: tf.Tensor, instances: tf.Tensor, classes: tf.Tensor, training: bool = True) -> dict[str, tf.Tensor]:
        """The five loss terms of each image, ``(B,)`` each: ``rpn_class``, ``rpn_box``, ``class``, ``box``, ``mask``."""
        m = self.max_instances or classes.shape[1]
        if m is None:
            raise ValueError("MaskRCNNLoss: the batch's classes (B, M) need a static M, or pass max_instances")
        classes = tf.cast(classes, tf.int32)[:, :m]
        image_size = tuple(tf.unstack(tf.shape(images)[1:3]))
        gt_boxes, present, onehot = det.instance_boxes(instances, m)
        present = present & (classes > 0)
        levels = len(self.anchor_sizes)

        features = self.fpn(images, training=training)
        rpn_out = [self.rpn(f, training=training) for f in features[:levels]]
        logits, deltas = det.flatten_rpn([o[0] for o in rpn_out], [o[1] for o in rpn_out])
        anchors = det.pyramid_anchors([tf.shape(o[0])[1:3] for o in rpn_out], image_size, self.anchor_sizes, self.anchor_ratios)
        terms = self._rpn_terms(logits, deltas, anchors, gt_boxes, present)

        proposals, valid = det.propose(logits, deltas, anchors, self.pre_nms, self.proposals, self.nms_iou)
        # Sampled from the proposals and the truth boxes: at most that many.
        roi_batch = min(self.roi_batch, self.proposals + m)
        positive_max = min(self.roi_positive_max, roi_batch)
        rois, labels, weights, targets, matched = self._sample_rois(proposals, valid, gt_boxes, present, classes, roi_batch, positive_max)
        roi_levels = min(levels, 4)
        pooled = det.multilevel_roi_align(features[:roi_levels], rois, self.roi_size, image_size, self.anchor_sizes[0])
        class_logits, box_deltas = self.box_head(pooled, training=training)
        batch, count = tf.shape(rois)[0], roi_batch
        class_logits = tf.reshape(tf.cast(class_logits, tf.float32), [batch, count, self.num_classes])
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=class_logits)
        samples = tf.maximum(tf.reduce_sum(weights, axis=1), 1.0)
        terms["class"] = tf.reduce_sum(ce * weights, axis=1) / samples
        box_deltas = tf.reshape(tf.cast(box_deltas, tf.float32), [batch, count, self.num_classes, 4])
        chosen = tf.gather(box_deltas, labels, axis=2, batch_dims=2)  # (B, R, 4)
        positive = tf.cast(labels > 0, tf.float32)
        box = tf.reduce_sum(det.smooth_l1(chosen - det.encode_boxes(targets, rois)), axis=-1)
        terms["box"] = tf.reduce_sum(box * positive, axis=1) / samples

        # Positives come first in the sampled RoIs (they are sampled by priority), so the
        # mask head runs on the first roi_positive_max only.
        f = positive_max
        mask_rois, mask_labels, mask_matched = rois[:, :f], labels[:, :f], matched[:, :f]
        mask_pooled = det.multilevel_roi_align(features[:roi_levels], mask_rois, self.mask_roi_size, image_size, self.anchor_sizes[0])
        mask_logits = tf.cast(self.mask_head(mask_pooled, training=training), tf.float32)  # (B*F, S, S, K)
        size = mask_logits.shape[1]
        mask_logits = tf.gather(mask_logits, tf.reshape(mask_labels, [-1]), axis=3, batch_dims=1)
        mask_targets = self._mask_targets(onehot, mask_rois, mask_matched, size)
        bce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=mask_targets, logits=mask_logits), axis=[1, 2])
        mask_positive = tf.reshape(tf.cast(mask_labels > 0, tf.float32), [-1])
        bce = tf.reshape(bce * mask_positive, [batch, f])
        terms["mask"] = tf.reduce_sum(bce, axis=1) / tf.maximum(tf.reduce_sum(tf.reshape(mask_positive, [batch, f]), axis=1), 1.0)
        return terms

    def _rpn_terms(self, logits, deltas, anchors, gt_boxes, present) -> dict[str, tf.Tensor]:
        iou = det.box_iou(anchors[None], gt_boxes)  # (B, A, M)
        iou = tf.where(present[:, None, :], iou, -1.0)
        best = tf.reduce_max(iou, axis=1, keepdims=True)  # each object's best anchor
        is_best = tf.reduce_any((iou >= best - 1e-6) & (best > 0.0) & present[:, None, :], axis=2)
        max_iou = tf.reduce_max(iou, axis=2)
        positive = (max_iou >= 0.7) | is_best
        negative = (max_iou < 0.3) & ~positive
        half = self.rpn_batch // 2
        positive = det.sample(positive, half, half)
        taken = tf.reduce_sum(tf.cast(positive, tf.int32), axis=1)
        negative = det.sample(negative, self.rpn_batch - taken, self.rpn_batch)
        weights = tf.cast(positive | negative, tf.float32)
        samples = tf.maximum(tf.reduce_sum(weights, axis=1), 1.0)
        bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(positive, tf.float32), logits=logits)
        matched = tf.gather(gt_boxes, tf.argmax(iou, axis=2, output_type=tf.int32), batch_dims=1)
        box = tf.reduce_sum(det.smooth_l1(deltas - det.encode_boxes(matched, anchors[None])), axis=-1)
        return {"rpn_class": tf.reduce_sum(bce * weights, axis=1) / samples,
                "rpn_box": tf.reduce_sum(box * tf.cast(positive, tf.float32), axis=1) / samples}

    def _sample_rois(self, proposals, valid, gt_boxes, present, classes, roi_batch, positive_max):
        """``roi_batch`` RoIs per image, positives first: ``(rois, labels, weights, target boxes, matched object index)``."""
        boxes = tf.concat([proposals, gt_boxes], axis=1)
        valid = tf.concat([valid, present], axis=1)
        iou = tf.where(present[:, None, :], det.box_iou(boxes, gt_boxes), -1.0)
        max_iou = tf.reduce_max(iou, axis=2)
        matched = tf.argmax(iou, axis=2, output_type=tf.int32)
        positive = det.sample(valid & (max_iou >= 0.5), positive_max, positive_max)
        negative = valid & (max_iou < 0.5)
        noise = tf.random.uniform(tf.shape(max_iou))
        priority = tf.where(positive, 2.0 + noise, tf.where(negative, 1.0 + noise, -1.0 + noise))
        order = tf.math.top_k(priority, k=roi_batch).indices
        rois = tf.gather(boxes, order, batch_dims=1)
        picked = tf.gather(priority, order, batch_dims=1)
        matched = tf.gather(matched, order, batch_dims=1)
        is_positive = picked >= 2.0
        labels = tf.where(is_positive, tf.gather(classes, matched, batch_dims=1), 0)
        weights = tf.cast(picked >= 1.0, tf.float32)
        targets = tf.gather(gt_boxes, matched, batch_dims=1)
        return tf.stop_gradient(rois), labels, weights, targets, matched

    def _mask_targets(self, onehot, rois, matched, size) -> tf.Tensor:
        """Each RoI's object mask cropped to the RoI at ``size x size``: ``(B * F, S, S)`` float 0/1."""
        shape = tf.shape(onehot)
        batch, height, width, m = shape[0], shape[1], shape[2], shape[3]
        per_object = tf.reshape(tf.transpose(tf.cast(onehot, tf.float32), [0, 3, 1, 2]), [-1, height, width, 1])
        count = tf.shape(rois)[1]
        index = tf.reshape(tf.range(batch)[:, None] * m + matched, [-1])
        boxes = det.align_boxes(tf.reshape(rois, [-1, 4]), height, width, size)
        crops = tf.image.crop_and_resize(per_object, boxes, index, (size, size))[..., 0]
        del count
        return tf.stop_gradient(tf.cast(crops >= 0.5, tf.float32))


def predict_instances(model: keras.Model, images: np.ndarray | tf.Tensor, threshold: float = 0.5) -> list[dict[str, np.ndarray]]:
    """Per-image detections in pixels, pasted into instance maps (the instance prediction contract).

    Args:
        model: a model from ``build_maskrcnn`` (or its saved ``.keras``).
        images: ``(B, H, W, 3)`` normalised float32, sides divisible by 32.
        threshold: mask probability from which a pixel belongs to an object.

    Returns:
        One dict per image: ``instances`` uint16 ``(H, W)`` (object ``i`` has
        value ``i + 1``, in descending score order), and for those objects
        ``boxes`` float32 ``(N, 4)`` ``(y1, x1, y2, x2)`` in pixels,
        ``classes`` int32 ``(N,)``, ``scores`` float32 ``(N,)`` and ``masks``
        float32 ``(N, S, S)`` (probabilities inside the box).
    """
    out = model(tf.convert_to_tensor(images, tf.float32), training=False)
    return instances_from_detections(out, int(images.shape[1]), int(images.shape[2]), threshold)


def instances_from_detections(out: dict[str, tf.Tensor], height: int, width: int, threshold: float = 0.5) -> list[dict[str, np.ndarray]]:
    """``predict_instances`` of the model's outputs ``out`` on ``(B, height, width, 3)`` images."""
    scale = np.array([height, width, height, width], np.float32)
    results = []
    for b in range(int(out["count"].shape[0])):
        n = int(out["count"][b])
        boxes = out["boxes"][b, :n].numpy() * scale
        masks, scores = out["masks"][b, :n].numpy(), out["scores"][b, :n].numpy()
        instance_map, keep = paste_instances(boxes, masks, scores, height, width, threshold)
        results.append({"instances": instance_map, "boxes": boxes[keep].astype(np.float32),
                        "classes": out["classes"][b, :n].numpy()[keep].astype(np.int32),
                        "scores": scores[keep].astype(np.float32), "masks": masks[keep].astype(np.float32)})
    return results


def _bilinear(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``mask`` ``(S, S)`` sampled at fractional rows ``ys`` and columns ``xs`` (clamped at the edges): ``(len(ys), len(xs))``."""
    s = mask.shape[0]

    def weights(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        coords = np.clip(coords, 0.0, s - 1.0)
        low = np.floor(coords).astype(np.int64)
        high = np.minimum(low + 1, s - 1)
        return low, high, (coords - low)[:, None]

    y0, y1, fy = weights(ys)
    rows = mask[y0] * (1 - fy) + mask[y1] * fy  # (h, S)
    x0, x1, fx = weights(xs)
    return rows[:, x0] * (1 - fx.T) + rows[:, x1] * fx.T


def paste_instances(
    boxes: np.ndarray, masks: np.ndarray, scores: np.ndarray, height: int, width: int, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Pastes box-relative masks into one full-image instance map.

    Objects go in descending score order and a pixel belongs to the
    highest-scoring object whose mask covers it (probability >= ``threshold``);
    an object left without pixels is dropped and the rest are numbered
    ``1..N`` in that order.

    Args:
        boxes: ``(N, 4)`` ``(y1, x1, y2, x2)`` in pixels (edges) of the image.
        masks: ``(N, S, S)`` probabilities over each box.
        scores: ``(N,)``.
        height: the image's height.
        width: the image's width.
        threshold: the mask probability from which a pixel is the object's.

    Returns:
        ``(instance_map, keep)``: uint16 ``(height, width)`` (0 background,
        ``i + 1`` the object ``keep[i]``), and int64 ``(K,)`` indices into
        the inputs of the objects kept, highest score first.
    """
    boxes, masks, scores = np.asarray(boxes, np.float32), np.asarray(masks, np.float32), np.asarray(scores, np.float32)
    if len(boxes) != len(masks) or len(boxes) != len(scores):
        raise ValueError(f"paste_instances: {len(boxes)} boxes, {len(masks)} masks and {len(scores)} scores; expected one of each per object")
    out = np.zeros((height, width), np.uint16)
    keep = []
    for i in np.argsort(-scores, kind="stable"):
        y1, x1, y2, x2 = (float(v) for v in boxes[i])
        r0, r1 = max(int(np.floor(y1)), 0), min(int(np.ceil(y2)), height)
        c0, c1 = max(int(np.floor(x1)), 0), min(int(np.ceil(x2)), width)
        if r1 <= r0 or c1 <= c0 or y2 <= y1 or x2 <= x1:
            continue
        s = masks[i].shape[0]
        # Mask cell j covers box fraction j/S .. (j+1)/S; its value sits at its centre.
        ys = ((np.arange(r0, r1) + 0.5) - y1) / (y2 - y1) * s - 0.5
        xs = ((np.arange(c0, c1) + 0.5) - x1) / (x2 - x1) * s - 0.5
        inside = ((np.arange(r0, r1) + 0.5 >= y1) & (np.arange(r0, r1) + 0.5 <= y2))[:, None] & \
                 ((np.arange(c0, c1) + 0.5 >= x1) & (np.arange(c0, c1) + 0.5 <= x2))[None, :]
        on = (_bilinear(masks[i], ys, xs) >= threshold) & inside
        region = out[r0:r1, c0:c1]
        free = on & (region == 0)
        if not free.any():
            continue
        keep.append(i)
        region[free] = len(keep)
    return out, np.asarray(keep, np.int64)
