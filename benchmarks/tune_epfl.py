"""Search hyperparameters on the EPFL CA1 electron-microscopy set within a time budget; print trials/hour and the best val mIoU.

Reads ../shared/data/epfl-em-6class (skips when absent), ingests its train
slices as benchmarks/train_epfl.py does (per-class layout, the same overlap
priority, 15% of slices for validation), then runs `segray tune` on them
(default space: learning rate, loss, class weights, model and width,
augmentation strength; images at --size, random --crop patches) until the
--time-budget ends. Every trial is a Ray Train run; ASHA stops poor ones.

    python benchmarks/tune_epfl.py [--time-budget 30m] [--epochs 20] [--trials 64] [--storage DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segray.config import parse_duration, parse_size  # noqa: E402

EPFL = os.path.join(os.path.dirname(ROOT), "shared", "data", "epfl-em-6class")
ORDER = ["membranes", "mitochondrion", "mitochondrial boundaries", "PSD", "vesicles", "axon"]
# Thin structures first: a mitochondrial boundary lying on a membrane stays a boundary.
PRIORITY = ["mitochondrial boundaries", "PSD", "vesicles", "mitochondrion", "membranes", "axon"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-budget", type=parse_duration, default=1800.0, help="seconds, or 30m, 2h (default 30m)")
    parser.add_argument("--trials", type=int, default=64, help="trials sampled (the budget usually ends first)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of a trial ASHA never stops")
    parser.add_argument("--grace-epochs", type=int, default=2)
    parser.add_argument("--size", type=parse_size, default=(384, 512))
    parser.add_argument("--crop", type=parse_size, default=(192, 256))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--storage", help="where the search goes (default: a temporary folder, removed)")
    parser.add_argument("--data", default=EPFL)
    args = parser.parse_args()
    from segray.runtime import quiet_logging

    quiet_logging()
    if not os.path.isdir(args.data):
        print(f"skipped: {args.data} is absent")
        return

    import yaml

    import segray
    from segray.config import IngestConfig
    from segray.tuning import DEFAULT_SPACE

    from segray.runtime import init_ray, local_cpus
    from segray.tuning import concurrent_trials, ray_cpus

    with tempfile.TemporaryDirectory(prefix="segray-tune-epfl-") as tmp:
        space = {**DEFAULT_SPACE, "size": list(args.size), "crop": list(args.crop), "batch_size": args.batch}
        space_file = os.path.join(tmp, "space.yaml")
        with open(space_file, "w") as f:
            yaml.safe_dump(space, f)
        cfg = segray.TuneConfig(
            data=os.path.join(tmp, "train"), storage=args.storage or os.path.join(tmp, "searches"), name=f"epfl-{int(time.time())}",
            trials=args.trials, time_budget=args.time_budget, search_space=space_file, epochs=args.epochs, grace_epochs=args.grace_epochs,
        )
        # One Ray for the ingest and the search, started as `segray tune` starts its own.
        concurrent = concurrent_trials(cfg, float(os.cpu_count() or 1), 0.0, args.trials, local=True)
        init_ray(num_cpus=local_cpus(ray_cpus(cfg, concurrent)))
        t0 = time.time()
        common = dict(layout="per-class", images_dir="slices", class_order=ORDER, priority=PRIORITY)
        ingested = segray.ingest(IngestConfig(source=os.path.join(args.data, "train"), destination=cfg.data, val_fraction=0.15, **common))
        print(f"ingested {ingested.info.splits} slices in {time.time() - t0:.0f} s; {concurrent} trial(s) at once")
        print("search space:\n  " + yaml.safe_dump(space, default_flow_style=True, width=200).strip())
        result = segray.tune(cfg)
        print(result.describe())
        t = result.trials
        best = result.best["val_miou"] if result.best else float("nan")
        print(
            f"RESULT trials={len(t)} complete_trials={int(t['complete'].sum()) if len(t) else 0} "
            f"stopped_early={int(t['stopped_early'].sum()) if len(t) else 0} trials_per_hour={result.trials_per_hour:.2f} "
            f"best_val_miou={best:.4f} budget_s={args.time_budget:.0f} search_s={result.seconds:.0f}"
        )


if __name__ == "__main__":
    main()
