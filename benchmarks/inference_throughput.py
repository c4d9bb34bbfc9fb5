"""Images/s of ``segray predict`` end to end, against two single-process baselines, and its memory.

    python benchmarks/inference_throughput.py [--n 1000,5000] [--size 64] [--batch 32] [--width 16 --depth 3]
    python benchmarks/inference_throughput.py --gpu [--n 512] [--size 512] [--batch 16]
    python benchmarks/inference_throughput.py --backend tensorflow,onnxruntime [--models unet,segnet,deeplabv3plus] [--n 512]
    python benchmarks/inference_throughput.py --n 1000 --tta flip      # and the cost of test-time augmentation

All three read the same raw layout (images/ + masks/ PNGs) and use the same U-Net:

- ``model.predict``: uint8 images already decoded in memory, cast and
  normalised in the model's graph; the model alone (target: predict at 0.97x
  of it or better);
- naive loop: one process reads, decodes, predicts, encodes and writes one
  batch at a time (target: predict at 1.5x of it or better);
- ``segray predict``: storage to masks and tables (per-image, per-class,
  confusion, summary). Reported over the whole call (actor start-up with its
  TensorFlow import included) and in steady state (first to last batch).

Peak memory is the RSS summed over the driver and every process it started
(raylet, GCS, Ray workers), sampled every 0.2 s, at each ``--n``; with images
of one size the largest should stay within 1.2x of the smallest. PSS (shared
pages such as the object store's counted once) is printed beside it.

``--gpu``: a U-Net (depth 4, width 32) at 512x512 in mixed precision, batch 16,
one actor with one GPU.

``--backend``: for each registered model (``--models``, mid-sized options in
``BACKEND_OPTIONS``), the naive TensorFlow loop, the same loop on ONNX
Runtime, and ``segray predict`` with each backend, side by side on the same
images (target: predict on ONNX Runtime >= 1.5x the naive TensorFlow loop).

``--tta flip`` (or ``flip8``): one more predict of the smallest count with
that TTA; its steady-state rate against plain predict's is the TTA's cost
(4 or 8 model calls per image: about 4x or 8x where the model dominates).
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

from segray import storage  # noqa: E402
from segray.data import decode_image, encode_png, synthesize  # noqa: E402


class MemorySampler:
    """Peak of the summed RSS / PSS of this process and all its descendants."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree(root: int) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    @staticmethod
    def _kb(path: str, key: str) -> int:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def sample(self) -> tuple[int, int]:
        pids = self._tree(os.getpid())
        rss = sum(self._kb(f"/proc/{p}/status", "VmRSS:") for p in pids)
        pss = sum(self._kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
        return rss * 1024, pss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = self.sample()
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_model(root: str, size: int, width: int, depth: int, mean, std, mixed: bool) -> str:
    """A U-Net saved as a training run (model/model.keras + preprocessing.json); returns the run."""
    import keras

    from segray import models
    from segray.data import default_color
    from segray.runs import share_gpus

    share_gpus()  # the driver's TensorFlow must leave the GPU to the predictor actor
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = models.build("unet", 4, width=width, depth=depth)
    os.makedirs(os.path.join(root, "model"), exist_ok=True)
    model.save(os.path.join(root, "model", "model.keras"))
    pre = {
        "model": "unet", "size": [size, size], "fit": "resize", "mean": mean, "std": std, "num_classes": 4,
        "classes": [{"id": k, "name": f"class_{k}", "color": default_color(k)} for k in range(4)], "ignore_index": 255,
    }
    with open(os.path.join(root, "model", "preprocessing.json"), "w") as f:
        json.dump(pre, f)
    return root


def subset(raw: str, dst: str, n: int) -> str:
    """The first ``n`` pairs of ``raw`` as hard links (same bytes, no copy)."""
    for folder in ("images", "masks"):
        os.makedirs(os.path.join(dst, folder), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(raw, folder)))[:n]:
            os.link(os.path.join(raw, folder, name), os.path.join(dst, folder, name))
    return dst


def baseline_model_predict(raw: str, run: str, batch: int) -> float:
    """images/s of model.predict on uint8 images decoded beforehand, normalised in the model's graph.

    The same work per image as segray's predictor (cast, (x - mean) / std,
    the model), none of its reading, decoding or writing.
    """
    import keras

    from segray.runs import load_keras

    pre = json.load(open(os.path.join(run, "model", "preprocessing.json")))
    names = sorted(os.listdir(os.path.join(raw, "images")))
    images = np.stack([decode_image(open(os.path.join(raw, "images", n), "rb").read()) for n in names])
    assert images.dtype == np.uint8
    model = load_keras(os.path.join(run, "model", "model.keras"))
    std = np.float32(pre["std"])
    wrapped = keras.Sequential([
        keras.layers.Input(images.shape[1:], dtype="uint8"),
        keras.layers.Rescaling(scale=1.0 / std, offset=-np.float32(pre["mean"]) / std),
        model,
    ])
    model = wrapped
    model.predict(images[: batch * 2], batch_size=batch, verbose=0)  # trace and warm up
    t0 = time.perf_counter()
    model.predict(images, batch_size=batch, verbose=0)
    return len(images) / (time.perf_counter() - t0)


def baseline_naive_loop(raw: str, run: str, out: str, batch: int) -> float:
    """images/s of one process that reads, decodes, predicts, encodes and writes batch by batch."""
    from segray.runs import load_keras

    pre = json.load(open(os.path.join(run, "model", "preprocessing.json")))
    mean, std = np.float32(pre["mean"]), np.float32(pre["std"])
    model = load_keras(os.path.join(run, "model", "model.keras"))
    names = sorted(os.listdir(os.path.join(raw, "images")))
    model.predict_on_batch(np.zeros((batch, pre["size"][0], pre["size"][1], 3), np.float32))  # trace
    t0 = time.perf_counter()
    for i in range(0, len(names), batch):
        chunk = names[i : i + batch]
        images = np.stack([decode_image(storage.read_bytes(os.path.join(raw, "images", n))) for n in chunk])
        logits = np.asarray(model.predict_on_batch((images.astype(np.float32) - mean) / std))
        for n, pred in zip(chunk, logits.argmax(-1).astype(np.uint8)):
            storage.write_bytes(os.path.join(out, n), encode_png(pred))
    return len(names) / (time.perf_counter() - t0)


def run_predict(run: str, raw: str, out: str, batch: int, gpus: float, backend: str = "tensorflow", tta: str = "none") -> tuple[dict, float, int, int]:
    """(summary, wall images/s, peak RSS, peak PSS) of one segray predict."""
    from segray.config import PredictConfig
    from segray.inference import predict

    with MemorySampler() as mem:
        t0 = time.perf_counter()
        result = predict(PredictConfig(model=run, input=raw, output=out, batch_size=batch, gpus_per_worker=gpus, overlays=0, backend=backend, tta=tta))
        wall = time.perf_counter() - t0
    return result.summary, result.summary["images"] / wall, mem.peak_rss, mem.peak_pss


# Mid-sized variants: big enough that the model, not Python, dominates a 64x64 batch on a CPU.
BACKEND_OPTIONS = {
    "unet": {"width": 16, "depth": 3},
    "segnet": {"width": 16, "depth": 3, "convs_per_stage": 1},
    "deeplabv3plus": {"width": 16, "blocks_per_stage": 1, "aspp_filters": 64, "low_level_filters": 16, "decoder_filters": 32},
}


def make_run(root: str, name: str, size: int, mean, std) -> str:
    """A registered model (``BACKEND_OPTIONS``) saved as a training run; returns the run."""
    import keras

    from segray import models
    from segray.data import default_color

    keras.utils.set_random_seed(0)
    model = models.build(name, 4, **BACKEND_OPTIONS[name])
    os.makedirs(os.path.join(root, "model"), exist_ok=True)
    model.save(os.path.join(root, "model", "model.keras"))
    pre = {
        "model": name, "size": [size, size], "fit": "resize", "mean": mean, "std": std, "num_classes": 4,
        "classes": [{"id": k, "name": f"class_{k}", "color": default_color(k)} for k in range(4)], "ignore_index": 255,
    }
    with open(os.path.join(root, "model", "preprocessing.json"), "w") as f:
        json.dump(pre, f)
    return root


def naive_onnx_loop(raw: str, run: str, out: str, batch: int) -> float:
    """images/s of the naive loop with the model converted to ONNX and run by ONNX Runtime."""
    from segray.export import OnnxLogits, convert
    from segray.runs import load_keras

    pre = json.load(open(os.path.join(run, "model", "preprocessing.json")))
    mean, std = np.float32(pre["mean"]), np.float32(pre["std"])
    forward = OnnxLogits(convert(load_keras(os.path.join(run, "model", "model.keras")), tuple(pre["size"])).data)
    names = sorted(os.listdir(os.path.join(raw, "images")))
    forward(np.zeros((batch, pre["size"][0], pre["size"][1], 3), np.float32))
    t0 = time.perf_counter()
    for i in range(0, len(names), batch):
        chunk = names[i : i + batch]
        images = np.stack([decode_image(storage.read_bytes(os.path.join(raw, "images", n))) for n in chunk])
        logits = forward((images.astype(np.float32) - mean) / std)
        for n, pred in zip(chunk, logits.argmax(-1).astype(np.uint8)):
            storage.write_bytes(os.path.join(out, n), encode_png(pred))
    return len(names) / (time.perf_counter() - t0)


def compare_backends(args: argparse.Namespace) -> None:
    """``--backend``: each model, both backends, naive loops and segray predict, on the same images."""
    import ray

    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    names = [m.strip() for m in (args.models or "unet,segnet,deeplabv3plus").split(",") if m.strip()]
    n = int((args.n or "512").split(",")[0])
    size, batch = args.size or 64, args.batch or 32
    workdir = args.dir or tempfile.mkdtemp(prefix="segray-bench-")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(f"{os.cpu_count()} CPUs; {n} images {size}x{size}; batch {batch}; backends {', '.join(backends)}; best of {args.repeats}; in {workdir}")
    raw = os.path.join(workdir, "raw")
    synthesize(raw, n=n, size=(size, size), num_classes=4, seed=0, show_progress=False)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    result: list[str] = []
    for name in names:
        run = make_run(os.path.join(workdir, f"run-{name}"), name, size, [110.0, 110.0, 110.0], [40.0, 40.0, 40.0])
        rates: dict[str, list[float]] = {}
        for rep in range(args.repeats):
            rates.setdefault("naive_tensorflow", []).append(baseline_naive_loop(raw, run, os.path.join(workdir, f"naive-tf-{name}-{rep}"), batch))
            if "onnxruntime" in backends:
                rates.setdefault("naive_onnxruntime", []).append(naive_onnx_loop(raw, run, os.path.join(workdir, f"naive-ort-{name}-{rep}"), batch))
            for backend in backends:
                summary, wall, _, _ = run_predict(run, raw, os.path.join(workdir, f"out-{name}-{backend}-{rep}"), batch, 0.0, backend)
                rates.setdefault(f"predict_{backend}", []).append(summary["steady_images_per_s"] or wall)
                rates.setdefault(f"predict_{backend}_whole", []).append(wall)
        best = {k: max(v) for k, v in rates.items()}
        print(f"{name} ({', '.join(f'{k}={v}' for k, v in BACKEND_OPTIONS[name].items())}), images/s (best of {args.repeats}; all runs in brackets):")
        for key, values in rates.items():
            print(f"  {key:<32} {best[key]:8.1f}  [{', '.join(f'{v:.1f}' for v in values)}]")
        base = best["naive_tensorflow"]
        for backend in backends:
            print(f"  predict {backend} / naive TensorFlow loop: {best[f'predict_{backend}'] / base:.2f} steady state, {best[f'predict_{backend}_whole'] / base:.2f} whole call")
        if len(backends) > 1:
            faster = max(backends, key=lambda b: best[f"predict_{b}"])
            print(f"  faster in segray predict: {faster}")
        result += [f"{name}_{key}={value:.1f}" for key, value in best.items()]
        if "onnxruntime" in backends:
            result.append(f"{name}_ratio_onnxruntime_vs_naive_tf={best['predict_onnxruntime'] / base:.3f}")
        if "tensorflow" in backends:
            result.append(f"{name}_ratio_tensorflow_vs_naive_tf={best['predict_tensorflow'] / base:.3f}")
    print("RESULT " + " ".join(result))
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default=None, help="image counts, comma-separated (default 1000,5000; --gpu 512)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 64; --gpu 512)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32; --gpu 16)")
    parser.add_argument("--width", type=int, default=None, help="U-Net base width (default 16; --gpu 32)")
    parser.add_argument("--depth", type=int, default=None, help="U-Net depth (default 3; --gpu 4)")
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs of each method; the best counts (default 2)")
    parser.add_argument("--gpu", action="store_true", help="one GPU, mixed precision, U-Net 512x512")
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--backend", default=None, help="tensorflow, onnxruntime or both (comma-separated): compare backends per model")
    parser.add_argument("--models", default=None, help="with --backend: registered models, comma-separated (default all three)")
    parser.add_argument("--tta", choices=["none", "flip", "flip8"], default="none", help="also time predict with this TTA (default none: not timed)")
    args = parser.parse_args()
    if args.backend:
        compare_backends(args)
        return
    gpu = args.gpu
    counts = sorted(int(x) for x in (args.n or ("512" if gpu else "1000,5000")).split(","))
    size = args.size or (512 if gpu else 64)
    batch = args.batch or (16 if gpu else 32)
    width, depth = args.width or (32 if gpu else 16), args.depth or (4 if gpu else 3)

    import ray

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    workdir = args.dir or tempfile.mkdtemp(prefix="segray-bench-")
    print(f"{os.cpu_count()} CPUs; U-Net depth {depth} width {width}; {size}x{size} images; batch {batch}; {'GPU, mixed precision' if gpu else 'CPU'}; in {workdir}")
    t0 = time.perf_counter()
    raw = os.path.join(workdir, "raw")
    synthesize(raw, n=max(counts), size=(size, size), num_classes=4, seed=0, show_progress=False)
    print(f"synthesised {max(counts)} pairs in {time.perf_counter() - t0:.0f} s")
    run = make_model(os.path.join(workdir, "run"), size, width, depth, [110.0, 110.0, 110.0], [40.0, 40.0, 40.0], mixed=gpu)
    inputs = {n: raw if n == max(counts) else subset(raw, os.path.join(workdir, f"raw-{n}"), n) for n in counts}

    ray.init(num_cpus=max(4, os.cpu_count() or 1), num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    idle_rss, idle_pss = MemorySampler().sample()
    print(f"session at rest (driver with TensorFlow, Ray's processes): RSS {idle_rss / 2**20:.0f} MiB, PSS {idle_pss / 2**20:.0f} MiB")

    # Memory first, before the baselines grow the driver: one predict per count.
    gpus = 1.0 if gpu else 0.0
    memory = {}
    rates: dict[str, list[float]] = {"whole": [], "steady": [], "model": [], "naive": []}
    for n in counts:
        summary, wall_rate, rss, pss = run_predict(run, inputs[n], os.path.join(workdir, f"out-{n}"), batch, gpus)
        memory[n] = (rss, pss)
        print(
            f"segray predict, {n} images: {wall_rate:.1f} images/s over the whole call ({summary['wall_time_s']:.1f} s), "
            f"{summary['steady_images_per_s'] or float('nan'):.1f} images/s in steady state; "
            f"peak RSS {rss / 2**20:.0f} MiB, PSS {pss / 2**20:.0f} MiB"
        )
        if n == counts[0]:
            rates["whole"].append(wall_rate)
            rates["steady"].append(summary["steady_images_per_s"] or wall_rate)

    # Throughput on the smallest count, methods alternating so that load from
    # other processes on the machine falls on all of them alike.
    n = counts[0]
    for rep in range(args.repeats):
        rates["model"].append(baseline_model_predict(inputs[n], run, batch))
        rates["naive"].append(baseline_naive_loop(inputs[n], run, os.path.join(workdir, f"naive-{rep}"), batch))
        if rep:
            summary, wall_rate, _, _ = run_predict(run, inputs[n], os.path.join(workdir, f"out-{n}-{rep}"), batch, gpus)
            rates["whole"].append(wall_rate)
            rates["steady"].append(summary["steady_images_per_s"] or wall_rate)
    best = {k: max(v) for k, v in rates.items()}
    show = lambda k: ", ".join(f"{r:.1f}" for r in rates[k])  # noqa: E731
    print(f"on {n} images (best of {args.repeats}; all runs in brackets), images/s:")
    print(f"  model.predict, uint8 images in memory:          {best['model']:8.1f}  [{show('model')}]")
    print(f"  naive loop (read/decode/predict/encode/write):  {best['naive']:8.1f}  [{show('naive')}]")
    print(f"  segray predict, steady state:                   {best['steady']:8.1f}  [{show('steady')}]")
    print(f"  segray predict, whole call (actor start-up in): {best['whole']:8.1f}  [{show('whole')}]")
    print(f"predict / model.predict: {best['steady'] / best['model']:.2f} steady state, {best['whole'] / best['model']:.2f} whole call (target >= 0.97)")
    print(f"predict / naive loop:    {best['steady'] / best['naive']:.2f} steady state, {best['whole'] / best['naive']:.2f} whole call (target >= 1.5)")
    if len(counts) > 1:
        small, big = counts[0], counts[-1]
        print(
            f"peak memory {big} vs {small} images: RSS {memory[big][0] / memory[small][0]:.2f}x, "
            f"PSS {memory[big][1] / memory[small][1]:.2f}x (target <= 1.2)"
        )
    tta_result = ""
    if args.tta != "none":
        summary, wall_rate, _, _ = run_predict(run, inputs[n], os.path.join(workdir, f"out-{n}-tta"), batch, gpus, tta=args.tta)
        tta_rate = summary["steady_images_per_s"] or wall_rate
        print(f"segray predict --tta {args.tta}, steady state: {tta_rate:.1f} images/s; {best['steady'] / tta_rate:.2f}x the time of plain predict")
        tta_result = f" tta={args.tta} tta_images_per_s={tta_rate:.1f} tta_cost={best['steady'] / tta_rate:.2f}"
    print(
        f"RESULT predict_images_per_s={best['steady']:.1f} model_predict_images_per_s={best['model']:.1f} naive_images_per_s={best['naive']:.1f} "
        f"ratio_model={best['steady'] / best['model']:.3f} ratio_naive={best['steady'] / best['naive']:.3f}{tta_result}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
