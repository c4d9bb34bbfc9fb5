"""Predict on rasters larger than memory (issue 28): megapixels/s, peak RSS of driver and workers, seams.

    python benchmarks/large_raster.py [--sizes 10000,30000] [--chunk 2048] [--tile 256] [--workers 1]
                                      [--backends tensorflow,onnxruntime] [--baseline --reps 2]
                                      [--width 4 --depth 2] [--cache DIR] [--no-seam]
    python benchmarks/large_raster.py --windows 512 [--reps 3]      # ONNX Runtime vs TensorFlow on U-Net windows only

For each size, a synthetic tiled OME-TIFF (``segray synth --large``) is
predicted chunk by chunk with an untrained small U-Net (``--width``,
``--depth``; default width 4, depth 2: 7,724 parameters, so 900 M pixels
finish on two cores) on every backend. Reported per run: megapixels/s over the
whole ``segray.predict`` call (actor start-up included), the driver's peak
RSS during the call (sampled every 0.2 s), the peak RSS of every worker (each
chunk record carries its actor's pid and peak), the window evaluations the
chunk borders add (``border_overhead``) and ``os.getloadavg()`` before and
after (the machine may be shared). Targets: the largest worker peak at the
largest size <= 1.1x that at the smallest.

``--baseline``: today's in-memory path on the smallest size, fairly: the same
``segray.predict`` call (same model, tile, overlap, batch, backend, one
actor) on the raster's folder read as images (``images/``, the whole raster
decoded by one actor; ``max_pixels`` raised to let it in), interleaved with
the chunked run A/B/A/B (``--reps``); target: chunked >= 0.9x in-memory.

``--windows N``: U-Net logits on N x N windows (batch ``--batch``) in
TensorFlow (``Predictor``: ``tf.function``) and ONNX Runtime (``Predictor``
with the converted model: one intra-op thread per core, no spinning), for the
raster model and a mid-sized U-Net (width 16, depth 3, as
inference_throughput.py's ``--backend``), interleaved; windows/s and the ratio.

Seam check: a 1024x1536 raster cut into 256-pixel chunks (many borders),
against the whole-image sliding window; target <= 0.01% of pixels differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from segray.data import open_raster, write_synthetic_raster  # noqa: E402


def make_model(root: str, width: int, depth: int) -> str:
    """An untrained U-Net saved as a training run; returns the run."""
    import keras

    from segray import models
    from segray.data import default_color

    keras.utils.set_random_seed(0)
    model = models.build("unet", 4, width=width, depth=depth)
    os.makedirs(os.path.join(root, "model"), exist_ok=True)
    model.save(os.path.join(root, "model", "model.keras"))
    pre = {
        "model": "unet", "size": None, "fit": "resize", "mean": [110.0, 100.0, 90.0], "std": [40.0, 45.0, 50.0], "num_classes": 4,
        "classes": [{"id": k, "name": f"class_{k}", "color": default_color(k)} for k in range(4)], "ignore_index": 255,
    }
    with open(os.path.join(root, "model", "preprocessing.json"), "w") as f:
        json.dump(pre, f)
    print(f"model: U-Net width {width} depth {depth}, {model.count_params()} parameters (untrained)", flush=True)
    return root


def raster(cache: str, h: int, w: int) -> str:
    folder = os.path.join(cache, f"raster_{h}x{w}")
    image = os.path.join(folder, "images", f"synth_{h}x{w}.ome.tif")
    if not os.path.exists(image):
        t = time.perf_counter()
        write_synthetic_raster(folder, h, w, num_classes=4, show_progress=False)
        print(f"synth {h}x{w}: {time.perf_counter() - t:.1f} s", flush=True)
    return folder


class RssSampler:
    """Peak RSS of this process (the driver), sampled every ``interval`` s while in a ``with``."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def predict_config(run: str, input_: str, out: str, args, backend: str, **extra):
    from segray.config import PredictConfig

    return PredictConfig(model=run, input=input_, output=out, chunk=args.chunk, tile=[args.tile, args.tile], overlap=0.5,
                         batch_size=args.batch, workers=args.workers, backend=backend, **extra)


def run_predict(run: str, folder: str, out: str, args, backend: str) -> dict:
    """The chunked run: ``segray.predict`` on the raster folder (images without ``images/``: streamed)."""
    import segray

    cfg = predict_config(run, os.path.join(folder, "images"), out, args, backend, truth=os.path.join(folder, "truth"))
    before = load()
    with RssSampler() as driver:
        t = time.perf_counter()
        result = segray.predict(cfg)
        wall = time.perf_counter() - t
    from segray.inference import read_chunk_records

    chunks = read_chunk_records(out).to_pandas()
    workers = chunks.groupby(["node_id", "pid"])["worker_peak_rss"].max()
    r = result.summary["rasters"][0]
    return {
        "megapixels_per_s": r["height"] * r["width"] / 1e6 / wall, "wall_s": wall, "chunks": result.summary["chunks"],
        "worker_peak_rss_mb": [round(v / 2**20) for v in workers.tolist()],
        "driver_peak_rss_mb": round(driver.peak / 2**20), "border_overhead": r["border_overhead"], "miou": result.summary.get("miou"),
        "load_before": before, "load_after": load(),
    }


def run_in_memory_path(run: str, folder: str, out: str, args, backend: str) -> dict:
    """Today's in-memory path: the same ``segray.predict`` on the folder read as images (``images/``: one actor decodes it whole)."""
    import segray

    cfg = predict_config(run, folder, out, args, backend, max_pixels=4 * 10**9)
    before = load()
    with RssSampler() as driver:
        t = time.perf_counter()
        result = segray.predict(cfg)
        wall = time.perf_counter() - t
    if result.summary.get("errors"):
        raise RuntimeError(f"in-memory predict of {folder} had errors: see {out}")
    h, w = open_raster(os.path.join(folder, "images", os.listdir(os.path.join(folder, "images"))[0])).shape
    return {"megapixels_per_s": h * w / 1e6 / wall, "wall_s": wall, "driver_peak_rss_mb": round(driver.peak / 2**20),
            "load_before": before, "load_after": load()}


def in_memory(run: str, folder: str, h: int, w: int, args) -> np.ndarray:
    """The whole-image sliding window (one process, ``tiled_argmax``): the seam check's reference mask."""
    from segray.inference import Predictor, geometry_of, tiled_argmax
    from segray.runs import resolve_model

    spec = resolve_model(run)
    g = geometry_of(spec, [args.tile, args.tile], 0.5)
    predictor = Predictor(spec.uri, g, args.batch, spec.model_id, mean=spec.mean, std=spec.std)
    image = open_raster(os.path.join(folder, "images", f"synth_{h}x{w}.ome.tif")).read(0, h, 0, w)
    return tiled_argmax(predictor.logits, image, g.tile, g.overlap, args.batch, predictor.mean, g.weighting)


def windows(args, work: str) -> list[str]:
    """``--windows N``: U-Net logits on N x N windows, TensorFlow vs ONNX Runtime (both through ``Predictor``), interleaved."""
    from segray.export import convert
    from segray.inference import Predictor, geometry_of
    from segray.runs import load_keras, resolve_model

    n, result = args.windows, []
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, n, n, 3), dtype=np.uint8)
    for width, depth in [(args.width, args.depth), (16, 3)]:
        run = make_model(os.path.join(work, f"win_unet_{width}_{depth}"), width, depth)
        spec = resolve_model(run)
        g = geometry_of(spec, [n, n], 0.5)
        onnx = convert(load_keras(spec.uri), (n, n))
        backends = {
            "tensorflow": Predictor(spec.uri, g, args.batch, spec.model_id, mean=spec.mean, std=spec.std),
            "onnxruntime": Predictor(spec.uri, g, args.batch, spec.model_id, onnx_model=onnx.data, onnx_id=onnx.onnx_id,
                                     mean=spec.mean, std=spec.std),
        }
        for p in backends.values():
            p.logits(images)  # traced / session warmed before the clock
        rates: dict[str, list[float]] = {b: [] for b in backends}
        loads = []
        for _ in range(args.reps):
            for name, p in backends.items():
                loads.append(os.getloadavg()[0])
                calls, t = 0, time.perf_counter()
                while calls < 3 or time.perf_counter() - t < 10:
                    p.logits(images)
                    calls += 1
                rates[name].append(calls * args.batch / (time.perf_counter() - t))
        best = {b: max(v) for b, v in rates.items()}
        ratio = best["onnxruntime"] / best["tensorflow"]
        tag = f"unet_w{width}_d{depth}"
        print(f"{n}x{n} windows, {tag}, batch {args.batch}: TensorFlow {best['tensorflow']:.2f}/s {[round(v, 2) for v in rates['tensorflow']]}, "
              f"ONNX Runtime {best['onnxruntime']:.2f}/s {[round(v, 2) for v in rates['onnxruntime']]}: ONNX/TF {ratio:.2f} "
              f"(load 1-min {min(loads):.1f}-{max(loads):.1f})", flush=True)
        result += [f"window{n}_{tag}_tf_per_s={best['tensorflow']:.2f}", f"window{n}_{tag}_onnx_per_s={best['onnxruntime']:.2f}",
                   f"window{n}_{tag}_onnx_vs_tf={ratio:.3f}"]
    return result


def show(r: dict) -> str:
    return json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000", help="raster sides, comma-separated (10000,30000)")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--width", type=int, default=4, help="U-Net base width (default 4)")
    p.add_argument("--depth", type=int, default=2, help="U-Net depth (default 2)")
    p.add_argument("--backends", default="tensorflow")
    p.add_argument("--baseline", action="store_true", help="also today's in-memory predict on the smallest size, interleaved")
    p.add_argument("--reps", type=int, default=2, help="A/B repetitions of --baseline and --windows")
    p.add_argument("--windows", type=int, default=0, help="only compare the backends on N x N U-Net windows")
    p.add_argument("--cache", default=None, help="keep the synthetic rasters here between runs")
    p.add_argument("--no-seam", action="store_true", help="leave out the seam check")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="large_raster_out_")
    if args.windows:
        print("RESULT " + " ".join(windows(args, work)))
        return

    import ray

    ray.init(num_cpus=max(4, args.workers + 2), include_dashboard=False, log_to_driver=False)
    cache = args.cache or tempfile.mkdtemp(prefix="large_raster_")
    run = make_model(os.path.join(work, "run"), args.width, args.depth)
    result = [f"model=unet_w{args.width}_d{args.depth}"]

    if not args.no_seam:
        # Seams: many chunk borders on a raster that fits, against the whole-image sliding window.
        seam_folder = raster(cache, 1024, 1536)
        seam_args = argparse.Namespace(**{**vars(args), "chunk": 256})
        run_predict(run, seam_folder, os.path.join(work, "seam"), seam_args, "tensorflow")
        chunked = open_raster(os.path.join(work, "seam", "masks", "synth_1024x1536.ome.zarr")).read(0, 1024, 0, 1536)[..., 0]
        whole = in_memory(run, seam_folder, 1024, 1536, args)
        seam = float(np.mean(chunked != whole))
        print(f"seam check: {seam * 100:.5f}% of pixels differ from the whole-image sliding window", flush=True)
        result.append(f"seam_disagreement_pct={seam * 100:.5f}")

    rss: dict[str, list[float]] = {}
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = args.backends.split(",")
    for side in sizes:
        folder = raster(cache, side, side)
        for backend in backends:
            tag = f"{side // 1000}k_{backend}"
            if args.baseline and side == min(sizes):
                chunked, whole = [], []
                for rep in range(args.reps):
                    chunked.append(run_predict(run, folder, os.path.join(work, f"out_{side}_{backend}_{rep}"), args, backend))
                    print(f"{side}x{side} {backend} chunked #{rep}: {show(chunked[-1])}", flush=True)
                    whole.append(run_in_memory_path(run, folder, os.path.join(work, f"mem_{side}_{backend}_{rep}"), args, backend))
                    print(f"{side}x{side} {backend} in-memory #{rep}: {show(whole[-1])}", flush=True)
                r = max(chunked, key=lambda x: x["megapixels_per_s"])
                m = max(x["megapixels_per_s"] for x in whole)
                result += [f"in_memory_mpx_per_s_{tag}={m:.3f}", f"chunked_vs_in_memory_{tag}={r['megapixels_per_s'] / m:.3f}",
                           f"in_memory_driver_peak_rss_mb_{tag}={max(x['driver_peak_rss_mb'] for x in whole)}"]
            else:
                r = run_predict(run, folder, os.path.join(work, f"out_{side}_{backend}"), args, backend)
                print(f"{side}x{side} {backend}: {show(r)}", flush=True)
            result += [f"mpx_per_s_{tag}={r['megapixels_per_s']:.3f}", f"worker_peak_rss_mb_{tag}={max(r['worker_peak_rss_mb'])}",
                       f"driver_peak_rss_mb_{tag}={r['driver_peak_rss_mb']}", f"load_{tag}={r['load_before']}"]
            rss.setdefault(backend, []).append(max(r["worker_peak_rss_mb"]))
            if backend == backends[0]:
                result.append(f"border_overhead_{side // 1000}k={r['border_overhead']:.3f}")
    for backend, values in rss.items():
        if len(values) > 1:
            result.append(f"worker_rss_ratio_{backend}={values[-1] / values[0]:.2f}")
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
