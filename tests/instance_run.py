"""A tiny trained Mask R-CNN and its predict output, shared by the instance output tests (evaluate, report, export).

synth (64x64, 3 classes) -> ingest --task instance -> a few steps of the training
loop's instance step (no Ray Train: seconds) saved as a run's model/ -> predict on val.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq

from segray.cli import main as cli_main


def split_rows(data: str, split: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{id: (image, instance map, classes)} of an ingested instance split."""
    from segray.data import decode_image, decode_instances

    rows = {}
    for name in sorted(os.listdir(os.path.join(data, split))):
        table = pq.read_table(os.path.join(data, split, name), columns=["image_id", "image", "instances", "classes"])
        for r in table.to_pylist():
            rows[r["image_id"]] = (decode_image(r["image"]), decode_instances(r["instances"]), np.asarray(r["classes"], np.int64))
    return rows


def train_steps(data: str, run: str, steps: int = 8) -> None:
    """A few Mask R-CNN steps on the train split, saved as a run's model/ (tiny options, 64x64)."""
    import tensorflow as tf

    from segray import models
    from segray.config import TrainConfig
    from segray.data.info import load_dataset_info
    from segray.runs import write_model
    from segray.training.loop import WorkerLoop, preprocessing_of

    info = load_dataset_info(data)
    cfg = TrainConfig(
        data=data, storage="none", name="t", model="maskrcnn", batch_size=1, lr=3e-3, schedule="constant", workers=1,
        optimizer="adam", size=(64, 64), model_options=dict(models.spec("maskrcnn").tiny_options),
    )
    loop = WorkerLoop(cfg, info, world_size=1)
    batches = []
    for image, ids, classes in split_rows(data, "train").values():
        padded = np.zeros((1, max(8, len(classes))), np.int32)
        padded[0, : len(classes)] = classes
        batches.append((tf.constant(image[None]), tf.constant(ids.astype(np.int32)[None]), tf.constant(padded)))
    for step in range(steps):
        loop.train_step(*batches[step % len(batches)])
    write_model(run, loop.net, preprocessing_of(cfg, info), {"steps": steps})


def instance_run(root, n: int = 6) -> SimpleNamespace:
    """synth -> ingest -> train_steps -> predict (val) under ``root``; needs a running Ray."""
    from segray.api import predict

    raw, data, out, run = str(root / "raw"), str(root / "data"), str(root / "out"), str(root / "run")
    assert cli_main(["synth", raw, "--task", "instance", "--n", str(n), "--size", "64", "--classes", "3"]) == 0
    assert cli_main(["ingest", raw, data, "--task", "instance", "--val-fraction", "0.5"]) == 0
    train_steps(data, run)
    cfg = {"model": run, "input": data, "split": "val", "output": out, "batch_size": 2}
    result = predict(cfg)
    assert result.errors == [], result.errors
    return SimpleNamespace(root=root, raw=raw, data=data, out=out, run=run, cfg=cfg, result=result)
