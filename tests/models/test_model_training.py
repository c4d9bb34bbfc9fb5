"""Every model learns: loss falls on a few synthetic images, also under a strategy."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from segray import models
from segray.models.registry import TINY_OPTIONS

NAMES = models.available()


def squares(n: int = 4, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy images, each with one bright square labelled 1 on background 0."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, size, size), np.int32)
    for i in range(n):
        side = rng.integers(size // 4, size // 2)
        top, left = rng.integers(0, size - side, 2)
        labels[i, top : top + side, left : left + side] = 1
    images = labels[..., None] * 0.8 + rng.normal(0.1, 0.1, (n, size, size, 3))
    return images.astype(np.float32), labels


def pixel_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-image mean cross-entropy, (B,)."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits), axis=[1, 2])


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_synthetic_squares(name: str) -> None:
    keras.utils.set_random_seed(0)
    images, labels = squares()
    model = models.build(name, 2, **TINY_OPTIONS[name])
    optimizer = keras.optimizers.Adam(1e-2)
    # Creating Adam's slots up front saves tf.function a second trace.
    optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(pixel_loss(y, model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    losses = [float(train_step(images, labels)) for _ in range(25)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.fixture(scope="module")
def strategy() -> tf.distribute.Strategy:
    # With no TF_CONFIG this is a one-worker cluster, but variables, the
    # distributed dataset and strategy.run take the same code path as on Ray Train.
    return tf.distribute.MultiWorkerMirroredStrategy()


@pytest.mark.parametrize(
    "name",
    # SegNet's unpooling is the part that depends on a dynamic batch size; the
    # others are plain Keras layers and take 5-12 s each to trace on 2 cores.
    [n if n == "segnet" else pytest.param(n, marks=pytest.mark.slow) for n in NAMES],
)
def test_custom_train_step_runs_under_multi_worker_mirrored_strategy(
    name: str, strategy: tf.distribute.Strategy
) -> None:
    keras.utils.set_random_seed(0)
    images, labels = squares(n=4)
    global_batch = 2
    # No drop_remainder: the batch dimension stays unknown inside the graph.
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(global_batch)
    dist_dataset = strategy.experimental_distribute_dataset(dataset)
    with strategy.scope():
        model = models.build(name, 2, **TINY_OPTIONS[name])
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)

    def replica_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(pixel_loss(y, model(x, training=True)), global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function(input_signature=[dist_dataset.element_spec])
    def train_step(batch: tuple) -> tf.Tensor:
        per_replica = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    assert dist_dataset.element_spec[0].shape[0] is None
    before = [v.numpy().copy() for v in model.trainable_variables]
    losses = [float(train_step(batch)) for batch in dist_dataset]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
