"""segray's U-Net on one GPU under Keras 3's JAX backend: train and inference images/s at 576x576x1.

Issue 16 asks for GPU train images/s (U-Net at 572x572x1, batch 8, mixed
precision + XLA; anchor: NVIDIA's TF2 UNet_Medical, 119 images/s on one A100
40GB with AMP; goal >= 300 on one H100/H200) and GPU inference images/s (fp16,
batch 16; anchor 424 on an A100; goal >= 1200). ``train_throughput.py --gpu``
and ``inference_throughput.py --gpu`` measure that through segray's own
TensorFlow step and Ray pipeline. The GPU machine lent to this project has no
TensorFlow and no Ray, and nothing over 64 MiB can be carried to it, so this
script measures the same model (``segray.models.build("unet", ...)``, width
64, depth 4, as ``train_throughput.py --gpu``) under Keras 3's JAX backend:

- train: one ``jax.jit`` (XLA) step of forward, sparse
  cross-entropy (no ignore mask), backward and Adam, from uint8 images normalised in the step,
  as segray's TensorFlow step does; policies ``mixed_bfloat16`` (no loss
  scaling needed) and ``float32``;
- train, host-fed: the same step, each batch a new uint8 numpy array sent from
  host memory (what a pipeline delivering uint8 to the worker costs on top);
- inference: the jitted forward pass and argmax at batch 16, policies
  ``mixed_float16`` and ``mixed_bfloat16``.

576 is the nearest side to 572 that the ``same``-padded U-Net takes (divisible
by 16). Each figure is the median of ``--repeats`` timed runs of ``--steps``
steps after compilation and warm-up, timed to ``block_until_ready``.
These are the model's and the framework's rates, not segray's TensorFlow path.

    KERAS_BACKEND=jax python benchmarks/gpu_jax.py [--size 576] [--width 64] [--depth 4] [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MEAN, STD = 110.0, 40.0


def timed(run_steps, steps: int, repeats: int) -> float:
    """Median seconds of ``run_steps(steps)`` (which blocks until its results are ready)."""
    run_steps(3)  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_steps(steps)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(policy: str, size: int, width: int, depth: int, classes: int):
    import keras

    from segray import models

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = models.build("unet", classes, input_shape=(size, size, 1), width=width, depth=depth)
    keras.mixed_precision.set_global_policy("float32")
    return model


def train_rate(policy: str, size: int, width: int, depth: int, batch: int, steps: int, repeats: int, host_fed: bool) -> float:
    import jax
    import jax.numpy as jnp
    import keras

    model = build(policy, size, width, depth, classes=2)
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)

    def loss_fn(trainable, non_trainable, x, y):
        images = (x.astype("float32") - MEAN) / STD
        logits, non_trainable = model.stateless_call(trainable, non_trainable, images, training=True)
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        return loss, non_trainable

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @jax.jit
    def step(state, x, y):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return loss, (trainable, non_trainable, opt_vars)

    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    rng = np.random.default_rng(0)
    host_x = [rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8) for _ in range(4)]
    host_y = [rng.integers(0, 2, (batch, size, size), dtype=np.uint8) for _ in range(4)]
    dev_x, dev_y = jax.device_put(host_x[0]), jax.device_put(host_y[0]).astype(jnp.int32)

    def run(n: int) -> None:
        nonlocal state
        loss = None
        for i in range(n):
            if host_fed:
                x, y = jax.device_put(host_x[i % 4]), jax.device_put(host_y[i % 4]).astype(jnp.int32)
            else:
                x, y = dev_x, dev_y
            loss, state = step(state, x, y)
        float(loss)
        assert np.isfinite(float(loss)), f"train loss {float(loss)} under {policy}"

    return steps * batch / timed(run, steps, repeats)


def infer_rate(policy: str, size: int, width: int, depth: int, batch: int, steps: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    model = build(policy, size, width, depth, classes=2)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def predict(trainable, non_trainable, x):
        images = (x.astype("float32") - MEAN) / STD
        logits, _ = model.stateless_call(trainable, non_trainable, images, training=False)
        return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

    x = jax.device_put(np.random.default_rng(0).integers(0, 256, (batch, size, size, 1), dtype=np.uint8))

    def run(n: int) -> None:
        out = None
        for _ in range(n):
            out = predict(trainable, non_trainable, x)
        out.block_until_ready()

    return steps * batch / timed(run, steps, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=576)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="train batch (inference: --infer-batch)")
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import keras

    device = jax.devices()[0]
    print(f"keras {keras.__version__} on {keras.backend.backend()} {jax.__version__}; device: {device.device_kind} ({device.platform})")
    print(f"segray U-Net width {args.width} depth {args.depth}, {args.size}x{args.size}x1, 2 classes; median of {args.repeats} x {args.steps} steps")
    a = (args.size, args.width, args.depth)
    rows = {
        "train_bf16": train_rate("mixed_bfloat16", *a, args.batch, args.steps, args.repeats, host_fed=False),
        "train_bf16_host_fed": train_rate("mixed_bfloat16", *a, args.batch, args.steps, args.repeats, host_fed=True),
        "train_fp32": train_rate("float32", *a, args.batch, args.steps, args.repeats, host_fed=False),
        "train_bf16_batch32": train_rate("mixed_bfloat16", *a, 32, max(10, args.steps // 4), args.repeats, host_fed=False),
        "infer_fp16": infer_rate("mixed_float16", *a, args.infer_batch, args.steps, args.repeats),
        "infer_bf16": infer_rate("mixed_bfloat16", *a, args.infer_batch, args.steps, args.repeats),
    }
    for key, rate in rows.items():
        print(f"{key:>22}: {rate:9.1f} images/s")
    print(f"train (batch {args.batch}, bf16, XLA): {rows['train_bf16']:.0f} images/s; anchor 119 on an A100 (TF2 UNet_Medical, AMP); goal >= 300")
    print(f"inference (batch {args.infer_batch}, fp16, XLA): {rows['infer_fp16']:.0f} images/s; anchor 424 on an A100; goal >= 1200")
    print(f"host-fed uint8 batches keep {rows['train_bf16_host_fed'] / rows['train_bf16']:.3f} of the device-resident train rate")
    print(
        "RESULT " + " ".join(f"{k}_images_per_s={v:.1f}" for k, v in rows.items())
        + f" host_fed_ratio={rows['train_bf16_host_fed'] / rows['train_bf16']:.3f} size={args.size} batch={args.batch}"
        + f" train_goal_met={rows['train_bf16'] >= 300} infer_goal_met={rows['infer_fp16'] >= 1200} device={device.device_kind.replace(' ', '_')}"
    )


if __name__ == "__main__":
    main()
