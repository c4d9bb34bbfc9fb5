"""Mask R-CNN on synthetic overlapping shapes within a time budget: mask AP50 / AP / PQ on held-out images.

Synthesises a training set and a separate held-out test set (another seed)
of overlapping shapes with `segray synth --task instance` (instance-ids
layout), ingests both, lets `segray plan` choose what it chooses for an
instance dataset and the budget (anchors, RoI and mask sizes, detection
limit, batch, lr ...), trains `maskrcnn` for the budget, predicts the test
images with `segray predict` and reads their COCO mask AP50 / AP / AP75 and
PQ from predict's summary. The machine's load (os.getloadavg) is sampled
every 30 s during training and printed: on a shared machine it says how
much of the 2 cores the run had.

    python3 benchmarks/instance_shapes.py [--budget 15m] [--n-train 400] [--n-test 60] [--size 64]
                                          [--options small|plan] [--work DIR] [--set FIELD=VALUE ...]

Target (issue 27): mask AP50 >= 0.90 after 15 minutes of training on 2 cores.
Ends with one line: RESULT key=value ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segray.config import parse_duration, parse_key_value  # noqa: E402

# A Mask R-CNN small enough for many steps on 2 shared cores: ResNet-10-like, narrow FPN and heads, the
# plan's anchors for 5-17 px objects on P2-P5. ``--options plan`` keeps the plan's (the builder's defaults
# for the backbone and heads, ResNet-18 width 64, FPN 256), measured far too slow for 15 minutes on a loaded CPU.
SMALL = {"blocks_per_stage": [1, 1, 1, 1], "width": 16, "fpn_filters": 64, "anchor_sizes": [8, 16, 32, 64], "head_units": 256,
         "mask_roi_size": 14, "mask_filters": 64, "mask_convs": 2, "rpn_pre_nms": 600, "proposals": 300, "max_detections": 50}


class LoadSampler:
    """os.getloadavg()'s 1-minute load every ``every`` seconds in a background thread."""

    def __init__(self, every: float = 30.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def describe(self) -> str:
        s = self.samples or [float("nan")]
        return f"load (1-min avg) mean {sum(s) / len(s):.2f}, min {min(s):.2f}, max {max(s):.2f} over {len(s)} samples; {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="15m", help="training time budget (90s, 15m, 1h); default 15m")
    parser.add_argument("--n-train", type=int, default=400, help="synthetic train+val images (default 400; 15%% val)")
    parser.add_argument("--n-test", type=int, default=60, help="held-out test images (default 60)")
    parser.add_argument("--size", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--classes", type=int, default=4, help="classes with background (default 4: circle, rectangle, triangle)")
    parser.add_argument("--options", choices=("small", "plan"), default="small",
                        help="maskrcnn's model_options: small (SMALL above, the default) or the plan's")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--set", action="append", default=[], type=parse_key_value, metavar="FIELD=VALUE",
                        help="a train field given over the plan (YAML value, e.g. lr=0.003); repeat")
    args = parser.parse_args()
    budget = parse_duration(args.budget)
    extra = dict(args.set)

    import ray

    import segray
    from segray.cli import main as cli_main
    from segray.runtime import init_ray, quiet_logging

    quiet_logging()
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
    work = args.work or tempfile.mkdtemp(prefix="instance-shapes-")
    raw_train, raw_test = os.path.join(work, "raw-train"), os.path.join(work, "raw-test")
    train_ds, test_ds = os.path.join(work, "train"), os.path.join(work, "test")
    common = ["--task", "instance", "--size", str(args.size), "--classes", str(args.classes)]
    assert cli_main(["synth", raw_train, "--n", str(args.n_train), "--seed", "0", *common]) == 0
    assert cli_main(["synth", raw_test, "--n", str(args.n_test), "--seed", "1", *common]) == 0
    assert cli_main(["ingest", raw_train, train_ds, "--task", "instance", "--val-fraction", "0.15"]) == 0
    assert cli_main(["ingest", raw_test, test_ds, "--task", "instance", "--val-fraction", "0"]) == 0

    plan = segray.plan({"data": train_ds, "time_budget": budget, "output": os.path.join(work, "plan.json")})
    print(f"\n=== the plan for {budget / 60:g} min ===\n{plan.table()}")
    name = f"maskrcnn-{int(time.time())}"
    # Giving `model` drops the plan's model_options (they rest on it): the plan's own run gives neither.
    given = {"model": "maskrcnn", "model_options": SMALL} if args.options == "small" else {}
    print(f"given over the plan: {given | extra}")
    t0 = time.time()
    with LoadSampler() as load:
        trained = segray.train({"data": train_ds, "storage": os.path.join(work, "runs"), "name": name,
                                "time_budget": budget, **given, **extra})
    train_s = time.time() - t0
    h = trained.history
    print(f"trained {len(h)} epochs in {train_s:.0f} s (budget {budget:.0f} s); best epoch {trained.best_epoch + 1}: "
          f"val AP50 {trained.best.get('val_ap50', float('nan')):.3f}")
    print(h[[c for c in ("epoch", "train_loss", "val_loss", "val_ap50", "val_ap", "val_pq", "seconds") if c in h]].to_string(index=False))
    print(load.describe())

    out = os.path.join(work, "pred-test")
    predicted = segray.predict({"model": trained.run_uri, "input": test_ds, "split": "train", "output": out, "batch_size": 4})
    s = predicted.summary
    print(json.dumps({k: s.get(k) for k in ("images", "objects", "ap", "ap50", "ap75", "pq", "sq", "rq", "errors")}, indent=2))
    fields = {
        "model": "maskrcnn", "options": args.options, "budget_s": round(budget), "train_s": round(train_s), "epochs": len(h),
        "test_images": s.get("images"), "ap50": s.get("ap50"), "ap": s.get("ap"), "ap75": s.get("ap75"), "pq": s.get("pq"),
        "target_ap50": 0.90, "load_start": round(load_start[0], 2),
        "load_mean": round(sum(load.samples) / max(1, len(load.samples)), 2), "cpus": os.cpu_count(),
    }
    print("RESULT " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
