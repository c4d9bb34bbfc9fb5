"""Images/s of the training input pipeline against a plain single-process OpenCV loop.

Both read the same Parquet shards and do the same work per image: decode the
image and mask with OpenCV, fit to the size, augment (flips, rotate-90,
scale-crop, brightness, contrast), normalise, and stack batches.

    python benchmarks/input_pipeline.py [--n 480] [--size 256] [--batch 16] [--repeats 2]

Target on a 2-core machine: the pipeline at 1.5x the plain loop or better.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray import storage  # noqa: E402
from segray.config import IngestConfig  # noqa: E402
from segray.data import ingest, load_dataset_info, read_split, synthesize  # noqa: E402
from segray.data.pipeline import DecodeBatch, PipelineConfig  # noqa: E402


def plain_loop(dataset: str, size: tuple[int, int], batch: int) -> int:
    """One process: read each shard, decode and augment row by row, stack batches."""
    info = load_dataset_info(dataset)
    transform = DecodeBatch(PipelineConfig(size=size, augment=True, seed=0), info.mean, info.std)
    seen = 0
    for f in storage.list_files(storage.join(dataset, "train")):
        table = storage.read_parquet(f.uri, columns=["image_id", "image", "mask"])
        for start in range(0, table.num_rows, batch):
            part = table.slice(start, batch)
            out = transform({c: np.asarray(part[c].to_pylist(), dtype=object) for c in part.column_names})
            seen += len(out["image"])
    return seen


def pipeline(dataset: str, size: tuple[int, int], batch: int) -> int:
    ds = read_split(dataset, "train", size=size, augment=True, seed=0, batch_size=batch)
    seen = 0
    for b in ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=4):
        seen += len(b["image"])
    return seen


def best_rate(fn, repeats: int, *args) -> tuple[float, int]:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn(*args)
        rates.append(n / (time.perf_counter() - t0))
    return max(rates), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=480)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shard-mb", type=float, default=4.0)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    size = (args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(os.path.join(tmp, "raw"), n=args.n, size=size, seed=0, show_progress=False)
        result = ingest(IngestConfig(source=os.path.join(tmp, "raw"), destination=os.path.join(tmp, "ds"), val_fraction=0.0, shard_mb=args.shard_mb))
        shards = len(storage.list_files(os.path.join(tmp, "ds", "train")))
        print(f"{result.info.splits['train']} images of {args.size}x{args.size} in {shards} shards; {os.cpu_count()} CPUs")
        pipeline(result.dst, size, args.batch)  # warm-up: worker processes, imports
        loop_rate, n_loop = best_rate(plain_loop, args.repeats, result.dst, size, args.batch)
        pipe_rate, n_pipe = best_rate(pipeline, args.repeats, result.dst, size, args.batch)
    assert n_loop == n_pipe, (n_loop, n_pipe)
    print(f"plain single-process OpenCV loop: {loop_rate:8.1f} images/s")
    print(f"segray Ray Data pipeline:         {pipe_rate:8.1f} images/s")
    print(f"ratio pipeline / loop:            {pipe_rate / loop_rate:8.2f}x  (target >= 1.5x)")
    print(f"RESULT loop_images_per_s={loop_rate:.1f} pipeline_images_per_s={pipe_rate:.1f} ratio={pipe_rate / loop_rate:.3f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
