"""TensorFlow confusion matrix and the Keras metric, against the numpy version."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segray.metrics import ConfusionMatrixMetric, confusion_matrix, summary, tf_confusion_matrix

IGNORE = 255


@st.composite
def label_pairs(draw):
    num_classes = draw(st.integers(1, 6))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6))
    truth = st.one_of(st.integers(0, num_classes - 1), st.just(IGNORE))
    y_true = draw(hnp.arrays(np.uint8, shape, elements=truth))
    y_pred = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, num_classes - 1)))
    return y_true, y_pred, num_classes


def test_hand_computed_case_eager_and_in_tf_function():
    y_true = tf.constant([[[0, 0, 1], [2, IGNORE, 1]]], tf.uint8)
    y_pred = tf.constant([[[0, 1, 1], [2, 0, 0]]], tf.int32)
    #            pred 0  1  2
    #   truth 0     [1, 1, 0]
    #   truth 1     [1, 1, 0]
    #   truth 2     [0, 0, 1]
    expected = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    eager = tf_confusion_matrix(y_true, y_pred, 3)
    graph = tf.function(lambda t, p: tf_confusion_matrix(t, p, 3))(y_true, y_pred)
    assert eager.dtype == tf.int64 and eager.shape == (3, 3)
    np.testing.assert_array_equal(eager, expected)
    np.testing.assert_array_equal(graph, expected)


def test_compiles_with_xla():
    # XLA drops the range check, so only the counting path is compared here.
    y_true = np.array([[0, 0, 1], [2, IGNORE, 1]], np.uint8)
    y_pred = np.array([[0, 1, 1], [2, 0, 0]], np.int32)
    jit = tf.function(lambda t, p: tf_confusion_matrix(t, p, 3), jit_compile=True)
    np.testing.assert_array_equal(jit(y_true, y_pred), confusion_matrix(y_true, y_pred, 3))
    # Both label tensors stay run-time parameters of the compiled program. Were
    # one needed as a compile-time constant (a slice at a computed index), XLA
    # would fold its values in and compile again for every new batch.
    hlo = jit.experimental_get_compiler_ir(tf.constant(y_true), tf.constant(y_pred))(stage="hlo")
    entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
    assert entry.count("[2,3]") == 2, entry


@settings(max_examples=30, deadline=None)
@given(label_pairs())
def test_equals_numpy_confusion_matrix(pair):
    y_true, y_pred, num_classes = pair
    np.testing.assert_array_equal(
        tf_confusion_matrix(y_true, y_pred, num_classes).numpy(),
        confusion_matrix(y_true, y_pred, num_classes),
    )


def test_out_of_range_labels_raise_eager_and_in_graph():
    y_true = tf.constant([0, 1, IGNORE, 3])
    y_pred = tf.constant([0, 7, 9, 0])  # 9 sits under an ignored pixel: not an error
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[0, 3\).*\n?2\b"):
        tf_confusion_matrix(y_true, y_pred, 3)
    graph = tf.function(lambda t, p: tf_confusion_matrix(t, p, 3))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"first \(truth, prediction\).*\[1 7\]"):
        graph(y_true, y_pred)


def test_rejects_float_labels_and_mismatched_shapes():
    with pytest.raises(TypeError, match="float32"):
        tf_confusion_matrix(tf.zeros([2]), tf.zeros([2], tf.int32), 2)
    with pytest.raises(ValueError, match="shape"):
        tf_confusion_matrix(tf.zeros([2], tf.int32), tf.zeros([3], tf.int32), 2)


def test_counts_exact_past_2_pow_24_pixels_in_one_call():
    # 4097 * 4096 = 2**24 + 4096 pixels of class 0, the last row predicted 1;
    # float32 bins would round the 2**24 + 0 .. 4096 region to multiples of 2.
    y_true = np.zeros((4097, 4096), np.uint8)
    y_pred = np.zeros((4097, 4096), np.uint8)
    y_pred[-1, :3] = 1
    cm = tf_confusion_matrix(y_true, y_pred, 2).numpy()
    del y_true, y_pred
    assert cm[0, 0] == 2**24 + 4096 - 3
    assert cm[0, 1] == 3
    assert cm[0, 0] + cm[0, 1] == 4097 * 4096


def test_metric_from_logits_labels_and_trailing_channel():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, (2, 5, 6)).astype(np.uint8)
    y_true[0, :2] = IGNORE
    logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
    expected = confusion_matrix(y_true, logits.argmax(-1), 4)

    for y, pred in (
        (y_true, logits),
        (y_true, logits.astype(np.float16)),  # mixed-precision outputs
        (y_true[..., None], logits),  # (B, H, W, 1) masks
        (y_true, logits.argmax(-1)),  # labels, not logits
    ):
        metric = ConfusionMatrixMetric(4)
        metric.update_state(y, pred)
        assert metric.total_cm.dtype == "int64"
        np.testing.assert_array_equal(metric.total_cm.numpy(), expected)
        assert float(metric.result()) == pytest.approx(summary(expected)["miou"], rel=1e-6)


def test_metric_accumulates_resets_and_reports_nan_when_empty():
    metric = ConfusionMatrixMetric(3)
    assert np.isnan(float(metric.result()))
    # Two batches: IoU of the sum, not the mean of the two batches' IoUs.
    metric.update_state(np.array([[0, 0, 0, 1]]), np.array([[0, 0, 0, 0]]))  # IoU [3/4, 0]
    metric.update_state(np.array([[1, 2]]), np.array([[1, 2]]))  # IoU [-, 1, 1]
    #            pred 0  1  2
    #   truth 0     [3, 0, 0]
    #   truth 1     [1, 1, 0]
    #   truth 2     [0, 0, 1]
    np.testing.assert_array_equal(metric.total_cm.numpy(), [[3, 0, 0], [1, 1, 0], [0, 0, 1]])
    assert float(metric.result()) == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    metric.reset_state()
    assert metric.total_cm.numpy().sum() == 0
    assert np.isnan(float(metric.result()))


def test_metric_state_exact_past_2_pow_24():
    metric = ConfusionMatrixMetric(2)
    metric.total_cm.assign(np.array([[2**24, 0], [0, 2**40]], np.int64))
    metric.update_state(np.array([[0]]), np.array([[0]]))
    assert metric.total_cm.numpy()[0, 0] == 2**24 + 1
    assert metric.total_cm.numpy()[1, 1] == 2**40


def test_metric_rejects_sample_weight():
    with pytest.raises(ValueError, match="ignore_index=255"):
        ConfusionMatrixMetric(2).update_state(np.zeros((1, 2)), np.zeros((1, 2)), sample_weight=np.ones((1, 2)))


def test_metric_config_round_trip():
    metric = ConfusionMatrixMetric(5, ignore_index=0, name="val_miou")
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert isinstance(restored, ConfusionMatrixMetric)
    assert (restored.num_classes, restored.ignore_index, restored.name) == (5, 0, "val_miou")
    assert restored.total_cm.shape == (5, 5)


def test_metric_in_keras_evaluate_matches_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 8, 8, 2)).astype(np.float32)
    y = rng.integers(0, 3, (4, 8, 8)).astype(np.uint8)
    y[1, :3] = IGNORE
    model = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(3, 1)])
    # The loss is irrelevant here; Keras only needs one (255 labels would break its CE).
    model.compile(loss=lambda y_true, y_pred: keras.ops.mean(y_pred) * 0.0, metrics=[ConfusionMatrixMetric(3)])
    result = model.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    expected = summary(confusion_matrix(y, model.predict(x, verbose=0).argmax(-1), 3))["miou"]
    assert result["mean_iou"] == pytest.approx(expected, rel=1e-6)


def test_metric_under_mirrored_strategy_replica_context():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        metric = ConfusionMatrixMetric(3)
    y = np.array([[0, 1, 2, IGNORE]])
    logits = tf.one_hot([[0, 2, 2, 1]], 3)

    @tf.function
    def step(t, p):
        strategy.run(metric.update_state, args=(t, p))

    step(y, logits)
    step(y, logits)
    np.testing.assert_array_equal(metric.total_cm.numpy(), 2 * confusion_matrix(y, np.array([[0, 2, 2, 1]]), 3))


TWO_REPLICAS = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from segray.metrics import ConfusionMatrixMetric, confusion_matrix
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        metric = ConfusionMatrixMetric(4)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, (4, 8, 8)); y[0, :2] = 255
    logits = rng.normal(size=(4, 8, 8, 4)).astype("float32")
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((y, logits)).batch(4))

    @tf.function
    def step(batch):
        strategy.run(metric.update_state, args=batch)

    for batch in data:
        step(batch)
    assert strategy.num_replicas_in_sync == 2
    np.testing.assert_array_equal(metric.total_cm.numpy(), confusion_matrix(y, logits.argmax(-1), 4))
    print("OK")
    """
)


@pytest.mark.slow
def test_metric_sums_two_replicas():
    # Logical devices must be set before TensorFlow starts, so in a fresh process.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", TWO_REPLICAS], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")
