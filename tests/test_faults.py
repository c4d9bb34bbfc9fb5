"""Fault injection: the real jobs against a faulty S3 endpoint, and drivers killed mid-run.

The moto server sits behind ``FaultProxy``, which on a seeded schedule
answers 5% of requests with a 500, a 503 SlowDown or a reset connection, or
stalls the answer half-way. Ingest, train (its checkpoint uploads) and
predict run as drivers of their own (subprocesses joined to the module's
Ray, their workers pointed at the proxy by the job's runtime_env) and must
give what a clean run gives: identical tables, no partial object, every
fault class met. Then ingest and train drivers are killed (SIGKILL) mid-run
and run again.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from segray import storage
from segray.config import IngestConfig, PredictConfig
from segray.data import ingest, synthesize
from segray.inference import predict
from tests.fault_proxy import FAULTS, FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

TINY_UNET = {"depth": 2, "width": 8}
TABLES = ("per_image.parquet", "per_class.parquet", "confusion.parquet", "_errors.parquet")

DRIVER = """
import json, os, sys
import ray
import segray
from segray.config import IngestConfig, PredictConfig, TrainConfig
address, kind, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
env = {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}
ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env})
config = {"ingest": IngestConfig, "train": TrainConfig, "predict": PredictConfig}[kind].from_dict(cfg)
result = getattr(segray, kind)(config)
print("DONE", kind, flush=True)
"""


def run_driver(ray_cluster, kind: str, cfg, endpoint: str, log_path, wait: bool = True):
    """Runs ``segray.<kind>(cfg)`` in a driver process whose storage calls go to ``endpoint``."""
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, address, kind, json.dumps(cfg.to_dict())], stdout=log, stderr=subprocess.STDOUT, env=env)
    if not wait:
        return proc
    code = proc.wait(timeout=600)
    log.close()
    text = open(log_path).read()
    assert code == 0 and f"DONE {kind}" in text, f"{kind} driver failed ({code}):\n{text[-4000:]}"
    return proc


def upload_raw(s3, local: str, bucket: str) -> str:
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            s3.client.upload_file(path, bucket[len("s3://"):], "raw/" + os.path.relpath(path, local))
    return f"{bucket}/raw"


def shard_rows(dataset: str) -> dict[str, pd.DataFrame]:
    out = {}
    for split in ("train", "val"):
        files = [f.uri for f in storage.list_files(storage.join(dataset, split))]
        frame = pd.concat([storage.read_parquet(f).to_pandas() for f in files]) if files else pd.DataFrame()
        out[split] = frame[["image_id", "image", "mask", "height", "width"]].sort_values("image_id").reset_index(drop=True)
    return out


def assert_no_partial_objects(s3, bucket: str) -> int:
    """Every object in the bucket is whole: no temporary names; Parquet, JSON and PNG all read back."""
    keys = s3.keys(bucket)
    assert not [k for k in keys if ".tmp-" in k], [k for k in keys if ".tmp-" in k]
    name = bucket[len("s3://"):]
    for key in keys:
        body = s3.client.get_object(Bucket=name, Key=key)["Body"].read()
        if key.endswith(".parquet"):
            pq.read_table(io.BytesIO(body))
        elif key.endswith(".json"):
            json.loads(body)
        elif key.endswith(".png"):
            assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED) is not None, key
    return len(keys)


@pytest.fixture(scope="module")
def faulty(s3):
    proxy = FaultProxy(s3.endpoint, rate=0.05, seed=13, stall_s=1.0)
    yield proxy
    proxy.close()


def test_jobs_through_a_faulty_endpoint_equal_a_clean_run(s3, faulty, ray_cluster, tmp_path):
    bucket = s3.bucket("faults")
    synthesize(str(tmp_path / "raw"), n=40, size=(32, 32), num_classes=3, seed=5, show_progress=False)
    raw = upload_raw(s3, str(tmp_path / "raw"), bucket)

    # Ingest: once through the faults, once clean (this process, straight to moto).
    faulty.enabled = True
    run_driver(ray_cluster, "ingest", IngestConfig(source=raw, destination=f"{bucket}/ds", val_fraction=0.25), faulty.endpoint, tmp_path / "ingest.log")
    clean = ingest(IngestConfig(source=raw, destination=f"{bucket}/clean-ds", val_fraction=0.25))
    assert storage.read_parquet(f"{bucket}/ds/_errors.parquet").to_pylist() == clean.errors == []
    got, want = shard_rows(f"{bucket}/ds"), shard_rows(f"{bucket}/clean-ds")
    for split in ("train", "val"):
        pd.testing.assert_frame_equal(got[split], want[split], obj=split)
    info = json.loads(storage.read_text(f"{bucket}/ds/dataset.json"))
    assert info["pixel_counts"] == clean.info.pixel_counts and info["splits"] == clean.info.splits
    np.testing.assert_allclose(info["mean"], clean.info.mean, rtol=1e-12)

    # Train: every checkpoint and export uploaded through the faults.
    from segray.config import TrainConfig

    train_cfg = TrainConfig(
        data=f"{bucket}/ds", storage=f"{bucket}/runs", name="faulty", model="unet", epochs=2, batch_size=8,
        workers=1, lr=0.01, schedule="constant", model_options=TINY_UNET,
    )
    run_driver(ray_cluster, "train", train_cfg, faulty.endpoint, tmp_path / "train.log")
    history = storage.read_parquet(f"{bucket}/runs/faulty/history.parquet").to_pandas()
    assert list(history["epoch"]) == [0, 1]
    assert storage.exists(f"{bucket}/runs/faulty/model/model.keras")

    # Predict with that model: through the faults and clean, tables and masks identical.
    cfg = PredictConfig(model=f"{bucket}/runs/faulty", input=f"{bucket}/ds", split="val", output=f"{bucket}/pred", batch_size=4, overlays=2)
    run_driver(ray_cluster, "predict", cfg, faulty.endpoint, tmp_path / "predict.log")
    faulty.enabled = False
    reference = predict(PredictConfig.from_dict({**cfg.to_dict(), "output": f"{bucket}/clean-pred"}))
    for name in TABLES:
        a = storage.read_parquet(f"{bucket}/pred/{name}").to_pandas()
        b = storage.read_parquet(f"{bucket}/clean-pred/{name}").to_pandas()
        pd.testing.assert_frame_equal(a, b, obj=name)
    masks = [f.uri for f in storage.list_files(f"{bucket}/pred/masks")]
    assert len(masks) == reference.summary["images"] == clean.info.splits["val"]
    for uri in masks:
        assert storage.read_bytes(uri) == storage.read_bytes(uri.replace("/pred/", "/clean-pred/")), uri

    objects = assert_no_partial_objects(s3, bucket)
    print(f"fault suite: {faulty.summary()}; {objects} objects, all whole; rows lost: 0")
    assert faulty.requests > 200
    for kind in FAULTS:
        assert faulty.counts[kind] > 0, faulty.summary()


def _kill_when(proc, ready, timeout: float = 300) -> bool:
    """SIGKILLs ``proc`` once ``ready()`` is true; False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    finished = proc.poll() is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return not finished


def test_ingest_killed_then_rerun_equals_an_uninterrupted_one(ray_cluster, s3, tmp_path):
    raw, dst, ref = str(tmp_path / "raw"), str(tmp_path / "ds"), str(tmp_path / "ref")
    synthesize(raw, n=80, size=(48, 48), num_classes=3, seed=8, show_progress=False)
    cfg = IngestConfig(source=raw, destination=dst, val_fraction=0.25, shard_mb=0.02)
    proc = run_driver(ray_cluster, "ingest", cfg, s3.endpoint, tmp_path / "ingest.log", wait=False)

    def some_shards() -> bool:
        return os.path.isdir(os.path.join(dst, "train")) and len(os.listdir(os.path.join(dst, "train"))) >= 2

    assert _kill_when(proc, some_shards), open(tmp_path / "ingest.log").read()[-3000:]
    assert not os.path.exists(os.path.join(dst, "dataset.json"))
    # The same command with overwrite replaces what the killed run left (its files only).
    again = ingest(IngestConfig.from_dict({**cfg.to_dict(), "overwrite": True}))
    want = ingest(IngestConfig.from_dict({**cfg.to_dict(), "destination": ref}))
    got_rows, want_rows = shard_rows(dst), shard_rows(ref)
    for split in ("train", "val"):
        pd.testing.assert_frame_equal(got_rows[split], want_rows[split], obj=split)
    assert again.info.pixel_counts == want.info.pixel_counts and again.info.splits == want.info.splits
    leftovers = [n for split in ("train", "val") for n in os.listdir(os.path.join(dst, split)) if again.info.extra["run_id"] not in n]
    assert leftovers == []


def test_train_killed_then_resumed_finishes_the_run(ray_cluster, s3, tmp_path):
    from segray import export_model
    from segray.config import ExportConfig, TrainConfig
    from segray.training.artifacts import read_history, run_state

    raw, ds = str(tmp_path / "raw"), str(tmp_path / "ds")
    synthesize(raw, n=48, size=(32, 32), num_classes=3, seed=9, show_progress=False)
    ingest(IngestConfig(source=raw, destination=ds, val_fraction=0.25))
    cfg = TrainConfig(
        data=ds, storage=str(tmp_path / "runs"), name="killed", model="unet", epochs=3, batch_size=8,
        workers=1, lr=0.01, schedule="constant", model_options=TINY_UNET,
    )
    run = os.path.join(str(tmp_path / "runs"), "killed")
    proc = run_driver(ray_cluster, "train", cfg, s3.endpoint, tmp_path / "train.log", wait=False)

    def a_checkpoint() -> bool:
        return os.path.isdir(run) and any(n.startswith("checkpoint") for n in os.listdir(run))

    assert _kill_when(proc, a_checkpoint), open(tmp_path / "train.log").read()[-3000:]
    time.sleep(3)  # the dead driver's Train workers are stopped by Ray
    # Killed: no record of an end, so export refuses the run (its model is an early epoch's).
    killed = run_state(run)
    assert killed.stopped is None and not killed.finished and killed.epochs == 3 and killed.epochs_done < 3
    with pytest.raises(ValueError, match=r"is unfinished: \d of 3 epochs done; no record of its end"):
        export_model(ExportConfig(run=run, output=str(tmp_path / "exported")))
    result = run_driver(ray_cluster, "train", TrainConfig.from_dict({**cfg.to_dict(), "resume": True}), s3.endpoint, tmp_path / "resume.log")
    assert result.returncode == 0
    history = read_history(run)
    assert list(history["epoch"]) == [0, 1, 2], history
    assert run_state(run).stopped == "epochs" and run_state(run).finished
    assert os.path.exists(os.path.join(run, "model", "model.keras"))
