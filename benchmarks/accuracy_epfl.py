"""Plan, train and test on the EPFL CA1 EM set within time budgets: per-class IoU/Dice and accuracy vs minutes.

Reads ../shared/data/epfl-em-6class (skips when absent). Ingests the 27
train slices (15% of them, by hash, as the val split that picks the kept
model) and the 5 test slices as their own dataset, then for each budget:
``segray.train({"data", "storage", "name", "time_budget"})`` (the plan fills
every other field), and ``segray.predict`` on the 5 full-size test slices
with the model's training window (sliding, overlap 0.5), with and without
flip TTA when PredictConfig has a ``tta`` field. The test slices are only
scored here: no plan rule looks at them.

    python benchmarks/accuracy_epfl.py [--budgets 10m,30m] [--work DIR] [--set FIELD=VALUE ...]

Targets (issue 14), at 30 minutes: mIoU >= 0.65 over the 7 classes, no
class below 0.30, mitochondrion IoU >= 0.85.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segray.config import parse_duration, parse_key_value  # noqa: E402  (KEY=VALUE with a YAML value, as --model-options)

EPFL = os.path.join(os.path.dirname(ROOT), "shared", "data", "epfl-em-6class")
ORDER = ["membranes", "mitochondrion", "mitochondrial boundaries", "PSD", "vesicles", "axon"]
# Thin structures first: a mitochondrial boundary lying on a membrane stays a boundary (as benchmarks/train_epfl.py).
PRIORITY = ["mitochondrial boundaries", "PSD", "vesicles", "mitochondrion", "membranes", "axon"]


def scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    from segray.metrics import dice, iou, summary

    return iou(cm), dice(cm), summary(cm)


def predict_test(run_uri: str, test: str, out: str, tta: str | None) -> np.ndarray:
    """The 7x7 confusion matrix of the run's model on the test slices."""
    import segray
    from segray import storage
    from segray.config import PredictConfig
    from segray.inference import read_confusion
    from segray.runs import Preprocessing  # noqa: F401

    fields = {f.name for f in dataclasses.fields(PredictConfig)}
    pre = json.loads(storage.read_text(storage.join(run_uri, "model", "preprocessing.json")))
    values = dict(model=run_uri, input=test, split="train", output=out, overlays=0, batch_size=4)
    window = pre.get("window")
    if window and "window" not in fields:
        # Before the sliding-window predict: the existing tiles with the training window.
        values.update(tile=list(window), overlap=0.5)
    elif "overlap" in fields:
        values.update(overlap=0.5)
    if tta:
        values["tta"] = tta
    segray.predict(PredictConfig(**values))
    return read_confusion(storage.join(out, "confusion.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="10m,30m", help="training budgets, comma-separated (90s, 10m, 1h)")
    parser.add_argument("--data", default=EPFL)
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--png", default="accuracy_epfl.png", help="the accuracy-vs-minutes curve")
    parser.add_argument("--set", action="append", default=[], type=parse_key_value, metavar="FIELD=VALUE",
                        help="a train field given over the plan (YAML value, e.g. deep_supervision=true); repeat")
    args = parser.parse_args()
    extra = dict(args.set)
    if extra:
        print(f"given over the plan: {extra}")
    if not os.path.isdir(args.data):
        print(f"skipped: {args.data} is absent")
        return
    # The longest budget first: it is the one the targets are about.
    budgets = sorted((parse_duration(b) for b in args.budgets.split(",")), reverse=True)

    import ray

    import segray
    from segray.config import IngestConfig, PredictConfig
    from segray.runtime import init_ray, quiet_logging

    quiet_logging()
    # Logical CPUs above the 2 cores: the planned worker takes both, the data pipeline one more.
    init_ray(num_cpus=max(4, os.cpu_count() or 1))
    ray.data.DataContext.get_current().enable_progress_bars = False
    has_tta = "tta" in {f.name for f in dataclasses.fields(PredictConfig)}
    work = args.work or tempfile.mkdtemp(prefix="accuracy-epfl-")
    common = dict(layout="per-class", images_dir="slices", class_order=ORDER, priority=PRIORITY, overwrite=True)
    train_ds = segray.ingest(IngestConfig(source=os.path.join(args.data, "train"), destination=os.path.join(work, "train"), val_fraction=0.15, **common))
    test_ds = segray.ingest(IngestConfig(source=os.path.join(args.data, "test"), destination=os.path.join(work, "test"), val_fraction=0.0, **common))
    names = train_ds.info.class_names
    print(f"train/val slices {train_ds.info.splits}, test slices {test_ds.info.splits['train']}; work folder {work}")

    results, curves = [], []
    for budget in budgets:
        minutes = budget / 60
        name = f"plan-{minutes:g}m-{int(time.time())}"
        plan = segray.plan({"data": train_ds.dst, "time_budget": budget, "output": os.path.join(work, f"plan-{minutes:g}m.json")})
        print(f"\n=== budget {minutes:g} min: the plan ===\n{plan.table()}")
        t0 = time.time()
        trained = segray.train({"data": train_ds.dst, "storage": os.path.join(work, "runs"), "name": name, "time_budget": budget, **extra})
        train_s = time.time() - t0
        h = trained.history
        curves.append((minutes, np.cumsum(h["seconds"].to_numpy()) / 60, h["val_miou"].to_numpy()))
        print(f"trained {len(h)} epochs in {train_s:.0f} s (budget {budget:.0f} s); best val mIoU {trained.best['val_miou']:.3f} at epoch {trained.best_epoch + 1}")
        for tta in [None, "flip"] if has_tta else [None]:
            cm = predict_test(trained.run_uri, test_ds.dst, os.path.join(work, "pred", f"{name}-{tta or 'plain'}"), tta)
            i, d, s = scores(cm)
            results.append(dict(minutes=minutes, tta=tta or "none", iou=i, dice=d, miou=s["miou"], mean_dice=s["mean_dice"],
                                train_s=train_s, val_miou=trained.best["val_miou"]))
            print(f"\nper-class scores on the {test_ds.info.splits['train']} EPFL test slices, budget {minutes:g} min, TTA {tta or 'none'}:")
            print(f"{'class':<26}{'IoU':>8}{'Dice':>8}")
            for n, a, b in zip(names, i, d):
                print(f"{n:<26}{a:8.3f}{b:8.3f}")
            print(f"{'mean (7 classes)':<26}{s['miou']:8.3f}{s['mean_dice']:8.3f}   pixel accuracy {s['pixel_accuracy']:.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for minutes, t, v in curves:
        ax.plot(t, v, marker=".", label=f"val mIoU, budget {minutes:g} min")
    for r in results:
        ax.scatter([r["train_s"] / 60], [r["miou"]], marker="*" if r["tta"] == "none" else "x", s=80,
                   label=f"test mIoU {r['minutes']:g} min, TTA {r['tta']}")
    ax.axhline(0.65, color="grey", linestyle=":", label="target 0.65")
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("mIoU (7 classes)")
    ax.set_title("segray plan on EPFL CA1: accuracy vs minutes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"\ncurve: {os.path.abspath(args.png)}")

    def best(minutes: float) -> dict | None:
        rows = [r for r in results if r["minutes"] == minutes]
        return max(rows, key=lambda r: r["miou"]) if rows else None

    summary = []
    for minutes in sorted(b / 60 for b in budgets):
        r = best(minutes)
        summary.append(f"miou_{minutes:g}m={r['miou']:.4f}")
    last = best(budgets[0] / 60)
    mito = float(last["iou"][names.index("mitochondrion")])
    low = float(np.nanmin(last["iou"]))
    met = last["miou"] >= 0.65 and low >= 0.30 and mito >= 0.85
    print(f"RESULT {' '.join(summary)} min_class_iou={low:.4f} mito_iou={mito:.4f} tta={last['tta']} targets_met={met}")


if __name__ == "__main__":
    main()
