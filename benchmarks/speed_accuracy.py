"""Speed against accuracy of every registered model: parameters, GFLOPs, CPU latency, throughput, val mIoU.

Prints the table of `segray models --benchmark` (segray.benchmark) and
writes speed_accuracy.parquet (and, with --data, speed_accuracy.png: val mIoU
against latency, the Pareto front marked) to --output. GFLOPs are counted
from the Keras graph (2 per multiply-add of each convolution and dense layer).
On a GPU the same timings in float32 and float16 are added; without one, this
says so. With --data every model trains the same --epochs with one worker.

    python3 benchmarks/speed_accuracy.py [--size 256] [--data DATA --epochs 3] [--output .]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segray.config import parse_size  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=(256, 256))
    parser.add_argument("--data", help="an ingested dataset: adds val mIoU after --epochs of training")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 calls per model")
    parser.add_argument("--classes", type=int, default=2, help="output classes without --data")
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--output", default=".")
    args = parser.parse_args()
    from segray.runtime import quiet_logging

    quiet_logging()

    from segray import benchmark as bench
    from segray import models

    task = None  # no data: every model is timed; with data, the models of its task
    if args.data:
        from segray.data import load_dataset_info
        from segray.runtime import init_ray

        task = load_dataset_info(args.data).task
        init_ray()
    names = args.models or models.available(task)
    frame = bench.benchmark(names, size=tuple(args.size), num_classes=args.classes, data=args.data, epochs=args.epochs, repeats=args.repeats)
    print(f"input {args.size[0]}x{args.size[1]}, CPU threads: TensorFlow's default (this machine has {os.cpu_count()} cores)")
    print(bench.format_table(frame))
    gpu = bench.gpu_available()
    if not gpu:
        print("no GPU found: the gpu_ and gpu_fp16_ columns are left out")
    for uri in bench.write_report(frame, args.output):
        print(f"wrote {uri}")
    fields = []
    for row in frame.itertuples():
        fields += [f"{row.model}_gflops={row.gflops:.3f}", f"{row.model}_latency_p50_ms={row.latency_p50_ms:.2f}",
                   f"{row.model}_throughput={row.throughput:.2f}"]
        for column in ("val_miou", "val_ap50", "val_pq"):
            if column in frame:
                fields.append(f"{row.model}_{column}={getattr(row, column):.4f}")
        if gpu:
            fields.append(f"{row.model}_gpu_fp16_latency_p50_ms={row.gpu_fp16_latency_p50_ms:.3f}")
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
