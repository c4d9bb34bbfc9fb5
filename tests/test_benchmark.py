"""The speed/accuracy report: columns measured for a real model, the Pareto front, the files written."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from segray import benchmark as bench
from segray import storage
from segray.models import flops_per_image
from segray.models.registry import TINY_OPTIONS


def test_pareto_front_keeps_the_models_no_other_beats_on_both():
    # latency (ms), mIoU: a fast weak, a slow strong, one dominated by both ends, one unmeasured.
    latency = [10.0, 50.0, 60.0, 30.0, math.nan]
    miou = [0.50, 0.80, 0.70, 0.45, 0.9]
    assert bench.pareto_front(latency, miou) == [True, True, False, False, False]
    assert bench.pareto_front([5.0, 5.0], [0.6, 0.6]) == [True, True]  # ties dominate neither


def test_speed_row_of_a_real_model_and_the_table_file(tmp_path):
    frame = bench.benchmark(["unet"], size=(32, 32), num_classes=3, options={"unet": TINY_OPTIONS["unet"]}, repeats=5, show_progress=False)
    row = frame.iloc[0]
    assert row["model"] == "unet" and row["size"] == "32x32"
    assert row["gflops"] == pytest.approx(flops_per_image("unet", (32, 32), 3, **TINY_OPTIONS["unet"]) / 1e9)
    assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
    assert row["throughput"] > 0 and row["best_batch"] in bench.BATCHES
    assert "val_miou" not in frame  # no dataset: no accuracy, no plot
    written = bench.write_report(frame, str(tmp_path))
    assert written == [storage.join(str(tmp_path), bench.TABLE_FILE)]
    pd.testing.assert_frame_equal(storage.read_parquet(written[0]).to_pandas(), frame)


def test_the_plot_marks_the_front(tmp_path):
    frame = pd.DataFrame({"model": ["a", "b", "c"], "size": ["32x32"] * 3, "gflops": [1.0, 2.0, 3.0],
                          "latency_p50_ms": [10.0, 20.0, 30.0], "val_miou": [0.5, 0.4, 0.7]})
    frame["pareto"] = bench.pareto_front(frame["latency_p50_ms"].tolist(), frame["val_miou"].tolist())
    assert frame["pareto"].tolist() == [True, False, True]
    written = bench.write_report(frame, str(tmp_path))
    assert storage.read_bytes(written[1]).startswith(b"\x89PNG")


@pytest.mark.slow
def test_instance_models_rows_on_instance_data(tmp_path, ray_cluster):
    """Both instance models in the table, trained on the same tiny instance dataset: AP50/AP/PQ columns, no mIoU."""
    from segray.cli import main as cli_main
    from segray.models import spec

    raw, data = str(tmp_path / "raw"), str(tmp_path / "data")
    assert cli_main(["synth", raw, "--task", "instance", "--n", "12", "--size", "64", "--classes", "2"]) == 0
    assert cli_main(["ingest", raw, data, "--task", "instance", "--val-fraction", "0.25"]) == 0
    names = ["maskrcnn", "unet-instance"]
    frame = bench.benchmark(names, size=(64, 64), data=data, epochs=1, options={n: dict(spec(n).tiny_options) for n in names},
                            repeats=3, show_progress=False)
    assert frame["model"].tolist() == names and set(frame["task"]) == {"instance"}
    assert "val_miou" not in frame
    for column in ("val_ap50", "val_ap", "val_pq"):
        assert frame[column].between(0, 1).all(), frame[column]
    assert (frame["latency_p50_ms"] > 0).all() and (frame["throughput"] > 0).all() and (frame["train_seconds"] > 0).all()
    assert math.isnan(frame.loc[0, "gflops"]) and frame.loc[1, "gflops"] > 0  # Mask R-CNN's heads have no static shapes to count
    assert frame["pareto"].any()
    written = bench.write_report(frame, str(tmp_path / "report"))
    assert storage.read_bytes(written[1]).startswith(b"\x89PNG")
