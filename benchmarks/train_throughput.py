"""Training images/s: Ray Train (1 and 2 workers) against a plain single-process Keras loop.

Same model, same step (masked cross-entropy, Adam), same data already in
memory: the plain loop iterates numpy arrays; Ray Train reads a materialised
Ray Dataset through ``get_dataset_shard`` and runs segray's ``WorkerLoop``
(custom step; MultiWorkerMirroredStrategy with 2 workers, the default strategy
with 1). The first epoch of each is a warm-up (tracing, XLA compilation) and is
not timed. ``--xla`` compiles both steps with XLA. Like the plain loop, the
worker runs at niceness 0 (``WorkerLoop`` undoes Ray's worker niceness 15 where
the process may).

    python benchmarks/train_throughput.py [--size 128] [--n 96] [--batch 8] [--epochs 3] [--repeats 3] [--xla]

Target: 1 worker at 0.9 of the plain loop or better.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.data.info import ClassInfo, DatasetInfo  # noqa: E402
from segray.data.synthetic import make_pair  # noqa: E402
from segray.config import TrainConfig  # noqa: E402
from segray.training.trainer import data_config  # noqa: E402


def make_data(n: int, size: int, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    pairs = [make_pair(np.random.default_rng([0, i]), size, size, classes) for i in range(n)]
    images = np.stack([p[0] for p in pairs]).astype(np.float32) / 255.0
    masks = np.stack([p[1] for p in pairs]).astype(np.int32)
    return images, masks


def plain_loop(images, masks, cfg: TrainConfig, epochs: int, threads: int) -> float:
    import keras
    import tensorflow as tf

    from segray import models
    from segray.training.losses import masked_cross_entropy

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    keras.utils.set_random_seed(0)
    model = models.build(cfg.model, 4, input_shape=(None, None, 3), **cfg.model_options)
    optimizer = keras.optimizers.Adam(cfg.lr)

    @tf.function(reduce_retracing=True, jit_compile=cfg.xla)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss_sum, weight_sum = masked_cross_entropy(y, model(x, training=True))
            loss = loss_sum / tf.maximum(weight_sum, 1.0)
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    rates = []
    b = cfg.batch_size
    for _ in range(epochs):
        t0, seen = time.perf_counter(), 0
        for i in range(0, len(images) - b + 1, b):
            step(tf.constant(images[i : i + b]), tf.constant(masks[i : i + b])).numpy()
            seen += b
        rates.append(seen / (time.perf_counter() - t0))
    return float(np.mean(rates[1:]))


def _ray_loop(loop_config):
    import tempfile

    import ray.train

    from segray.training.loop import WorkerLoop

    cfg = TrainConfig.from_dict(loop_config["config"])
    info = DatasetInfo.from_json(loop_config["info"])
    worker = WorkerLoop(cfg, info, ray.train.get_context().get_world_size())
    shard = ray.train.get_dataset_shard("train")
    rates = []
    for epoch in range(loop_config["epochs"]):
        _, _, _, images, seconds = worker.run_epoch(shard, train=True)
        # run_epoch times this worker's loop; images are summed over all workers.
        rates.append(images / seconds)
        # Ray Train V2 keeps metrics only of reports that carry a checkpoint.
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if ray.train.get_context().get_world_rank() == 0 else None
            ray.train.report({"epoch": epoch, "rates": rates}, checkpoint=checkpoint)


def ray_train(images, masks, cfg: TrainConfig, epochs: int, workers: int, cpus_per_worker: int) -> float:
    import tempfile

    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    ds = ray.data.from_items([{"image": i, "mask": m} for i, m in zip(images, masks)]).materialize()
    info = DatasetInfo(
        classes=[ClassInfo(k, f"c{k}") for k in range(4)],
        splits={"train": len(images), "val": 0},
        pixel_counts=[1, 1, 1, 1],
        pixel_frequency={f"c{k}": 0.25 for k in range(4)},
        mean=[0.0] * 3,
        std=[1.0] * 3,
        layout="ids",
        source="memory",
        command="benchmark",
    )
    cfg = TrainConfig(**{**cfg.to_dict(), "workers": workers, "cpus_per_worker": cpus_per_worker})
    with tempfile.TemporaryDirectory() as tmp:
        result = TensorflowTrainer(
            _ray_loop,
            train_loop_config={"config": cfg.to_dict(), "info": info.to_json(), "epochs": epochs},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}),
            run_config=ray.train.RunConfig(name="bench", storage_path=tmp),
            datasets={"train": ds},
            dataset_config=data_config(workers),
        ).fit()
    return float(np.mean(result.metrics["rates"][1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="alternated plain / 1-worker measurements")
    parser.add_argument("--xla", action="store_true", help="compile the train step with XLA (both loops)")
    args = parser.parse_args()

    import ray

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus + 2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    images, masks = make_data(args.n, args.size)
    cfg = TrainConfig(
        data="memory", storage="none", name="bench", epochs=args.epochs, batch_size=args.batch, lr=1e-3,
        schedule="constant", workers=1, xla=args.xla, model_options={"width": args.width, "depth": args.depth},
    )
    print(f"U-Net width {args.width} depth {args.depth}, {args.n} images {args.size}x{args.size}, batch {args.batch}, {cpus} CPUs, XLA {'on' if args.xla else 'off'}")
    # Alternated repeats, medians: a shared VM drifts by 10% between minutes.
    plains, ones = [], []
    for r in range(args.repeats):
        plains.append(plain_loop(images, masks, cfg, args.epochs, threads=cpus))
        ones.append(ray_train(images, masks, cfg, args.epochs, workers=1, cpus_per_worker=cpus))
        print(f"  repeat {r + 1}/{args.repeats}: plain {plains[-1]:6.2f}, 1 worker {ones[-1]:6.2f} images/s, ratio {ones[-1] / plains[-1]:.2f}")
    plain, one = float(np.median(plains)), float(np.median(ones))
    ratio = float(np.median(np.array(ones) / np.array(plains)))  # of pairs measured side by side
    print(f"plain Keras loop (1 process, {cpus} threads):   {plain:7.2f} images/s (median of {args.repeats})")
    print(f"Ray Train, 1 worker ({cpus} CPUs):            {one:7.2f} images/s   ratio {ratio:.2f} (median of pairs; target >= 0.9)")
    two = None
    if args.xla:  # segray train refuses this too (TrainConfig)
        print("Ray Train, 2 workers: not run, TensorFlow compiles no collectives for CPU under XLA")
    else:
        two = ray_train(images, masks, cfg, args.epochs, workers=2, cpus_per_worker=max(1, cpus // 2))
        print(f"Ray Train, 2 workers ({max(1, cpus // 2)} CPU each):         {two:7.2f} images/s   ratio {two / plain:.2f}")
    two_part = f" two_workers_images_per_s={two:.2f} ratio_two={two / plain:.3f}" if two else ""
    print(f"RESULT plain_images_per_s={plain:.2f} one_worker_images_per_s={one:.2f} ratio_one={ratio:.3f}{two_part}")
    ray.shutdown()


if __name__ == "__main__":
    main()
