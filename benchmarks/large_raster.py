"""Predict on rasters larger than memory (issue 28): megapixels/s, peak RSS of driver and workers, seams.

    python benchmarks/large_raster.py [--sizes 10000,30000] [--chunk 2048] [--tile 256] [--workers 1]
                                      [--backends tensorflow,onnxruntime] [--baseline] [--cache DIR]

For each size, a synthetic tiled OME-TIFF (``segray synth --large``) is
predicted chunk by chunk with a tiny U-Net (width 8, depth 2) on every
backend. Reported per run: megapixels/s over the whole call (actor start-up
included), the driver's peak RSS, the largest worker's peak RSS (each chunk
record carries its actor's), and the window evaluations the chunk borders add
(``border_overhead``). Targets: peak RSS at the largest size <= 1.1x that at
the smallest; ``--baseline``: throughput >= 0.9x the in-memory sliding window
(one process, the whole raster decoded, ``tiled_argmax``) on the smallest size.

Seam check: a 1024x1536 raster cut into 256-pixel chunks (many borders),
against the whole-image sliding window; target <= 0.01% of pixels differ.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.data import open_raster, write_synthetic_raster  # noqa: E402


def make_model(root: str) -> str:
    """A tiny U-Net saved as a training run; returns the run."""
    import keras

    from segray import models
    from segray.data import default_color

    keras.utils.set_random_seed(0)
    model = models.build("unet", 4, width=8, depth=2)
    os.makedirs(os.path.join(root, "model"), exist_ok=True)
    model.save(os.path.join(root, "model", "model.keras"))
    pre = {
        "model": "unet", "size": None, "fit": "resize", "mean": [110.0, 100.0, 90.0], "std": [40.0, 45.0, 50.0], "num_classes": 4,
        "classes": [{"id": k, "name": f"class_{k}", "color": default_color(k)} for k in range(4)], "ignore_index": 255,
    }
    with open(os.path.join(root, "model", "preprocessing.json"), "w") as f:
        json.dump(pre, f)
    return root


def raster(cache: str, h: int, w: int) -> str:
    folder = os.path.join(cache, f"raster_{h}x{w}")
    image = os.path.join(folder, "images", f"synth_{h}x{w}.ome.tif")
    if not os.path.exists(image):
        t = time.perf_counter()
        write_synthetic_raster(folder, h, w, num_classes=4, show_progress=False)
        print(f"synth {h}x{w}: {time.perf_counter() - t:.1f} s", flush=True)
    return folder


def run_predict(run: str, folder: str, out: str, args, backend: str) -> dict:
    import segray
    from segray.config import PredictConfig

    cfg = PredictConfig(model=run, input=os.path.join(folder, "images"), output=out, truth=os.path.join(folder, "truth"),
                        chunk=args.chunk, tile=[args.tile, args.tile], overlap=0.5, batch_size=args.batch, workers=args.workers,
                        backend=backend)
    t = time.perf_counter()
    result = segray.predict(cfg)
    wall = time.perf_counter() - t
    import pyarrow.parquet as pq

    chunks = pq.read_table(os.path.join(out, "_chunks"))
    r = result.summary["rasters"][0]
    return {
        "megapixels_per_s": r["height"] * r["width"] / 1e6 / wall, "wall_s": wall, "chunks": result.summary["chunks"],
        "worker_peak_rss_mb": max(chunks["worker_peak_rss"].to_pylist()) / 2**20,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "border_overhead": r["border_overhead"], "miou": result.summary.get("miou"),
    }


def in_memory(run: str, folder: str, h: int, w: int, args) -> tuple[float, np.ndarray]:
    """Megapixels/s of today's in-memory sliding window (one process, the whole raster decoded) and its mask."""
    from segray.inference import Predictor, geometry_of, tiled_argmax
    from segray.runs import resolve_model

    spec = resolve_model(run)
    g = geometry_of(spec, [args.tile, args.tile], 0.5)
    predictor = Predictor(spec.uri, g, args.batch, spec.model_id, mean=spec.mean, std=spec.std)
    image = open_raster(os.path.join(folder, "images", f"synth_{h}x{w}.ome.tif")).read(0, h, 0, w)
    predictor.logits(np.zeros((args.batch, args.tile, args.tile, 3), np.uint8))  # traced before the clock starts
    t = time.perf_counter()
    mask = tiled_argmax(predictor.logits, image, g.tile, g.overlap, args.batch, predictor.mean, g.weighting)
    return h * w / 1e6 / (time.perf_counter() - t), mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000", help="raster sides, comma-separated (10000,30000)")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--backends", default="tensorflow")
    p.add_argument("--baseline", action="store_true", help="also the in-memory sliding window on the smallest size")
    p.add_argument("--cache", default=None, help="keep the synthetic rasters here between runs")
    p.add_argument("--no-seam", action="store_true", help="leave out the seam check")
    args = p.parse_args()

    import ray

    ray.init(num_cpus=max(4, args.workers + 2), include_dashboard=False, log_to_driver=False)
    cache = args.cache or tempfile.mkdtemp(prefix="large_raster_")
    work = tempfile.mkdtemp(prefix="large_raster_out_")
    run = make_model(os.path.join(work, "run"))
    result = []

    if not args.no_seam:
        # Seams: many chunk borders on a raster that fits, against the whole-image sliding window.
        seam_folder = raster(cache, 1024, 1536)
        seam_args = argparse.Namespace(**{**vars(args), "chunk": 256})
        run_predict(run, seam_folder, os.path.join(work, "seam"), seam_args, "tensorflow")
        chunked = open_raster(os.path.join(work, "seam", "masks", "synth_1024x1536.ome.zarr")).read(0, 1024, 0, 1536)[..., 0]
        _, whole = in_memory(run, seam_folder, 1024, 1536, args)
        seam = float(np.mean(chunked != whole))
        print(f"seam check: {seam * 100:.5f}% of pixels differ from the whole-image sliding window", flush=True)
        result.append(f"seam_disagreement_pct={seam * 100:.5f}")

    rss = {}
    for side in [int(s) for s in args.sizes.split(",")]:
        folder = raster(cache, side, side)
        for backend in args.backends.split(","):
            r = run_predict(run, folder, os.path.join(work, f"out_{side}_{backend}"), args, backend)
            print(f"{side}x{side} {backend}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})}", flush=True)
            tag = f"{side // 1000}k_{backend}"
            result += [f"mpx_per_s_{tag}={r['megapixels_per_s']:.2f}", f"worker_peak_rss_mb_{tag}={r['worker_peak_rss_mb']:.0f}"]
            rss.setdefault(backend, []).append(r["worker_peak_rss_mb"])
            if backend == args.backends.split(",")[0]:
                result.append(f"border_overhead_{side // 1000}k={r['border_overhead']:.3f}")
        if args.baseline and side == min(int(s) for s in args.sizes.split(",")):
            mps, _ = in_memory(run, folder, side, side, args)
            print(f"{side}x{side} in-memory sliding window: {mps:.2f} megapixels/s", flush=True)
            result.append(f"in_memory_mpx_per_s_{side // 1000}k={mps:.2f}")
    result.append(f"driver_peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    for backend, values in rss.items():
        if len(values) > 1:
            result.append(f"worker_rss_ratio_{backend}={values[-1] / values[0]:.2f}")
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
