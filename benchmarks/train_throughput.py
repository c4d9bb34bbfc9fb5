"""Training images/s: the model step alone against the same step fed by segray's real input pipeline.

- step only: segray's ``WorkerLoop`` train step (custom step, masked
  cross-entropy, Adam) on synthetic batches already in memory, in this
  process; images of the dtype the pipeline delivers (uint8 since issue 16);
- with the pipeline: Ray Train, 1 worker, running ``WorkerLoop.run_epoch``
  over ``read_split`` of an ingested dataset (decode, fit, augment in Ray
  Data tasks, uint8 to the worker, normalised in the step's graph).

Repeats alternate the two; medians are reported. The first epoch of each is
a warm-up (tracing) and is not timed. Target: the pipeline keeps the step
within 5% of the step-only rate (ratio >= 0.95).

    python benchmarks/train_throughput.py [--size 128] [--n 256] [--batch 8] [--epochs 3] [--repeats 3]
    python benchmarks/train_throughput.py --gpu   # U-Net width 64 depth 4, 576x576, batch 8, mixed precision + XLA, 1 GPU

``--gpu``: 576 is the nearest side to the 572 of the UNet_Medical anchor that
segray's ``same``-padded U-Net takes (divisible by 16). It prints the step-only
rate of a 1-channel U-Net on device-resident batches and the rate of a 1-GPU
Ray Train worker fed by the pipeline (3-channel, as segray decodes images).
The same script runs on older checkouts (``PYTHONPATH=old``) for before/after.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.config import IngestConfig, TrainConfig  # noqa: E402
from segray.data import DatasetInfo, ingest, read_split, synthesize  # noqa: E402
from segray.training import data_config  # noqa: E402


def step_only(cfg: TrainConfig, info: DatasetInfo, image_dtype, n: int, size: int, epochs: int) -> float:
    """images/s of WorkerLoop's train step on in-memory batches (this process, world size 1)."""
    import tensorflow as tf

    from segray.training import WorkerLoop

    loop = step_only.loop = getattr(step_only, "loop", None) or WorkerLoop(cfg, info, world_size=1)
    rng = np.random.default_rng(0)
    b = cfg.batch_size
    images = rng.integers(0, 256, (b, size, size, 3)).astype(image_dtype)
    masks = rng.integers(0, info.num_classes, (b, size, size)).astype(np.uint8 if image_dtype == np.uint8 else np.int32)
    steps = n // b
    rates = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for _ in range(steps):
            # tf.constant per step, as run_epoch does with each batch.
            out = loop.train_step(tf.constant(images), tf.constant(masks))
            float(out[0])
        rates.append(steps * b / (time.perf_counter() - t0))
    return float(np.median(rates[1:]))


def _ray_loop(loop_config):
    import tempfile

    import ray.train

    from segray.training import WorkerLoop

    cfg = TrainConfig.from_dict(loop_config["config"])
    info = DatasetInfo.from_json(loop_config["info"])
    worker = WorkerLoop(cfg, info, ray.train.get_context().get_world_size())
    shard = ray.train.get_dataset_shard("train")
    rates = []
    for epoch in range(loop_config["epochs"]):
        _, _, _, images, seconds = worker.run_epoch(shard, train=True)
        rates.append(images / seconds)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if ray.train.get_context().get_world_rank() == 0 else None
            ray.train.report({"epoch": epoch, "rates": rates}, checkpoint=checkpoint)


def with_pipeline(dataset: str, cfg: TrainConfig, info: DatasetInfo, size: int, epochs: int) -> float:
    """images/s of a 1-worker Ray Train run reading the real pipeline (decode + augment)."""
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    train = read_split(dataset, "train", size=(size, size), augment=True, seed=0, info=info)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})}
    with tempfile.TemporaryDirectory() as tmp:
        result = TensorflowTrainer(
            _ray_loop,
            train_loop_config={"config": cfg.to_dict(), "info": info.to_json(), "epochs": epochs},
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=cfg.gpu, resources_per_worker=resources),
            run_config=ray.train.RunConfig(name="bench", storage_path=tmp),
            datasets={"train": train},
            dataset_config=data_config(1),
        ).fit()
    return float(np.median(result.metrics["rates"][1:]))


def gpu_step_only(width: int, depth: int, size: int, batch: int, steps: int) -> float:
    """images/s of a 1-channel U-Net train step, mixed precision + XLA, uint8 batches resident on the GPU."""
    import keras
    import tensorflow as tf

    from segray import models
    from segray.data import normalize_tf
    from segray.training import masked_cross_entropy

    keras.mixed_precision.set_global_policy("mixed_float16")
    model = models.build("unet", 2, input_shape=(size, size, 1), width=width, depth=depth)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-4))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (batch, size, size, 1)).astype(np.uint8))
    y = tf.constant(rng.integers(0, 2, (batch, size, size)).astype(np.int32))

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(normalize_tf(x, [110.0], [40.0]), training=True)
            loss_sum, weight_sum = masked_cross_entropy(y, logits)
            loss = loss_sum / tf.maximum(weight_sum, 1.0)
        grads = tape.gradient(optimizer.scale_loss(loss), model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    for _ in range(5):
        step(x, y).numpy()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(x, y)
    loss.numpy()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="1 GPU, mixed precision + XLA, U-Net w64 d4 at 576x576, batch 8")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="alternated step-only / pipeline measurements")
    args = parser.parse_args()
    size = args.size or (576 if args.gpu else 128)
    n = args.n or (512 if args.gpu else 256)
    width, depth = args.width or (64 if args.gpu else 16), args.depth or (4 if args.gpu else 3)

    import ray

    cpus = os.cpu_count() or 2
    # Logical CPUs above the physical ones: the worker takes all the cores for
    # TensorFlow's threads and the data tasks still get scheduled beside it.
    ray.init(num_cpus=cpus + 2, num_gpus=1 if args.gpu else 0, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = tempfile.mkdtemp(prefix="segray-train-bench-")
    synthesize(os.path.join(tmp, "raw"), n=n, size=(size, size), num_classes=4, seed=0, show_progress=False)
    info = ingest(IngestConfig(source=os.path.join(tmp, "raw"), destination=os.path.join(tmp, "ds"), val_fraction=0.0)).info
    dataset = os.path.join(tmp, "ds")
    first = read_split(dataset, "train", size=(size, size), info=info).take(1)[0]
    image_dtype = first["image"].dtype
    cfg = TrainConfig(
        data=dataset, storage="none", name="bench", epochs=args.epochs, batch_size=args.batch, lr=1e-3, schedule="constant",
        workers=1, cpus_per_worker=cpus, gpu=args.gpu, mixed_precision=args.gpu, xla=args.gpu,
        model_options={"width": width, "depth": depth},
    )
    print(
        f"U-Net width {width} depth {depth}, {n} images {size}x{size}, batch {args.batch}, {cpus} CPUs, "
        f"{'1 GPU, mixed precision, XLA' if args.gpu else 'CPU'}; pipeline delivers {image_dtype} images"
    )
    steps, pipes = [], []
    gpu_steps = []
    for r in range(args.repeats):
        if args.gpu:
            gpu_steps.append(gpu_step_only(width, depth, size, args.batch, steps=50))
        else:
            steps.append(step_only(cfg, info, image_dtype, n, size, args.epochs))
        pipes.append(with_pipeline(dataset, cfg, info, size, args.epochs))
        ref = gpu_steps[-1] if args.gpu else steps[-1]
        print(f"  repeat {r + 1}/{args.repeats}: step only {ref:7.2f}, with the pipeline {pipes[-1]:7.2f} images/s, ratio {pipes[-1] / ref:.3f}")
    ref_all = gpu_steps if args.gpu else steps
    step_rate, pipe_rate = float(np.median(ref_all)), float(np.median(pipes))
    ratio = float(np.median(np.array(pipes) / np.array(ref_all)))
    what = "1-channel U-Net, uint8 batches on the GPU" if args.gpu else "WorkerLoop step, in-memory batches"
    print(f"step only ({what}): {step_rate:8.2f} images/s (median of {args.repeats})")
    print(f"Ray Train, 1 worker, real pipeline:  {pipe_rate:8.2f} images/s (median of {args.repeats})")
    print(f"ratio pipeline / step only:          {ratio:8.3f}  (median of pairs; target >= 0.95)")
    print(f"RESULT step_images_per_s={step_rate:.2f} pipeline_images_per_s={pipe_rate:.2f} ratio={ratio:.3f} gpu={int(args.gpu)} size={size} batch={args.batch}")
    ray.shutdown()


if __name__ == "__main__":
    main()
