"""Speed against accuracy for each registered model: parameters, GFLOPs, latency, throughput, val mIoU.

For every model (default options unless given) at one input size:

- ``params``; ``gflops``: forward FLOPs per image counted from the Keras
  graph (``summary.model_flops``: 2 per multiply-add of every convolution and
  dense layer, plus bias adds; element-wise layers are left out);
- ``latency_p50_ms``, ``latency_p95_ms``: one image (batch 1) through the
  model compiled with ``tf.function``, on the CPU, after warm-up;
- ``throughput``: images per second at the best of ``batches``, with that ``best_batch``;
- with a dataset: ``val_miou`` (and ``val_dice``) of the model trained for the
  same fixed number of epochs with ``segray.train`` (one worker); on an
  instance dataset the instance models (``maskrcnn``, ``unet-instance``) are
  measured instead, with val mask ``val_ap50``, ``val_ap`` and ``val_pq``
  (panoptic quality) of their best epoch in place of mIoU;
- on a GPU (when TensorFlow sees one): the same latency and throughput in
  float32 and in float16 (``mixed_float16``), ``gpu_*`` and ``gpu_fp16_*``.

``write_report`` writes ``speed_accuracy.parquet`` and, when accuracy was
measured, ``speed_accuracy.png``: val mIoU (instance rows: val AP50) against
latency with the Pareto front (no other model both faster and more accurate) marked.

Each row names its ``task``. ``gflops`` is NaN for a model whose parts are
sub-models built for any input size (Mask R-CNN's FPN and heads), which the
graph count cannot size.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from segray import storage

TABLE_FILE = "speed_accuracy.parquet"
PLOT_FILE = "speed_accuracy.png"
BATCHES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p95_ms: float
    throughput: float
    best_batch: int


def _timed_calls(fn, x, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        [np.asarray(t) for t in _flat(fn(x))]  # waits for the result (every output of a several-output model)
        times.append(time.perf_counter() - t0)
    return times


def _flat(outputs) -> list:
    import tensorflow as tf

    return tf.nest.flatten(outputs)


def accuracy_column(frame: pd.DataFrame) -> str | None:
    """The accuracy the table ranks by: ``val_miou`` (semantic rows), ``val_ap50`` (instance rows), or None (speed only)."""
    return next((c for c in ("val_miou", "val_ap50") if c in frame), None)


def time_model(model, size: tuple[int, int], device: str, batches: Sequence[int] = BATCHES, repeats: int = 20, warmup: int = 3) -> Timing:
    """Latency of batch 1 (p50, p95 in ms) and the best throughput over ``batches`` on ``device``."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    with tf.device(device):
        fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        rates, latencies = {}, []
        for batch in batches:
            x = tf.constant(rng.standard_normal((batch, size[0], size[1], 3), dtype=np.float32))
            _timed_calls(fn, x, warmup)
            times = _timed_calls(fn, x, repeats if batch == 1 else max(3, repeats // batch))
            if batch == 1:
                latencies = times
            rates[batch] = batch / float(np.median(times))
    best = max(rates, key=rates.get)
    return Timing(1000 * float(np.percentile(latencies, 50)), 1000 * float(np.percentile(latencies, 95)), rates[best], best)


def gpu_available() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _timing_columns(prefix: str, t: Timing) -> dict[str, Any]:
    return {
        f"{prefix}latency_p50_ms": t.p50_ms,
        f"{prefix}latency_p95_ms": t.p95_ms,
        f"{prefix}throughput": t.throughput,
        f"{prefix}best_batch": t.best_batch,
    }


def measure_speed(
    name: str, size: tuple[int, int], num_classes: int, options: dict[str, Any] | None = None, repeats: int = 20
) -> dict[str, Any]:
    """One row of the table without accuracy: sizes, CPU timings, and GPU fp32/fp16 timings when there is a GPU."""
    import keras

    from segray.models import build, count_params, dtype_policy, model_flops, spec

    options = options or {}
    keras.mixed_precision.set_global_policy("float32")
    model = build(name, num_classes, (size[0], size[1], 3), **options)
    try:
        gflops = model_flops(model) / 1e9
    except ValueError:  # sub-models of any input size (Mask R-CNN's heads): no static shapes to count
        gflops = math.nan
    row: dict[str, Any] = {
        "model": name,
        "task": spec(name).task,
        "options": ", ".join(f"{k}={v}" for k, v in sorted(options.items())),
        "size": f"{size[0]}x{size[1]}",
        "params": int(count_params(model)),
        "gflops": gflops,
    }
    row.update(_timing_columns("", time_model(model, size, "/CPU:0", repeats=repeats)))
    if gpu_available():
        row.update(_timing_columns("gpu_", time_model(model, size, "/GPU:0", repeats=repeats)))
        with dtype_policy("mixed_float16"):
            half = build(name, num_classes, (size[0], size[1], 3), **options)
            half.set_weights(model.get_weights())
            row.update(_timing_columns("gpu_fp16_", time_model(half, size, "/GPU:0", repeats=repeats)))
    keras.backend.clear_session()
    return row


def measure_accuracy(name: str, data: str, size: tuple[int, int], epochs: int, options: dict[str, Any], work_dir: str, batch_size: int = 8) -> dict[str, Any]:
    """val mIoU and Dice of ``name`` trained for ``epochs`` epochs on ``data`` (one worker), and the seconds it took.

    An instance model (on an instance dataset): val mask AP50, AP and PQ of its best epoch (by AP50) instead.
    """
    from segray.api import train
    from segray.config import TrainConfig
    from segray.models import spec

    t0 = time.time()
    result = train(
        TrainConfig(
            data=data, storage=work_dir, name=name, model=name, epochs=epochs, workers=1, batch_size=batch_size,
            size=list(size), model_options=options,
        )
    )
    seconds = time.time() - t0
    if spec(name).task == "instance":
        return {**{f"val_{k}": float(result.best.get(f"val_{k}", math.nan)) for k in ("ap50", "ap", "pq")},
                "train_epochs": epochs, "train_seconds": seconds}
    return {"val_miou": float(result.best["val_miou"]), "val_dice": float(result.best["val_mean_dice"]),
            "train_epochs": epochs, "train_seconds": seconds}


def pareto_front(latency: Sequence[float], miou: Sequence[float]) -> list[bool]:
    """True where no other model is at least as fast and more accurate (or faster and as accurate)."""
    points = list(zip(latency, miou))
    front = []
    for i, (lat, acc) in enumerate(points):
        if not (math.isfinite(lat) and math.isfinite(acc)):
            front.append(False)
            continue
        dominated = any(
            j != i and math.isfinite(ol) and math.isfinite(oa) and ol <= lat and oa >= acc and (ol < lat or oa > acc)
            for j, (ol, oa) in enumerate(points)
        )
        front.append(not dominated)
    return front


def benchmark(
    names: Sequence[str],
    size: tuple[int, int] = (256, 256),
    num_classes: int = 2,
    data: str | None = None,
    epochs: int = 3,
    options: dict[str, dict[str, Any]] | None = None,
    repeats: int = 20,
    show_progress: bool = True,
) -> pd.DataFrame:
    """The speed/accuracy table, one row per model (see the module's description of the columns).

    Args:
        names: registered model names.
        size: ``(H, W)`` of the input (and of training, with ``data``).
        num_classes: output classes (the dataset's, with ``data``).
        data: an ingested dataset; None leaves ``val_miou`` out.
        epochs: the training budget per model, with ``data``.
        options: per model, builder options (default options otherwise).
    """
    import tempfile

    from segray.progress import progress

    options = options or {}
    if data is not None:
        from segray.data import load_dataset_info

        num_classes = load_dataset_info(data).num_classes
    rows = []
    with tempfile.TemporaryDirectory(prefix="segray-speed-") as work_dir:
        for name in progress(names, total=len(names), desc="models", enabled=show_progress):
            row = measure_speed(name, size, num_classes, options.get(name), repeats=repeats)
            if data is not None:
                row.update(measure_accuracy(name, data, size, epochs, options.get(name, {}), work_dir))
            rows.append(row)
    frame = pd.DataFrame(rows)
    accuracy = accuracy_column(frame)
    if accuracy is not None:
        frame["pareto"] = pareto_front(frame["latency_p50_ms"].tolist(), frame[accuracy].tolist())
    return frame


def plot(frame: pd.DataFrame) -> bytes:
    """val mIoU (instance models: val AP50) against CPU latency (batch 1, p50), the Pareto front joined and marked; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = accuracy_column(frame) or "val_miou"
    label = {"val_miou": "val mIoU", "val_ap50": "val mask AP50"}[accuracy]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(frame["latency_p50_ms"], frame[accuracy], s=40, color="tab:blue", zorder=3)
    front = frame[frame["pareto"]].sort_values("latency_p50_ms")
    ax.plot(front["latency_p50_ms"], front[accuracy], "-", color="tab:red", zorder=2, label="Pareto front")
    ax.scatter(front["latency_p50_ms"], front[accuracy], s=120, facecolors="none", edgecolors="tab:red", zorder=4)
    for row in frame.itertuples():
        flops = f"{row.gflops:.1f} GFLOPs" if math.isfinite(row.gflops) else "GFLOPs not counted"
        ax.annotate(f"{row.model}\n{flops}", (row.latency_p50_ms, getattr(row, accuracy)), textcoords="offset points", xytext=(6, 4), fontsize=8)
    size = frame["size"].iloc[0] if len(frame) else ""
    ax.set(title=f"{label} against CPU latency ({size}, batch 1)", xlabel="latency per image, p50 (ms)", ylabel=label)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(frame: pd.DataFrame, output: str) -> list[str]:
    """Writes ``OUTPUT/speed_accuracy.parquet`` and, with val mIoU or AP50, ``OUTPUT/speed_accuracy.png``; returns their URIs."""
    import pyarrow as pa

    written = [storage.join(output, TABLE_FILE)]
    storage.write_parquet(pa.Table.from_pandas(frame, preserve_index=False), written[0])
    if accuracy_column(frame) is not None:
        written.append(storage.join(output, PLOT_FILE))
        storage.write_bytes(written[1], plot(frame))
    return written


def format_table(frame: pd.DataFrame) -> str:
    columns = [c for c in frame.columns if c not in ("options", "size")]
    return frame[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}")
