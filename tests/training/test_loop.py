"""The per-worker loop outside Ray: the XLA-compiled step computes what the plain one does; worker priority."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from segray.data.info import ClassInfo, DatasetInfo
from segray.models.registry import TINY_OPTIONS
from segray.config import TrainConfig
from segray.training.loop import WorkerLoop
from tests.models.test_model_training import squares

INFO = DatasetInfo(
    classes=[ClassInfo(0, "background"), ClassInfo(1, "square")],
    splits={"train": 4, "val": 0},
    pixel_counts=[3, 1],
    pixel_frequency={"background": 0.75, "square": 0.25},
    mean=[0.0] * 3,
    std=[1.0] * 3,
    layout="ids",
    source="memory",
    command="test",
)


def worker(name: str, xla: bool) -> WorkerLoop:
    cfg = TrainConfig(
        data="memory", storage="none", name="t", model=name, batch_size=4, lr=1e-2, schedule="constant", workers=1,
        xla=xla, model_options=TINY_OPTIONS[name],
    )
    # world_size 1: the default strategy, as a one-worker Ray Train run uses.
    return WorkerLoop(cfg, INFO, world_size=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "deeplabv3plus"])
def test_xla_step_matches_the_plain_step_and_learns(name: str) -> None:
    import tensorflow as tf

    images, labels = squares(n=4)
    labels[0, 0, :4] = 255  # ignored pixels stay out of loss and matrix under XLA too
    x, y = tf.constant(images), tf.constant(labels)
    plain, xla = worker(name, xla=False), worker(name, xla=True)
    xla.model.set_weights(plain.model.get_weights())
    first = [loop.train_step(x, y) for loop in (plain, xla)]
    (ls_p, ws_p, cm_p), (ls_x, ws_x, cm_x) = [[t.numpy() for t in out] for out in first]
    # The loss and the matrix come from the forward pass, before the update.
    assert ws_x == ws_p == labels.size - 4
    # XLA fuses and reorders the float32 sums (and draws its own dropout masks).
    np.testing.assert_allclose(ls_x, ls_p, rtol=1e-2)
    # Rows are truth: exact whatever an untrained model's near-tied argmax picks.
    truth_counts = np.bincount(labels[labels != 255], minlength=2)
    np.testing.assert_array_equal(cm_x.sum(axis=1), truth_counts)
    np.testing.assert_array_equal(cm_p.sum(axis=1), truth_counts)
    losses = [float(xla.train_step(x, y)[0]) / float(ws_x) for _ in range(15)]
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * float(ls_x) / float(ws_x), losses
    # Images and masks are parameters of the compiled step, not constants folded
    # in (which would mean one compilation per batch).
    hlo = xla.train_step.experimental_get_compiler_ir(x, y)(stage="hlo")
    entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
    assert "f32[4,32,32,3]" in entry and "s32[4,32,32]" in entry, entry


def test_normal_priority_moves_every_thread_of_a_niced_worker() -> None:
    # A fresh process at Ray's worker niceness, with a second thread already running.
    code = textwrap.dedent(
        """
        import os, threading
        os.nice(15)
        stop = threading.Event()
        other = threading.Thread(target=stop.wait)
        other.start()
        from segray.runtime import normal_priority
        moved = normal_priority()
        nices = sorted(os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task"))
        stop.set()
        other.join()
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
            allowed = True
        except PermissionError:
            allowed = False
        print(allowed, moved, *nices)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout.split()
    allowed, moved, nices = out[0] == "True", int(out[1]), [int(n) for n in out[2:]]
    assert len(nices) >= 2  # the main thread, ours, and any numpy started
    if allowed:
        assert moved == len(nices) and set(nices) == {0}
    else:  # no CAP_SYS_NICE: Ray's niceness stays, and nothing raises
        assert moved == 0 and set(nices) == {15}


def test_deep_supervision_trains_the_model_through_heads_at_half_and_quarter_size(tmp_path) -> None:
    import tensorflow as tf

    from segray.config import ConfigError
    from segray.training.artifacts import load_state, save_state, write_config
    from segray.training.trainer import _check_resumable

    def ds_worker() -> WorkerLoop:
        cfg = TrainConfig(
            data="memory", storage="none", name="t", batch_size=4, lr=1e-2, schedule="constant", workers=1,
            model_options={"depth": 3, "width": 8}, deep_supervision=True,
        )
        return WorkerLoop(cfg, INFO, world_size=1)

    images, labels = squares(n=4)
    x, y = tf.constant(images), tf.constant(labels)
    loop = ds_worker()
    outputs = loop.net(loop.model_input(x), training=False)
    assert [tuple(o.shape) for o in outputs] == [(4, 32, 32, 2), (4, 16, 16, 2), (4, 8, 8, 2)]
    # The saved model is the plain U-Net, and it is part of what is trained.
    assert len(loop.model.outputs) == 1 and {id(v) for v in loop.model.trainable_variables} < {id(v) for v in loop.net.trainable_variables}
    heads = [v for v in loop.net.trainable_variables if v.path.startswith("deep_supervision")]
    assert len(heads) == 4  # kernel and bias of two 1x1 heads
    before = [v.numpy().copy() for v in heads]
    first = float(loop.train_step(x, y)[0])
    assert all(not np.allclose(b, v.numpy()) for b, v in zip(before, heads)), "the heads got no gradient"
    losses = [float(loop.train_step(x, y)[0]) for _ in range(15)]
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * first, (first, losses)
    # Checkpoints hold the heads (and their optimizer slots): a resumed loop predicts the same at every size.
    save_state(str(tmp_path), loop.net, loop.optimizer, {"epoch": 0})
    resumed = ds_worker()
    load_state(str(tmp_path), resumed.net, resumed.optimizer)
    for a, b in zip(loop.net(loop.model_input(x), training=False), resumed.net(resumed.model_input(x), training=False)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)

    with pytest.raises(ConfigError, match="deep_supervision: model .segnet. has no decoder levels to supervise; models that have: unet") as err:
        TrainConfig(data="memory", storage="none", name="t", model="segnet", deep_supervision=True).validate()
    assert err.value.field == "deep_supervision"
    shallow = TrainConfig(data="memory", storage="none", name="t", model_options={"depth": 2}, deep_supervision=True)
    with pytest.raises(ValueError, match=r"decoder levels \[2, 3\] \(depth 3 or more\); unet has \[1, 2\]"):
        WorkerLoop(shallow, INFO, world_size=1)

    # A run whose config predates the field resumes with its default, and not with it switched on.
    run = str(tmp_path / "run")
    base = TrainConfig(data=str(tmp_path), storage=str(tmp_path), name="run", resume=True)
    old = {k: v for k, v in base.to_dict().items() if k != "deep_supervision"}
    write_config(run, old, {}, exclusive=False)
    _check_resumable(run, base)
    with pytest.raises(ConfigError, match="`deep_supervision` None there, True now"):
        _check_resumable(run, TrainConfig(data=str(tmp_path), storage=str(tmp_path), name="run", resume=True, deep_supervision=True))


@pytest.mark.parametrize("native", [True, False])
def test_mixed_precision_on_cpu_computes_in_bfloat16_where_the_cpu_does_and_saves_float32(monkeypatch, capfd, native: bool) -> None:
    import keras
    import tensorflow as tf

    from segray.runtime import cpu_has_bf16
    from segray.training import loop as loop_module

    if native and not cpu_has_bf16():
        pytest.skip("this machine's CPU has no bfloat16 instructions; the float32 fallback is the other case")
    if not native:
        monkeypatch.setattr(loop_module, "cpu_has_bf16", lambda: False)
    cfg = TrainConfig(
        data="memory", storage="none", name="t", batch_size=4, lr=1e-2, schedule="constant", workers=1, loss="ce+dice",
        model_options={"depth": 3, "width": 8}, deep_supervision=True, mixed_precision=True,
    )
    try:
        loop = WorkerLoop(cfg, INFO, world_size=1)
        compute = {layer.compute_dtype for layer in loop.net.layers if isinstance(layer, keras.layers.Conv2D)}
        if native:
            assert keras.mixed_precision.global_policy().name == "mixed_bfloat16" and compute == {"bfloat16"}
        else:
            assert keras.mixed_precision.global_policy().name == "float32" and compute == {"float32"}
            assert "no bfloat16 instructions" in capfd.readouterr().err
        # bfloat16 keeps float32's exponent: no loss scaling, and the weights stay float32.
        assert not isinstance(loop.optimizer, keras.optimizers.LossScaleOptimizer)
        assert {v.dtype for v in loop.net.trainable_variables} == {"float32"}
        images, labels = squares(n=4)
        x, y = tf.constant(images), tf.constant(labels)
        losses = [float(loop.train_step(x, y)[0]) for _ in range(16)]
        assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses
        # The saved model is built in float32 whatever the run computed in, and predicts what the run's weights say.
        saved = loop_module.float32_model(cfg, INFO.num_classes)
        assert {layer.compute_dtype for layer in saved.layers if isinstance(layer, keras.layers.Conv2D)} == {"float32"}
        assert keras.mixed_precision.global_policy().name == loop.policy
        saved.set_weights(loop.model.get_weights())
        ours = saved(loop.model_input(x), training=False).numpy()
        theirs = tf.cast(loop.model(loop.model_input(x), training=False), tf.float32).numpy()
        assert ours.dtype == np.float32
        agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
        assert agree > 0.95, agree
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_instance_model_trains_by_the_same_step_shape() -> None:
    """An ``instance`` registry entry gets its own loss on (image, instances, classes) batches; the semantic path is untouched."""
    import tensorflow as tf

    from segray import models
    from tests.models.test_maskrcnn import scene

    info = DatasetInfo(
        classes=[ClassInfo(0, "background"), ClassInfo(1, "box"), ClassInfo(2, "ellipse")],
        splits={"train": 1, "val": 0}, pixel_counts=[3, 1, 1], pixel_frequency={"background": 0.6, "box": 0.2, "ellipse": 0.2},
        mean=[0.0] * 3, std=[255.0] * 3, layout="ids", source="memory", command="test",
    )
    cfg = TrainConfig(
        data="memory", storage="none", name="t", model="maskrcnn", batch_size=1, lr=3e-3, schedule="constant", workers=1,
        optimizer="adam", model_options=dict(models.spec("maskrcnn").tiny_options),
    )
    loop = WorkerLoop(cfg, info, world_size=1)
    image, instances, classes = scene()
    pixels = np.clip(image * 0.3 + 0.4, 0, 1) * 255  # the pipeline's uint8 image
    batch = tf.constant(pixels.astype(np.uint8)), tf.constant(instances), tf.constant(classes)
    losses = []
    for _ in range(20):
        loss_sum, images = loop.train_step(*batch)
        assert float(images) == 1.0
        losses.append(float(loss_sum))
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    eval_sum, _ = loop.eval_step(*batch)
    assert np.isfinite(float(eval_sum))
