"""``segray demo``: the whole pipeline on a local Ray with a local folder as storage, through the Python API."""

from __future__ import annotations

import os
import time

from segray import storage
from segray.config import about
from segray.ownership import claim_folder, clear_owned, write_marker


def run_demo(workdir: str, n: int = 96, size: tuple[int, int] = (64, 64), epochs: int = 8, overwrite: bool = True) -> dict[str, str]:
    """Synthesises shapes, ingests, trains a U-Net on 2 workers, predicts the val split; prints where each step wrote.

    ``workdir`` must be empty, new, or a folder an earlier demo made (with
    ``overwrite``, only the files that demo wrote are deleted).

    Returns:
        The URIs of what the demo wrote, by step.
    """
    import segray
    from segray.data import synthesize
    from segray.runtime import init_ray

    workdir = os.path.abspath(workdir)
    if storage.list_files(workdir, limit=1):
        if not overwrite:
            raise about("dir", FileExistsError(f"dir {workdir} already holds files; choose an empty or new folder"))
        # Only what an earlier demo wrote there (its _segray.json lists it); anything else is refused.
        clear_owned(workdir, "demo", "dir")
    claim_folder(workdir, "demo", "dir", patterns=[r"(raw|dataset|runs|predictions)/.*"])
    raw, data, runs = (storage.join(workdir, x) for x in ("raw", "dataset", "runs"))
    steps = 4
    t0 = time.time()
    print(f"[1/{steps}] synthesising {n} pairs of {size[0]}x{size[1]} shapes into {raw}")
    synthesize(raw, n=n, size=size, num_classes=4, seed=0)
    # Logical CPUs above a 2-core machine's count: 2 train workers plus the data pipeline.
    init_ray(num_cpus=max(4, os.cpu_count() or 1))
    print(f"[2/{steps}] ingesting {raw} -> {data}")
    ingested = segray.ingest(segray.IngestConfig(source=raw, destination=data, val_fraction=0.2), command=f"segray demo --dir {workdir}")
    print(ingested.info.describe(data))

    print(f"[3/{steps}] training a U-Net for {epochs} epochs on 2 Ray Train workers -> {runs}/unet")
    cfg = segray.TrainConfig(
        data=data, storage=runs, name="unet", model="unet", epochs=epochs, batch_size=4, workers=2, lr=0.01,
        schedule="constant", model_options={"depth": 3, "width": 8},
    )
    trained = segray.train(cfg)
    cols = ["epoch", "train_loss", "val_loss", "val_miou", "seconds"]
    print(trained.history[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"  best val mIoU {trained.best['val_miou']:.3f}; model, history.parquet and curves.png in {trained.run_uri}")

    predictions = storage.join(workdir, "predictions")
    print(f"[4/{steps}] predicting the val split with the best model -> {predictions}")
    predicted = segray.predict(segray.PredictConfig(model=trained.run_uri, input=data, split="val", output=predictions, overlays=8))
    print(predicted.describe())
    write_marker(workdir, "demo")
    print(f"demo done in {time.time() - t0:.0f} s; everything is under {workdir}")
    return {"raw": raw, "dataset": data, "run": trained.run_uri, "predictions": predictions}
