"""Data-parallel scaling on paper, from measurement: step time, gradient all-reduce, projected speed-up.

On a fake two-node cluster (``ray.cluster_utils.Cluster``, one CPU worker per
node) it measures, with segray's ``WorkerLoop``:

- the train step alone (1 worker, in-memory uint8 batches): ``t_step``;
- the all-reduce (sum) of a float32 vector of the model's gradient size
  between 2 workers with MultiWorkerMirroredStrategy: ``t_ar(2)``, from which
  the effective bus bandwidth ``B_meas = 2 (N-1)/N * G / t_ar`` (ring
  all-reduce, G bytes of gradients);
- the step with 2 workers (per-worker images/s) and the communication share
  ``t_ar / t_step2``.

Then the projected speed-up at N = 8, 32, 128 GPU workers for a stated
bandwidth ``--bandwidth-gbps`` (per worker, bus), with a stated GPU step
time ``--gpu-step-ms`` (default: the UNet_Medical anchor's 8 / 119 s per
batch of 8 on an A100), no overlap of compute and communication (a lower
bound; Keras applies gradients after the all-reduce):

    t_ar(N) = 2 (N - 1) / N * G / B + 2 (N - 1) * latency
    speed-up(N) = N * t_step / (t_step + t_ar(N))

    python benchmarks/scaling.py [--size 128] [--batch 8] [--bandwidth-gbps 100] [--latency-us 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.config import TrainConfig  # noqa: E402
from segray.data import ClassInfo, DatasetInfo  # noqa: E402

INFO = DatasetInfo(
    classes=[ClassInfo(k, f"c{k}") for k in range(4)],
    splits={"train": 64, "val": 0},
    pixel_counts=[1, 1, 1, 1],
    pixel_frequency={f"c{k}": 0.25 for k in range(4)},
    mean=[110.0] * 3,
    std=[40.0] * 3,
    layout="ids",
    source="memory",
    command="benchmark",
)


def _measure(loop_config):
    import ray.train
    import tensorflow as tf

    from segray.training import WorkerLoop

    cfg = TrainConfig.from_dict(loop_config["config"])
    world = ray.train.get_context().get_world_size()
    loop = WorkerLoop(cfg, INFO, world)
    size, b, steps = loop_config["size"], cfg.batch_size, loop_config["steps"]
    rng = np.random.default_rng(ray.train.get_context().get_world_rank())
    x = tf.constant(rng.integers(0, 256, (b, size, size, 3)).astype(np.uint8))
    y = tf.constant(rng.integers(0, 4, (b, size, size)).astype(np.uint8))
    params = int(sum(np.prod(v.shape) for v in loop.model.trainable_variables))
    for _ in range(3):
        float(loop.train_step(x, y)[0])
    t0 = time.perf_counter()
    for _ in range(steps):
        float(loop.train_step(x, y)[0])
    step_s = (time.perf_counter() - t0) / steps
    grads = np.zeros(params, np.float32)
    ar_s = 0.0
    if world > 1:
        reduce = tf.function(
            lambda v: loop.strategy.reduce(tf.distribute.ReduceOp.SUM, loop.strategy.run(tf.identity, args=(v,)), axis=None)
        )
        g = tf.constant(grads)
        for _ in range(3):
            reduce(g).numpy()
        t0 = time.perf_counter()
        for _ in range(steps):
            reduce(g).numpy()
        ar_s = (time.perf_counter() - t0) / steps
    # Ray Train V2 keeps metrics only of reports that carry a checkpoint.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if ray.train.get_context().get_world_rank() == 0 else None
        ray.train.report({"step_s": step_s, "ar_s": ar_s, "params": params}, checkpoint=checkpoint)


def run(workers: int, cfg: TrainConfig, size: int, steps: int, storage: str) -> dict:
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    result = TensorflowTrainer(
        _measure,
        train_loop_config={"config": cfg.to_dict(), "size": size, "steps": steps},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"scaling{workers}", storage_path=storage),
    ).fit()
    return result.metrics


def speedup(n: int, step_s: float, grad_bytes: float, bandwidth: float, latency: float) -> tuple[float, float]:
    ar = 2 * (n - 1) / n * grad_bytes / bandwidth + 2 * (n - 1) * latency
    return n * step_s / (step_s + ar), ar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bandwidth-gbps", type=float, default=100.0, help="per-worker bus bandwidth of the projection (Gbit/s)")
    parser.add_argument("--latency-us", type=float, default=10.0, help="per-hop latency of the projection")
    parser.add_argument("--gpu-step-ms", type=float, default=1000 * 8 / 119, help="GPU step time of the projection (default: 8 images at 119 images/s)")
    parser.add_argument("--gpu-params", type=float, default=31.0e6, help="parameters of the projected model (U-Net w64 d4 ~31M)")
    args = parser.parse_args()

    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)  # the trainer's controller needs room beside two workers
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cfg = TrainConfig(
        data="memory", storage="none", name="bench", epochs=1, batch_size=args.batch, lr=1e-3, schedule="constant",
        workers=1, cpus_per_worker=1, model_options={"width": args.width, "depth": args.depth},
    )
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, cfg, args.size, args.steps, tmp)
        two = run(2, cfg, args.size, args.steps, tmp)
    ray.shutdown()
    cluster.shutdown()
    params, g = one["params"], one["params"] * 4
    b1, b2 = args.batch / one["step_s"], args.batch / two["step_s"]
    comm_share = two["ar_s"] / two["step_s"]
    measured_bw = 2 * (2 - 1) / 2 * g / two["ar_s"] if two["ar_s"] else float("nan")
    print(f"U-Net w{args.width} d{args.depth}, {params:,} parameters ({g / 2**20:.1f} MiB of float32 gradients), {args.size}x{args.size}, batch {args.batch}, 1 CPU per worker")
    print(f"1 worker: step {1e3 * one['step_s']:.1f} ms, {b1:.1f} images/s")
    print(f"2 workers (2 fake nodes): step {1e3 * two['step_s']:.1f} ms, {b2:.1f} images/s per worker ({2 * b2:.1f} in all, {2 * b2 / b1:.2f}x of 1)")
    print(f"all-reduce of the gradient size, 2 workers: {1e3 * two['ar_s']:.2f} ms = {100 * comm_share:.1f}% of the 2-worker step; effective bus bandwidth {measured_bw * 8 / 1e9:.2f} Gbit/s")
    bw, lat = args.bandwidth_gbps * 1e9 / 8, args.latency_us * 1e-6
    step = args.gpu_step_ms / 1e3
    gb = args.gpu_params * 4
    print(f"projection: step {args.gpu_step_ms:.1f} ms on a GPU, {args.gpu_params / 1e6:.0f}M parameters ({gb / 2**20:.0f} MiB), {args.bandwidth_gbps:g} Gbit/s, {args.latency_us:g} us per hop, no overlap:")
    projected = {}
    for n in (8, 32, 128):
        s, ar = speedup(n, step, gb, bw, lat)
        projected[n] = s
        print(f"  {n:4d} workers: all-reduce {1e3 * ar:6.1f} ms, speed-up {s:6.1f}x ({100 * s / n:.0f}% efficiency)")
    print(
        f"RESULT one_worker_images_per_s={b1:.2f} two_worker_images_per_s_per_worker={b2:.2f} allreduce_ms={1e3 * two['ar_s']:.3f} "
        f"comm_share={comm_share:.3f} speedup_8={projected[8]:.2f} speedup_32={projected[32]:.2f} speedup_128={projected[128]:.2f}"
    )


if __name__ == "__main__":
    main()
