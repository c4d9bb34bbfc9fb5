"""Train a U-Net on the EPFL CA1 electron-microscopy set and print per-class IoU on its test slices.

Reads ../shared/data/epfl-em-6class (skips when absent): ingests the train
slices (per-class layout, a fixed overlap priority) and the test slices,
trains with segray's Ray Train job on downscaled images with random crops,
then scores the best model on the 5 test slices at the training scale.

    python benchmarks/train_epfl.py [--epochs 30] [--size 384x512] [--crop 192x256] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segray.config import parse_size  # noqa: E402

EPFL = os.path.join(os.path.dirname(ROOT), "shared", "data", "epfl-em-6class")
ORDER = ["membranes", "mitochondrion", "mitochondrial boundaries", "PSD", "vesicles", "axon"]
# Thin structures first: a mitochondrial boundary lying on a membrane stays a boundary.
PRIORITY = ["mitochondrial boundaries", "PSD", "vesicles", "mitochondrion", "membranes", "axon"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--size", type=parse_size, default=(384, 512))
    parser.add_argument("--crop", type=parse_size, default=(192, 256))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--data", default=EPFL)
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        print(f"skipped: {args.data} is absent")
        return

    import keras
    import ray

    import segray.models  # noqa: F401  (custom layers for loading)
    from segray import storage
    from segray.config import IngestConfig
    from segray.data import ingest, read_split
    from segray.metrics import confusion_matrix, dice, iou, summary
    from segray.config import TrainConfig
    from segray.training import train

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(layout="per-class", images_dir="slices", class_order=ORDER, priority=PRIORITY)
        train_ds = ingest(IngestConfig(source=os.path.join(args.data, "train"), destination=os.path.join(tmp, "train"), val_fraction=0.15, **common))
        test_ds = ingest(IngestConfig(source=os.path.join(args.data, "test"), destination=os.path.join(tmp, "test"), val_fraction=0.0, **common))
        print(f"train/val slices {train_ds.info.splits}, test slices {test_ds.info.splits['train']}")
        print("pixel frequency (train): " + ", ".join(f"{k} {v:.1%}" for k, v in train_ds.info.pixel_frequency.items()))
        cfg = TrainConfig(
            data=train_ds.dst, storage=os.path.join(tmp, "runs"), name="epfl", model="unet", epochs=args.epochs,
            batch_size=args.batch, workers=args.workers, lr=args.lr, size=list(args.size), crop=list(args.crop),
            loss="ce+dice", class_weights="auto", schedule="cosine", model_options={"width": args.width},
        )
        result = train(cfg)
        print(f"trained {len(result.history)} epochs in {time.time() - t0:.0f} s; best val mIoU {result.best['val_miou']:.3f}")

        model_path = os.path.join(tmp, "model.keras")
        with open(model_path, "wb") as f:
            f.write(storage.read_bytes(storage.join(result.run_uri, "model", "model.keras")))
        model = keras.saving.load_model(model_path, safe_mode=True)
        # The test slices are normalised with the *train* statistics, as in training.
        rows = read_split(test_ds.dst, "train", size=args.size, info=train_ds.info).take_all()
        cm = np.zeros((7, 7), np.int64)
        for r in rows:
            logits = model(r["image"][None], training=False)
            cm += confusion_matrix(r["mask"][None], np.argmax(logits, -1), 7)
    names = train_ds.info.class_names
    s = summary(cm)
    print(f"\nper-class IoU on the {len(rows)} EPFL test slices at {args.size[0]}x{args.size[1]}:")
    print(f"{'class':<26}{'IoU':>8}{'Dice':>8}{'pixels':>10}")
    for name, i, d, n in zip(names, iou(cm), dice(cm), cm.sum(1)):
        print(f"{name:<26}{i:8.3f}{d:8.3f}{int(n):10d}")
    print(f"{'mean (' + str(s['valid_classes']) + ' classes)':<26}{s['miou']:8.3f}{s['mean_dice']:8.3f}   pixel accuracy {s['pixel_accuracy']:.3f}")
    print(f"total {time.time() - t0:.0f} s")
    print(f"RESULT miou={s['miou']:.4f} mean_dice={s['mean_dice']:.4f} pixel_accuracy={s['pixel_accuracy']:.4f} seconds={time.time() - t0:.0f}")


if __name__ == "__main__":
    main()
