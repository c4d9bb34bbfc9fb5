"""Images/s of the training input pipeline against a plain single-process OpenCV loop.

Both read the same Parquet shards and do the same work per image: decode the
image and mask with OpenCV, fit to the size, augment (flips, rotate-90,
scale-crop, brightness, contrast) and stack uint8 batches, ready for the
training step (which casts and normalises in its graph). Repeats alternate
loop and pipeline, so load from other processes falls on both alike; the
medians are reported.

Also printed: images/s per core; bytes per image through Ray's object store
(the decoded uint8 blocks the read tasks put there and the driver reads; the
encoded bytes are read and decoded inside the same task), beside what float32
images and int32 masks moved before issue 16 (plus the encoded rows, which a
separate decode operator also moved); and where a pipeline image's time
goes: decode and fit + augment (timed in one process, per image), the rest of
the pipeline's core-seconds (Ray's scheduling, serialisation, object-store
transfer, the driver's batching) as overhead.

    python benchmarks/input_pipeline.py [--n 960] [--size 256] [--repeats 5]

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
from segray.data import DecodeBatch, PipelineConfig, image_dtype, reset_draws, rows_per_batch  # noqa: E402
from segray.data import augment, fit  # noqa: E402
from segray.data import decode_image, decode_mask  # noqa: E402
from segray.data import ingest, load_dataset_info, read_split, synthesize  # noqa: E402


def _tables(dataset: str):
    for f in storage.list_files(storage.join(dataset, "train")):
        if f.uri.endswith(".parquet"):
            yield storage.read_parquet(f.uri, columns=["image_id", "image", "mask"])


def plain_loop(dataset: str, size: tuple[int, int], batch: int) -> tuple[int, int]:
    """One process: read each shard, decode and augment row by row, stack batches. Returns (images, bytes out)."""
    info = load_dataset_info(dataset)
    transform = DecodeBatch(PipelineConfig(size=size, augment=True, seed=0), image_dtype(info))
    seen = nbytes = 0
    for table in _tables(dataset):
        for start in range(0, table.num_rows, batch):
            part = table.slice(start, batch)
            out = transform({c: np.asarray(part[c].to_pylist(), dtype=object) for c in part.column_names})
            seen += len(out["image"])
            nbytes += out["image"].nbytes + out["mask"].nbytes
    return seen, nbytes


def pipeline(dataset: str, size: tuple[int, int], batch: int) -> tuple[int, int]:
    ds = read_split(dataset, "train", size=size, augment=True, seed=0)
    seen = nbytes = 0
    for b in ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=4):
        seen += len(b["image"])
        nbytes += b["image"].nbytes + b["mask"].nbytes
    return seen, nbytes


def stage_seconds(dataset: str, size: tuple[int, int]) -> tuple[float, float, int]:
    """(decode s, fit + augment s, images) of the pipeline's per-image work, timed in this process."""
    rng = np.random.default_rng(0)
    decode = work = 0.0
    n = 0
    for table in _tables(dataset):
        for image_bytes, mask_bytes in zip(table["image"].to_pylist(), table["mask"].to_pylist()):
            t0 = time.perf_counter()
            image, mask = decode_image(image_bytes, max_pixels=None), decode_mask(mask_bytes, max_pixels=None)
            t1 = time.perf_counter()
            image, mask = fit(image, mask, size)
            augment(image, mask, rng)
            t2 = time.perf_counter()
            decode, work, n = decode + t1 - t0, work + t2 - t1, n + 1
    return decode, work, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=960)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="rows per batch the consumer takes (the training batch)")
    parser.add_argument("--repeats", type=int, default=5, help="alternated loop / pipeline measurements")
    parser.add_argument("--shard-mb", type=float, default=4.0)
    args = parser.parse_args()

    import ray

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    size = (args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(os.path.join(tmp, "raw"), n=args.n, size=size, seed=0, show_progress=False)
        result = ingest(IngestConfig(source=os.path.join(tmp, "raw"), destination=os.path.join(tmp, "ds"), val_fraction=0.0, shard_mb=args.shard_mb))
        shard_files = [f for f in storage.list_files(os.path.join(tmp, "ds", "train")) if f.uri.endswith(".parquet")]
        encoded = sum(f.size for f in shard_files)
        n_images = result.info.splits["train"]
        dtype = image_dtype(result.info)
        print(
            f"{n_images} images of {args.size}x{args.size} in {len(shard_files)} shards; {cores} CPUs; "
            f"decode batches of {rows_per_batch(size, dtype)} rows ({dtype}); consumer batches of {args.batch}"
        )
        pipeline(result.dst, size, args.batch)  # warm-up: worker processes, imports
        loops, pipes = [], []
        for r in range(args.repeats):
            reset_draws()
            t0 = time.perf_counter()
            n_loop, loop_bytes = plain_loop(result.dst, size, args.batch)
            loops.append(n_loop / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            n_pipe, pipe_bytes = pipeline(result.dst, size, args.batch)
            pipes.append(n_pipe / (time.perf_counter() - t0))
            assert n_loop == n_pipe == n_images, (n_loop, n_pipe, n_images)
            print(f"  repeat {r + 1}/{args.repeats}: loop {loops[-1]:6.1f}, pipeline {pipes[-1]:6.1f} images/s, ratio {pipes[-1] / loops[-1]:.2f}")
        decode_s, work_s, timed = stage_seconds(result.dst, size)
    loop_rate, pipe_rate = float(np.median(loops)), float(np.median(pipes))
    ratio = float(np.median(np.array(pipes) / np.array(loops)))
    decoded = pipe_bytes / n_images
    # Before issue 16: encoded rows (a separate decode operator read them from the store) + float32 RGB + int32 mask.
    before = encoded / n_images + args.size * args.size * (3 * 4 + 4)
    moved = decoded
    # Per image: compute measured in one process; the pipeline spends cores / rate core-seconds.
    decode_ms, work_ms = 1e3 * decode_s / timed, 1e3 * work_s / timed
    spent_ms = 1e3 * cores / pipe_rate
    overhead_ms = max(0.0, spent_ms - decode_ms - work_ms)
    share = lambda v: 100.0 * v / spent_ms  # noqa: E731
    print(f"plain single-process OpenCV loop: {loop_rate:8.1f} images/s  (median of {args.repeats})")
    print(f"segray Ray Data pipeline:         {pipe_rate:8.1f} images/s  (median of {args.repeats})")
    print(f"ratio pipeline / loop:            {ratio:8.2f}x  (median of pairs; target >= 1.5x)")
    print(f"per core: loop {loop_rate:.1f} (1 core), pipeline {pipe_rate / cores:.1f} images/s per core ({cores} cores)")
    print(
        f"object store per image: {moved / 1024:.1f} KiB (decoded uint8 image + mask; before issue 16: "
        f"{encoded / n_images / 1024:.1f} KiB encoded rows + float32 image + int32 mask = {before / 1024:.1f} KiB)"
    )
    print(
        f"time per pipeline image, {spent_ms:.2f} core-ms: decode {decode_ms:.2f} ms ({share(decode_ms):.0f}%), "
        f"fit + augment {work_ms:.2f} ms ({share(work_ms):.0f}%), Ray overhead and transfer {overhead_ms:.2f} ms ({share(overhead_ms):.0f}%)"
    )
    print(
        f"RESULT loop_images_per_s={loop_rate:.1f} pipeline_images_per_s={pipe_rate:.1f} ratio={ratio:.3f} "
        f"pipeline_images_per_s_per_core={pipe_rate / cores:.1f} object_store_bytes_per_image={moved:.0f} "
        f"decode_share={share(decode_ms) / 100:.3f} augment_share={share(work_ms) / 100:.3f} overhead_share={share(overhead_ms) / 100:.3f}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
