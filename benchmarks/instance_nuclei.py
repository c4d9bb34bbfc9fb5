"""Both instance models on the real StarDist nuclei image (125 nuclei), 4-fold by image quadrant: AP50, AP75, PQ.

The image (``img2d.tif``, 512x512, 2018 Data Science Bowl) and its label
image (``mask2d.tif``) ship in the ``stardist`` wheel (``../shared/data/README.md``);
the label image is also in ``tests/data/nuclei``. Fold ``q`` tests on
quadrant ``q`` (256x256, one image) and trains on the other three, cut into
overlapping 128x128 tiles (stride 32; objects cut by a tile's edge keep their
part), 15% of the tiles as the val split that picks the kept epoch. Each model
(``maskrcnn``, ``unet-instance``) trains for ``--budget`` per fold with one
worker, then ``segray predict`` scores the held-out quadrant (COCO mask AP50,
AP75, PQ). Mean and spread (sample standard deviation) over the 4 folds.

    python3 benchmarks/instance_nuclei.py [--budget 15m] [--models maskrcnn,unet-instance] [--folds 0,1,2,3]
                                          [--image img2d.tif] [--work DIR]

Without ``--image`` the image is looked for beside the label image and in
``../shared/data``, else fetched with ``pip download --no-deps stardist==0.9.2``.
Target (issue 27): AP50 >= 0.75 for the better model with 15 minutes per fold.
Ends with one line: RESULT key=value ... (the budget used included).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segray.config import parse_duration  # noqa: E402

MASK = os.path.join(ROOT, "tests", "data", "nuclei", "mask2d.tif")
TILE, STRIDE = 128, 32
QUADRANTS = [(0, 0), (0, 256), (256, 0), (256, 256)]
# Small enough to take many steps on 2 busy cores within minutes; anchors for 10-25 px nuclei.
OPTIONS = {
    "maskrcnn": {"blocks_per_stage": [1, 1, 1, 1], "width": 16, "fpn_filters": 64, "anchor_sizes": [8, 16, 32, 64],
                 "head_units": 256, "mask_roi_size": 14, "mask_filters": 64, "mask_convs": 2, "rpn_pre_nms": 600,
                 "proposals": 300, "max_detections": 100},
    "unet-instance": {"depth": 3, "width": 16, "dropout": 0.0},
}


def find_image(mask: str) -> str:
    """img2d.tif beside the label image, in ../shared/data, or from the stardist wheel (pip download)."""
    shared = os.path.join(os.path.dirname(ROOT), "shared", "data")
    for candidate in [os.path.join(os.path.dirname(mask), "img2d.tif"), *glob.glob(os.path.join(shared, "**", "img2d.tif"), recursive=True)]:
        if os.path.exists(candidate):
            return candidate
    folder = tempfile.mkdtemp(prefix="stardist-wheel-")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "stardist==0.9.2", "-d", folder], check=True)
    wheel = glob.glob(os.path.join(folder, "stardist-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        z.extract("stardist/data/images/img2d.tif", folder)
    return os.path.join(folder, "stardist", "data", "images", "img2d.tif")


def relabel(ids: np.ndarray) -> np.ndarray:
    """Ids 1..K in order of first appearance value (0 stays background)."""
    values = np.unique(ids)
    lookup = np.zeros(int(values.max()) + 1, np.uint16)
    lookup[values[values > 0]] = np.arange(1, int((values > 0).sum()) + 1)
    return lookup[ids]


def write_layout(folder: str, pieces: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """The instance-ids layout: images/<id>.png (grey as RGB) and instances/<id>.png (16-bit ids)."""
    import cv2

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "instances"), exist_ok=True)
    for name, image, ids in pieces:
        cv2.imwrite(os.path.join(folder, "images", f"{name}.png"), np.repeat(image[..., None], 3, axis=2))
        cv2.imwrite(os.path.join(folder, "instances", f"{name}.png"), relabel(ids))


def fold_data(work: str, image: np.ndarray, mask: np.ndarray, fold: int) -> tuple[str, str, int]:
    """Ingests fold ``fold``: train/val tiles of the other quadrants, and the test quadrant; returns (train, test, test objects)."""
    from segray.cli import main as cli_main

    tiles = []
    for q, (y0, x0) in enumerate(QUADRANTS):
        if q == fold:
            continue
        for y in range(y0, y0 + 256 - TILE + 1, STRIDE):
            for x in range(x0, x0 + 256 - TILE + 1, STRIDE):
                ids = mask[y:y + TILE, x:x + TILE]
                if ids.any():
                    tiles.append((f"q{q}_{y}_{x}", image[y:y + TILE, x:x + TILE], ids))
    y0, x0 = QUADRANTS[fold]
    test_ids = mask[y0:y0 + 256, x0:x0 + 256]
    raw_train, raw_test = os.path.join(work, f"fold{fold}", "raw-train"), os.path.join(work, f"fold{fold}", "raw-test")
    write_layout(raw_train, tiles)
    write_layout(raw_test, [(f"q{fold}", image[y0:y0 + 256, x0:x0 + 256], test_ids)])
    train, test = os.path.join(work, f"fold{fold}", "train"), os.path.join(work, f"fold{fold}", "test")
    assert cli_main(["ingest", raw_train, train, "--task", "instance", "--layout", "instance-ids", "--val-fraction", "0.15"]) == 0
    assert cli_main(["ingest", raw_test, test, "--task", "instance", "--layout", "instance-ids", "--val-fraction", "0"]) == 0
    return train, test, int(len(np.unique(test_ids)) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="15m", help="training time per fold and model (90s, 3m, 15m); default 15m")
    parser.add_argument("--models", default="maskrcnn,unet-instance")
    parser.add_argument("--folds", default="0,1,2,3", help="test quadrants (0 top left, 1 top right, 2 bottom left, 3 bottom right)")
    parser.add_argument("--image", help="img2d.tif (default: found or fetched, see above)")
    parser.add_argument("--mask", default=MASK)
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--summarise", nargs="+", metavar="LOG",
                        help="train nothing: the RESULT of the per-fold rows printed in these logs (folds run by several processes)")
    args = parser.parse_args()
    budget = parse_duration(args.budget)
    if args.summarise:
        summarise_logs(args.summarise, budget)
        return
    names = [n for n in args.models.split(",") if n]
    folds = [int(f) for f in args.folds.split(",")]

    import ray
    import tifffile

    import segray
    from segray.runtime import init_ray, quiet_logging

    quiet_logging()
    image_path = args.image or find_image(args.mask)
    raw = tifffile.imread(image_path).astype(np.float32)
    image = np.clip(255.0 * (raw - raw.min()) / max(1.0, float(raw.max() - raw.min())), 0, 255).astype(np.uint8)
    mask = tifffile.imread(args.mask)
    print(f"image {image_path} {raw.shape}, {len(np.unique(mask)) - 1} nuclei in {args.mask}")
    load_start = os.getloadavg()
    for attempt in range(3):  # a loaded machine can time Ray's start out
        try:
            init_ray(num_cpus=max(4, os.cpu_count() or 1))
            break
        except Exception as e:  # noqa: BLE001
            print(f"Ray did not start (attempt {attempt + 1} of 3): {e}")
            ray.shutdown()
            if attempt == 2:
                raise
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = args.work or tempfile.mkdtemp(prefix="instance-nuclei-")
    rows, loads = [], []
    for fold in folds:
        train, test, objects = fold_data(work, image, mask, fold)
        for name in names:
            run = f"{name}-fold{fold}-{int(time.time())}"
            t0 = time.time()
            trained = segray.train({
                "data": train, "storage": os.path.join(work, "runs"), "name": run, "model": name, "model_options": OPTIONS[name],
                "time_budget": budget, "epochs": 1000, "batch_size": 4, "workers": 1, "lr": 1e-3, "optimizer": "adam",
                "schedule": "poly", "size": [TILE, TILE], "augment_set": ["flip", "rot90", "brightness", "contrast"],
            })
            train_s = time.time() - t0
            loads.append(os.getloadavg()[0])  # the 1-minute load as training ended
            out = os.path.join(work, "pred", run)
            s = segray.predict({"model": trained.run_uri, "input": test, "split": "train", "output": out, "batch_size": 1}).summary
            row = {"fold": fold, "model": name, "epochs": len(trained.history), "train_s": round(train_s), "test_objects": objects,
                   "predicted": s.get("objects"), "ap50": s.get("ap50"), "ap75": s.get("ap75"), "ap": s.get("ap"), "pq": s.get("pq"),
                   "val_ap50": trained.best.get("val_ap50"), "load": round(loads[-1], 2)}
            rows.append(row)
            print(json.dumps(row))
    summarise(rows, names, budget, load_start[0], loads)


def summarise(rows: list[dict], names: list[str], budget: float, load_start: float, loads: list[float]) -> None:
    """The per-fold table, then the RESULT line: mean and spread (sample std) over folds of each model's AP50, AP75, PQ."""
    import pandas as pd

    frame = pd.DataFrame(rows).sort_values(["fold", "model"])
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    fields: dict[str, object] = {"budget_per_fold_s": round(budget), "folds": ",".join(str(f) for f in sorted(set(frame["fold"])))}
    for name in names:
        part = frame[frame["model"] == name]
        for key in ("ap50", "ap75", "pq"):
            values = part[key].astype(float)
            fields[f"{name}_{key}_mean"] = float(values.mean())
            fields[f"{name}_{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    best = max(names, key=lambda n: fields[f"{n}_ap50_mean"])
    fields.update(best=best, target_ap50=0.75, load_start=round(load_start, 2),
                  load_mean=round(float(np.mean(loads)) if loads else float("nan"), 2), cpus=os.cpu_count())
    print("RESULT " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()))


def summarise_logs(paths: list[str], budget: float) -> None:
    """``--summarise``: the RESULT of folds run by several processes (their logs' per-fold JSON rows, and load lines)."""
    rows, loads = [], []
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.startswith('{"fold"'):
                    row = json.loads(line)
                    rows.append(row)
                    if "load" in row:
                        loads.append(row["load"])
    names = list(dict.fromkeys(r["model"] for r in rows))
    print(f"{len(rows)} fold results from {', '.join(paths)}")
    summarise(rows, names, budget, float("nan"), loads)

if __name__ == "__main__":
    main()
