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
    first = [loop._train_step(x, y) for loop in (plain, xla)]
    (ls_p, ws_p, cm_p), (ls_x, ws_x, cm_x) = [[t.numpy() for t in out] for out in first]
    # The loss and the matrix come from the forward pass, before the update.
    assert ws_x == ws_p == labels.size - 4
    # XLA fuses and reorders the float32 sums (and draws its own dropout masks).
    np.testing.assert_allclose(ls_x, ls_p, rtol=1e-2)
    # Rows are truth: exact whatever an untrained model's near-tied argmax picks.
    truth_counts = np.bincount(labels[labels != 255], minlength=2)
    np.testing.assert_array_equal(cm_x.sum(axis=1), truth_counts)
    np.testing.assert_array_equal(cm_p.sum(axis=1), truth_counts)
    losses = [float(xla._train_step(x, y)[0]) / float(ws_x) for _ in range(15)]
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * float(ls_x) / float(ws_x), losses
    # Images and masks are parameters of the compiled step, not constants folded
    # in (which would mean one compilation per batch).
    hlo = xla._train_step.experimental_get_compiler_ir(x, y)(stage="hlo")
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
