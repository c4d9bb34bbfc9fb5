"""Mask R-CNN: build, save and reload, its loss on the instance batch, a short overfit, and pasting."""

from __future__ import annotations

import copy
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from segray import models
from segray.models import detection as det
from segray.models import maskrcnn as mr

TINY = dict(models.spec("maskrcnn").tiny_options)
M = 8  # max_instances of the test batches


def scene(size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image with a rectangle (class 1), an ellipse (class 2) and a second rectangle (class 1), not touching.

    Returns ``(image (1, H, W, 3) float32 normalised, instances (1, H, W) int32, classes (1, M) int32)``.
    """
    instances = np.zeros((size, size), np.int32)
    instances[6:26, 6:30] = 1
    yy, xx = np.mgrid[:size, :size]
    instances[((yy - 45) / 12.0) ** 2 + ((xx - 20) / 14.0) ** 2 <= 1] = 2
    instances[34:58, 42:58] = 3
    classes = np.zeros(M, np.int32)
    classes[:3] = [1, 2, 1]
    colours = np.array([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.9, 0.3], [0.9, 0.2, 0.2]], np.float32)
    image = colours[instances] + np.random.default_rng(0).normal(0, 0.05, (size, size, 3)).astype(np.float32)
    return ((image - 0.4) / 0.3)[None], instances[None], classes[None]


@pytest.fixture(scope="module")
def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return models.build("maskrcnn", 3, **TINY)


def test_registry_lists_maskrcnn_as_an_instance_model_apart_from_the_semantic_walks() -> None:
    entry = models.spec("maskrcnn")
    assert entry.task == "instance" and entry.no_xla and entry.multiple() == 32
    assert "maskrcnn" not in models.available() and "unet" in models.available()
    assert models.available("instance") == ["maskrcnn", "unet-instance"]
    assert set(models.available(None)) == set(models.available()) | {"maskrcnn", "unet-instance"}
    with pytest.raises(ValueError, match="instance models: maskrcnn"):
        models.spec("maskrcnnn")


def test_forward_gives_padded_detections_of_the_contracted_shapes(tiny_model: keras.Model) -> None:
    images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    out = tiny_model(images, training=False)
    d = TINY["max_detections"]
    assert tuple(out["boxes"].shape) == (2, d, 4) and tuple(out["scores"].shape) == (2, d)
    assert tuple(out["classes"].shape) == (2, d) and out["classes"].dtype == tf.int32
    assert tuple(out["masks"].shape) == (2, d, 2 * TINY["mask_roi_size"], 2 * TINY["mask_roi_size"])
    assert tuple(out["count"].shape) == (2,)
    for key in ("boxes", "scores", "masks"):
        assert np.isfinite(out[key].numpy()).all()
    count = out["count"].numpy()
    assert (count >= 0).all() and (count <= d).all()
    for b in range(2):
        real = out["classes"][b, : count[b]].numpy()
        assert ((real >= 1) & (real <= 2)).all()
        boxes = out["boxes"][b, : count[b]].numpy()
        assert ((boxes >= 0) & (boxes <= 1)).all()
    # A graph with unknown batch and size takes other sizes too.
    forward = tf.function(tiny_model, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    assert tuple(forward(tf.zeros((1, 96, 64, 3)))["masks"].shape)[:2] == (1, d)


def test_side_not_divisible_by_32_is_refused_with_the_valid_sizes() -> None:
    with pytest.raises(ValueError, match=r"maskrcnn needs height and width divisible by 32, got 48x64; nearest valid height: 32 or 64"):
        models.build("maskrcnn", 3, (48, 64, 3), **TINY)
    with pytest.raises(ValueError, match="anchor_sizes"):
        models.build("maskrcnn", 3, **{**TINY, "anchor_sizes": (8,)})
    with pytest.raises(ValueError, match="num_classes counts the background"):
        models.build("maskrcnn", 1, **TINY)


def test_get_config_round_trip_and_safe_mode_load_give_identical_outputs(tiny_model: keras.Model, tmp_path) -> None:
    image, _, _ = scene()
    tiny_model(image, training=True)  # moves batch-norm statistics, so non-trainable weights count too
    expected = tiny_model(image, training=False)
    config = tiny_model.get_config()
    clone = keras.Model.from_config(copy.deepcopy(config))
    assert clone.get_config() == config
    clone.set_weights(tiny_model.get_weights())
    path = tmp_path / "maskrcnn.keras"
    tiny_model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for other in (clone, loaded):
        got = other(image, training=False)
        for key in expected:
            np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())


def test_instance_boxes_come_from_the_id_map() -> None:
    ids = np.zeros((1, 8, 10), np.int32)
    ids[0, 1:3, 2:5] = 1  # rows 1-2, columns 2-4
    ids[0, 4:8, 9] = 3  # id 2 absent
    boxes, present, onehot = det.instance_boxes(tf.constant(ids), 4)
    np.testing.assert_allclose(boxes.numpy()[0], [[1 / 8, 2 / 10, 3 / 8, 5 / 10], [0, 0, 0, 0], [4 / 8, 9 / 10, 1, 1], [0, 0, 0, 0]], atol=1e-6)
    assert present.numpy().tolist() == [[True, False, True, False]]
    assert onehot.numpy()[0, :, :, 0].sum() == 6


def test_box_coding_round_trips_and_iou_is_hand_computed() -> None:
    anchors = tf.constant([[0.1, 0.1, 0.3, 0.5], [0.0, 0.0, 1.0, 1.0]])
    boxes = tf.constant([[0.15, 0.05, 0.35, 0.45], [0.2, 0.3, 0.6, 0.9]])
    np.testing.assert_allclose(det.decode_boxes(det.encode_boxes(boxes, anchors), anchors).numpy(), boxes.numpy(), atol=1e-6)
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 7.
    iou = det.box_iou(tf.constant([[0.0, 0.0, 2.0, 2.0]]), tf.constant([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0]]))
    np.testing.assert_allclose(iou.numpy(), [[1 / 7, 0.0]], atol=1e-6)


def test_sample_takes_at_most_the_count_and_only_candidates() -> None:
    candidates = tf.constant([[True, False, True, True, True], [False, True, False, False, False], [False] * 5])
    chosen = det.sample(candidates, 2, 4).numpy()
    assert chosen.sum(axis=1).tolist() == [2, 1, 0]
    assert not (chosen & ~candidates.numpy()).any()


def test_loss_is_finite_and_its_gradient_reaches_every_part(tiny_model: keras.Model) -> None:
    image, instances, classes = scene()
    loss_fn = mr.MaskRCNNLoss(tiny_model, M, rpn_batch=64, roi_batch=32)
    with tf.GradientTape() as tape:
        loss, parts = loss_fn(tf.constant(image), tf.constant(instances), tf.constant(classes))
    assert set(parts) == {"rpn_class", "rpn_box", "class", "box", "mask"}
    assert np.isfinite(float(loss)) and all(float(v) > 0 for v in parts.values())
    # One image on the default strategy's one replica: the global batch is 1.
    assert float(loss) == pytest.approx(sum(float(v) for v in parts.values()), rel=1e-5)
    groups = {part: tiny_model.get_layer(part).trainable_variables for part in ("fpn", "rpn_head", "box_head", "mask_head")}
    assert sum(len(v) for v in groups.values()) == len(tiny_model.trainable_variables)
    grads = tape.gradient(loss, groups)
    for part, variables in groups.items():
        missing = [v.path for v, g in zip(variables, grads[part]) if g is None or not np.any(g.numpy())]
        assert not missing, f"{part}: no gradient reaches {missing}"


def test_empty_image_gives_a_finite_loss(tiny_model: keras.Model) -> None:
    image, _, _ = scene()
    loss, parts = mr.MaskRCNNLoss(tiny_model, M, rpn_batch=64, roi_batch=32)(
        tf.constant(image), tf.zeros((1, 64, 64), tf.int32), tf.zeros((1, M), tf.int32)
    )
    assert np.isfinite(float(loss)) and float(parts["mask"]) == 0.0 and float(parts["box"]) == 0.0


def test_paste_gives_contested_pixels_to_the_higher_score_and_renumbers() -> None:
    full = np.ones((3, 4, 4), np.float32)
    boxes = np.array([[0, 0, 4, 4], [2, 2, 6, 6], [0, 0, 2, 2]], np.float32)
    scores = np.array([0.5, 0.9, 0.1], np.float32)
    instance_map, keep = mr.paste_instances(boxes, full, scores, 8, 8)
    # Object 1 (score 0.9) is pasted first and keeps rows/columns 2-5; object 0
    # keeps the rest of its box; object 2 lies inside object 0's box and gets nothing.
    assert keep.tolist() == [1, 0]
    assert instance_map.dtype == np.uint16
    assert (instance_map[2:6, 2:6] == 1).all()
    assert (instance_map[0:2, 0:4] == 2).all() and (instance_map[0:4, 0:2] == 2).all()
    assert (instance_map[6:, :] == 0).all() and int(instance_map.max()) == 2
    # A mask that covers only its left half in the box.
    half = np.zeros((1, 4, 4), np.float32)
    half[0, :, :2] = 1
    instance_map, keep = mr.paste_instances(np.array([[0, 0, 4, 8]], np.float32), half, np.ones(1, np.float32), 4, 8)
    assert (instance_map[:, :4] == 1).all() and (instance_map[:, 4:] == 0).all()


def _iou_with_best(truth: np.ndarray, predicted: np.ndarray, k: int) -> float:
    t = truth == k
    return max([float((t & (predicted == j)).sum() / (t | (predicted == j)).sum()) for j in range(1, int(predicted.max()) + 1)] or [0.0])


@pytest.mark.slow
def test_a_short_training_overfits_one_scene() -> None:
    """The step loop.py runs (strategy.run in a tf.function) on one synthetic scene: the loss drops and the objects come back."""
    image, instances, classes = scene()
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = models.build("maskrcnn", 3, **TINY)
        optimizer = keras.optimizers.Adam(3e-3)
    loss_fn = mr.MaskRCNNLoss(model, M, rpn_batch=64, roi_batch=32)

    def replica(images, ids, cls):
        with tf.GradientTape() as tape:
            loss, _ = loss_fn(images, ids, cls)
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    step = tf.function(lambda images, ids, cls: strategy.run(replica, args=(images, ids, cls)))
    batch = tf.constant(image), tf.constant(instances), tf.constant(classes)
    start = time.time()
    losses = [float(step(*batch)) for _ in range(150)]
    seconds = time.time() - start
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < first / 5, f"loss {first:.3f} -> {last:.3f} in {seconds:.0f} s"
    predicted = mr.predict_instances(model, image)[0]
    assert predicted["instances"].shape == (64, 64) and predicted["instances"].dtype == np.uint16
    ious = [_iou_with_best(instances[0], predicted["instances"], k) for k in (1, 2, 3)]
    assert min(ious) > 0.5, f"IoU per object {ious}, loss {first:.3f} -> {last:.3f}"
    # The best object of each truth has its class.
    assert len(predicted["classes"]) == int(predicted["instances"].max())


def test_mixed_precision_model_gives_float32_detections(mixed_float16: None) -> None:
    model = models.build("maskrcnn", 3, **TINY)
    assert model.get_layer("fpn").get_layer("fpn_p2").compute_dtype == "float16"
    out = model(np.zeros((1, 64, 64, 3), np.float32), training=False)
    assert out["boxes"].dtype == tf.float32 and out["masks"].dtype == tf.float32
    assert np.isfinite(out["masks"].numpy()).all()
