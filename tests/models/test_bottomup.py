"""The bottom-up baseline: instance map -> 3-class target -> objects again (synthetic touching shapes and real nuclei)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from segray.metrics import InstanceMetrics, match_image
from segray.models import boundary_target, instances_from_classes

NUCLEI = Path(__file__).resolve().parents[1] / "data" / "nuclei" / "mask2d.tif"


def test_boundary_target_hand_worked():
    # Two touching 3x3 squares side by side (ids 1 and 2) in a 5 x 8 image.
    ids = np.zeros((5, 8), np.int64)
    ids[1:4, 1:4] = 1
    ids[1:4, 4:7] = 2
    target = boundary_target(ids)
    assert target.tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 2, 2, 2, 2, 2, 2, 0],
        [0, 2, 1, 2, 2, 1, 2, 0],
        [0, 2, 2, 2, 2, 2, 2, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
    # The image edge is not a boundary; a width of 2 eats a 5x5 object down to its centre.
    full = np.ones((5, 5), np.int64)
    assert (boundary_target(full) == 1).all()
    block = np.zeros((7, 7), np.int64)
    block[1:6, 1:6] = 3
    assert (boundary_target(block, width=2) == 1).sum() == 1
    assert boundary_target(np.stack([ids, ids])).shape == (2, 5, 8)
    with pytest.raises(ValueError, match="at least 1 pixel"):
        boundary_target(ids, width=0)


def touching_shapes(seed: int, size: int = 96) -> np.ndarray:
    """Disks and rectangles packed so that many touch: a grid of cells, each shape filling most of its cell."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    ids = np.zeros((size, size), np.int64)
    cell, k = 24, 0
    for cy in range(0, size, cell):
        for cx in range(0, size, cell):
            k += 1
            if rng.random() < 0.5:
                r = rng.uniform(10, 14)  # radius past half a cell: it touches (and is cut by) its neighbours
                shape = (yy - cy - cell / 2) ** 2 + (xx - cx - cell / 2) ** 2 <= r * r
                ids[shape & (ids == 0)] = k
            else:
                ids[cy : cy + cell, cx : cx + int(rng.integers(14, cell + 1))] = k
    return ids


def matched_ious(truth: np.ndarray, found: np.ndarray) -> np.ndarray:
    """For each truth object, its best IoU with a found object."""
    top = int(truth.max())
    classes = (np.bincount(truth.reshape(-1), minlength=top + 1)[1:] > 0).astype(np.int64)  # 0: an unused id
    match = match_image(found, np.ones(int(found.max()), np.int64), truth, classes, np.ones(top))
    return match.best_iou[classes > 0]


@pytest.mark.parametrize("seed", [0, 1])
def test_touching_shapes_come_back_from_their_target(seed):
    truth = touching_shapes(seed)
    a, b = truth[:, :-1], truth[:, 1:]
    assert ((a > 0) & (b > 0) & (a != b)).sum() >= 20  # objects touch along many pixels
    n_truth = len(np.unique(truth)) - 1
    target = boundary_target(truth)
    probabilities = np.eye(3, dtype=np.float32)[target] * 0.8 + 0.2 / 3  # soft, argmax still the target
    for prediction in (target, probabilities):
        out = instances_from_classes(prediction)
        assert out["instances"].dtype == np.uint16 and len(out["scores"]) == n_truth
        assert np.all(np.diff(out["scores"]) <= 0)  # ids in descending score order
        assert (matched_ious(truth, out["instances"].astype(np.int64)) > 0.8).all()
        metrics = InstanceMetrics(num_classes=2)
        metrics.add("shapes", truth, np.ones(int(truth.max()), np.int64), out["instances"], out["classes"], out["scores"])
        assert metrics.summary()["ap50"] == pytest.approx(1.0, abs=1e-12)


def test_nuclei_come_back_from_their_target():
    truth = cv2.imread(str(NUCLEI), cv2.IMREAD_UNCHANGED).astype(np.int64)
    assert truth.shape == (512, 512) and len(np.unique(truth)) - 1 == 125
    out = instances_from_classes(boundary_target(truth), min_size=4)
    ious = matched_ious(truth, out["instances"].astype(np.int64))
    recovered = (ious > 0.5).mean()
    classes = (np.bincount(truth.reshape(-1))[1:] > 0).astype(np.int64)
    # COCO keeps 100 detections per image: 125 nuclei in one image cap the recall at 100/125.
    capped, wide = InstanceMetrics(num_classes=2), InstanceMetrics(num_classes=2, max_detections=200)
    for metrics in (capped, wide):
        metrics.add("nuclei", truth, classes, out["instances"], out["classes"], out["scores"])
    summary = wide.summary()
    print(f"nuclei target -> post-processing: AP50 {summary['ap50']:.3f} AP {summary['ap']:.3f} PQ {summary['pq']:.3f}")
    assert summary["ap50"] >= 0.95 and summary["pq"] >= 0.95
    assert capped.summary()["ar100"] <= 100 / 125
    print(f"nuclei recovered at IoU > 0.5: {recovered:.3f} ({int((ious > 0.5).sum())}/125), found {len(out['scores'])} objects")
    assert recovered >= 0.95


def test_nuclei_from_blurred_noisy_probabilities():
    """Soft predictions (the target blurred and noised): a seed threshold on P(interior) keeps touching nuclei apart."""
    from scipy import ndimage

    truth = cv2.imread(str(NUCLEI), cv2.IMREAD_UNCHANGED).astype(np.int64)
    onehot = np.eye(3, dtype=np.float32)[boundary_target(truth)]
    blurred = np.stack([ndimage.gaussian_filter(onehot[..., k], 1.5) for k in range(3)], axis=-1)
    noisy = blurred + np.random.default_rng(0).uniform(0, 0.2, blurred.shape).astype(np.float32)
    probabilities = noisy / noisy.sum(axis=-1, keepdims=True)
    out = instances_from_classes(probabilities, interior_threshold=0.7)
    assert (matched_ious(truth, out["instances"].astype(np.int64)) > 0.5).mean() >= 0.95
    assert 0.0 < out["scores"].min() <= out["scores"].max() < 1.0


def test_seeds_under_min_size_are_dropped_and_bad_input_raises():
    labels = np.zeros((8, 8), np.int64)
    labels[1, 1] = 1  # a one-pixel interior: no seed at min_size 2
    labels[3:7, 3:7] = 2
    labels[4:6, 4:6] = 1  # a 2x2 interior: a seed
    assert len(instances_from_classes(labels, min_size=2)["scores"]) == 1
    assert len(instances_from_classes(labels, min_size=1)["scores"]) == 2
    with pytest.raises(ValueError, match="label map holds 0 background"):
        instances_from_classes(labels + 1)
    with pytest.raises(ValueError, match="got shape"):
        instances_from_classes(np.zeros((4, 4, 2), np.float32))


def test_tf_boundary_target_equals_numpy():
    import tensorflow as tf

    from segray.models.bottomup import tf_boundary_target

    rng = np.random.default_rng(3)
    ids = rng.integers(0, 5, (3, 9, 13)).astype(np.int32)
    ids[0, :4, :5] = 7  # a block touching the image's edge: its edge rows are interior
    for width in (1, 2):
        assert (tf_boundary_target(tf.constant(ids), width).numpy() == boundary_target(ids, width)).all()


def test_unet_instance_learns_touching_shapes():
    """A tiny overfit of ``unet-instance`` with its own loss: val AP50 on the same images rises from ~0 to most objects found."""
    import keras
    import tensorflow as tf

    from segray import models
    from segray.data.synthetic_instances import make_instances
    from segray.models.bottomup import BottomUpLoss

    rng = np.random.default_rng(0)
    samples = [make_instances(rng, 32, 32, 3) for _ in range(4)]
    images = np.stack([s[0] for s in samples]).astype(np.float32) / 127.5 - 1.0
    ids = np.stack([s[1] for s in samples]).astype(np.int32)
    m = int(ids.max())
    classes = np.zeros((4, m), np.int32)
    for b, (_, _, lookup) in enumerate(samples):
        for k, c in lookup.items():
            classes[b, k - 1] = c
    keras.utils.set_random_seed(0)
    model = models.build("unet-instance", 3, depth=2, width=16, dropout=0.0)
    loss = BottomUpLoss(model)
    optimizer = keras.optimizers.Adam(1e-2)

    def ap50() -> float:
        metrics = InstanceMetrics(3)
        for b, found in enumerate(models.predict_instances(model, images)):
            metrics.add(str(b), ids[b], classes[b][: ids[b].max()], found["instances"], found["classes"], found["scores"])
        return float(metrics.summary()["ap50"])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value, _ = loss(tf.constant(images), tf.constant(ids), tf.constant(classes))
        optimizer.apply(tape.gradient(value, model.trainable_variables), model.trainable_variables)
        return value

    before = ap50()
    losses = [float(step()) for _ in range(150)]
    after = ap50()
    assert losses[-1] < 0.5 * losses[0], losses[::25]
    print(f"AP50 {before:.3f} -> {after:.3f}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert before < 0.2 and after > 0.6, (before, after)
