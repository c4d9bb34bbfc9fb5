"""Training throughput of each model on this machine, against its matmul rate.

For every registered model (default options) this times a forward + backward +
Adam step on random images and prints images/s, forward FLOPs per image, the
achieved training GFLOP/s (a training step taken as 3x the forward FLOPs), and
that rate as a fraction of a large float32 matmul run in the same process,
which stands for the best this machine does.

The fraction divides FLOPs per CPU-second of this process by the matmul's
FLOPs per CPU-second. On a machine shared with other jobs the wall-clock rate
of either swings with their load from one minute to the next, while the work
done per CPU-second this process gets is far steadier. Wall-clock rates are
printed as measured.

    python3 benchmarks/models.py [--size 256] [--batch 8] [--steps 5] [--warmup 3] [--models unet segnet]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from segray import models
from segray.models import model_flops


@dataclass(frozen=True)
class Timing:
    """Work done per wall-clock second and per CPU-second of this process."""

    per_wall_s: float
    per_cpu_s: float


def timed(fn, work: float, repeats: int) -> Timing:
    """Runs ``fn`` ``repeats`` times; ``work`` is what one run does (FLOPs, images)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Timing(work * repeats / wall, work * repeats / cpu)


def matmul_flops(n: int = 2048, chain: int = 10, repeats: int = 3) -> Timing:
    """FLOP rates of chained float32 ``n x n`` matmuls."""
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n)) / n  # keeps the chained products finite

    @tf.function
    def run() -> tf.Tensor:
        x = a
        for _ in range(chain):
            x = tf.matmul(x, b)
        return x

    run().numpy()  # trace and warm up
    return timed(lambda: run().numpy(), 2 * n**3 * chain, repeats)


def train_images(model: keras.Model, batch: int, size: int, num_classes: int, warmup: int, steps: int) -> Timing:
    """Image rates of a GradientTape + Adam step, timed over ``steps`` after ``warmup``."""
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((batch, size, size, 3), dtype=np.float32))
    labels = tf.constant(rng.integers(0, num_classes, (batch, size, size)), dtype=tf.int32)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    for _ in range(warmup):
        train_step(images, labels).numpy()
    # .numpy() waits for each step, so the timing covers the work itself.
    return timed(lambda: train_step(images, labels).numpy(), batch, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, tracing included (default 3)")
    parser.add_argument("--classes", type=int, default=2, help="output classes (default 2)")
    parser.add_argument("--models", nargs="+", default=models.available(), choices=models.available())
    args = parser.parse_args()

    print(f"training step: batch {args.batch}, {args.size}x{args.size}, {args.warmup} warm-up + {args.steps} timed")
    header = (
        f"{'model':<14} {'params':>11} {'fwd GFLOP/img':>14} {'images/s':>9} "
        f"{'train GFLOP/s':>14} {'matmul GFLOP/s':>15} {'of matmul':>10}"
    )
    print(header, flush=True)
    rates = {}
    for name in args.models:
        keras.utils.set_random_seed(0)
        model = models.build(name, args.classes, (args.size, args.size, 3))
        flops = model_flops(model)
        # Measured next to each model, as the load on a shared machine drifts.
        matmul = matmul_flops()
        images = train_images(model, args.batch, args.size, args.classes, args.warmup, args.steps)
        train_flops = 3 * flops
        print(
            f"{name:<14} {models.count_params(model):>11,} {flops / 1e9:>14.2f} {images.per_wall_s:>9.2f} "
            f"{train_flops * images.per_wall_s / 1e9:>14.1f} {matmul.per_wall_s / 1e9:>15.1f} "
            f"{train_flops * images.per_cpu_s / matmul.per_cpu_s:>10.1%}",
            flush=True,
        )
        rates[name] = images.per_wall_s
        keras.backend.clear_session()
    print(
        "\nimages/s, train and matmul GFLOP/s: wall clock. train = 3x forward FLOPs. "
        "of matmul: FLOPs per CPU-second of this process, model / float32 2048x2048 matmul."
    )
    print("RESULT " + " ".join(f"{name}_train_images_per_s={rate:.2f}" for name, rate in rates.items()))


if __name__ == "__main__":
    main()
