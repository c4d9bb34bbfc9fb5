"""Fault injection: the real jobs against a faulty S3 endpoint, drivers killed mid-run, a full disk.

The moto server sits behind ``FaultProxy``, which on a seeded schedule
answers 5% of requests with a 500, a 503 SlowDown or a reset connection, or
stalls the answer half-way. Ingest, train (its checkpoint uploads) and
predict run as drivers of their own (subprocesses joined to the module's
Ray, their workers pointed at the proxy by the job's runtime_env) and must
give what a clean run gives: identical tables, no partial object, every
fault class met. Then the store does what it is asked and the answer is
lost (reset, cut half-way, or held past the client's timeout): claims keep
exactly one winner and predict still equals a clean run. Ingest and train
drivers are killed (SIGKILL) mid-run and run again; predict's whole process
group (its own Ray and workers) too. Predict fills a small tmpfs and fails
with one line; the rerun after space is freed completes.

Every test adds its requests, faults and rows lost to one tally, printed at
the end of the module (``pytest -s``) and written to ``fault-suite.json`` in
pytest's base temporary folder.
"""

from __future__ import annotations

import contextlib
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
from tests.fault_proxy import FAULTS, FaultProxy, conditional_put
from tests.inference.helpers import write_raw, write_run
from tests.test_safety import _claims, race

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


class Tally:
    """The suite's counts: requests through the proxies, faults injected by kind, rows lost."""

    def __init__(self):
        self.requests, self.faults, self.rows_lost, self.tests = 0, {}, 0, []

    def add(self, test: str, proxy: FaultProxy | None = None, rows_lost: int = 0) -> None:
        if proxy is not None:
            self.requests += proxy.requests
            for kind, n in proxy.counts.items():
                self.faults[kind] = self.faults.get(kind, 0) + n
        self.rows_lost += rows_lost
        self.tests.append(test)

    def line(self) -> str:
        kinds = " ".join(f"{k}={v}" for k, v in sorted(self.faults.items()))
        return f"{len(self.tests)} tests, {self.requests} requests, {sum(self.faults.values())} faults ({kinds}), rows lost: {self.rows_lost}"


@pytest.fixture(scope="module")
def tally(tmp_path_factory):
    counts = Tally()
    yield counts
    print(f"\nfault suite: {counts.line()}")
    report = tmp_path_factory.getbasetemp() / "fault-suite.json"
    report.write_text(json.dumps({"tests": counts.tests, "requests": counts.requests, "faults": counts.faults, "rows_lost": counts.rows_lost}, indent=1))


def rows_lost(got: pd.DataFrame, want: pd.DataFrame, key: str = "image_id") -> int:
    """Rows of the clean run whose key the faulty run lacks."""
    return len(set(want[key]) - set(got[key]))


@pytest.fixture(scope="module")
def faulty(s3):
    proxy = FaultProxy(s3.endpoint, rate=0.05, seed=13, stall_s=1.0)
    yield proxy
    proxy.close()


def test_jobs_through_a_faulty_endpoint_equal_a_clean_run(s3, faulty, ray_cluster, tmp_path, tally):
    bucket = s3.bucket("faults")
    synthesize(str(tmp_path / "raw"), n=40, size=(32, 32), num_classes=3, seed=5, show_progress=False)
    raw = upload_raw(s3, str(tmp_path / "raw"), bucket)

    # Ingest: once through the faults, once clean (this process, straight to moto).
    faulty.enabled = True
    run_driver(ray_cluster, "ingest", IngestConfig(source=raw, destination=f"{bucket}/ds", val_fraction=0.25), faulty.endpoint, tmp_path / "ingest.log")
    clean = ingest(IngestConfig(source=raw, destination=f"{bucket}/clean-ds", val_fraction=0.25))
    assert storage.read_parquet(f"{bucket}/ds/_errors.parquet").to_pylist() == clean.errors == []
    got, want = shard_rows(f"{bucket}/ds"), shard_rows(f"{bucket}/clean-ds")
    lost = sum(rows_lost(got[split], want[split]) for split in ("train", "val"))
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
    lost += assert_tables_equal(f"{bucket}/pred", f"{bucket}/clean-pred")
    masks = [f.uri for f in storage.list_files(f"{bucket}/pred/masks")]
    assert len(masks) == reference.summary["images"] == clean.info.splits["val"]
    for uri in masks:
        assert storage.read_bytes(uri) == storage.read_bytes(uri.replace("/pred/", "/clean-pred/")), uri

    objects = assert_no_partial_objects(s3, bucket)
    print(f"\njobs through 5% faults: {faulty.summary()}; {objects} objects, all whole; rows lost: {lost}")
    tally.add("jobs", faulty, lost)
    assert lost == 0
    assert faulty.requests > 200
    for kind in FAULTS:
        assert faulty.counts[kind] > 0, faulty.summary()


def assert_tables_equal(out: str, reference: str) -> int:
    """Asserts predict's tables in ``out`` equal ``reference``'s; returns the per-image rows ``out`` lacks."""
    lost = 0
    for name in TABLES:
        a = storage.read_parquet(storage.join(out, name)).to_pandas()
        b = storage.read_parquet(storage.join(reference, name)).to_pandas()
        if name == "per_image.parquet":
            lost = len(set(zip(b["image_id"], b["class_id"])) - set(zip(a["image_id"], a["class_id"])))
        pd.testing.assert_frame_equal(a, b, obj=name)
    return lost


# (fault, claim kinds): the identical markers of racing ingests are where a byte
# comparison could not tell a racer's own lost PUT from another's.
LOST_ANSWERS = [("lost", "predict"), ("lost", "ingest"), ("lost", "train"), ("truncated", "ingest"), ("timeout", "ingest")]


@pytest.mark.parametrize(("fault", "kind"), LOST_ANSWERS)
def test_a_claim_whose_answer_is_lost_still_has_one_winner(s3, monkeypatch, tally, fault, kind):
    """The store takes the conditional PUT, then the answer is reset, cut, or held past the client's timeout."""
    proxy = FaultProxy(s3.endpoint, rate=0.0, kinds=(fault,), timeout_s=3 * storage.TIMEOUT_S)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    root = f"{s3.bucket('claims')}/{kind}"
    try:
        started = time.time()
        # Alone: the retry finds the object its own lost try created, and wins.
        proxy.force(fault, 1, conditional_put)
        assert race(_claims(kind, storage.join(root, "alone")), threads=1) == 1, proxy.summary()
        # Four at once, every first answer lost: one winner still.
        for trial in range(3 if fault == "lost" else 1):
            proxy.force(fault, 4, conditional_put)
            assert race(_claims(kind, storage.join(root, f"race-{trial}")), threads=4) == 1, proxy.summary()
        elapsed = time.time() - started
    finally:
        proxy.close()
    tally.add(f"claim {kind} {fault}", proxy)
    assert proxy.counts[fault] > 0, proxy.summary()
    if fault == "timeout":
        # The client gives up after TIMEOUT_S and retries (boto3's default would wait 60 s, twice).
        assert elapsed < 8 * storage.TIMEOUT_S, elapsed


LOST_KINDS = ("lost", "truncated", "timeout")


def test_predict_through_lost_cut_and_held_answers_equals_a_clean_run(s3, ray_cluster, tmp_path, tally):
    """Model, images and OUT on S3; the store does each request but 10% of answers are lost, cut or held past the timeout."""
    bucket = s3.bucket("lost")
    write_raw(f"{bucket}/raw", {f"img_{i:02d}": (24 + 8 * (i % 3), 32) for i in range(16)}, seed=3)
    write_run(f"{bucket}/run", [32, 32])
    cfg = PredictConfig(model=f"{bucket}/run", input=f"{bucket}/raw", output=f"{bucket}/pred", batch_size=4, overlays=2)
    proxy = FaultProxy(s3.endpoint, rate=0.1, seed=4, kinds=LOST_KINDS, timeout_s=storage.TIMEOUT_S + 1)
    try:
        run_driver(ray_cluster, "predict", cfg, proxy.endpoint, tmp_path / "predict.log")
    finally:
        proxy.close()
    reference = predict(PredictConfig.from_dict({**cfg.to_dict(), "output": f"{bucket}/clean"}))
    lost = assert_tables_equal(f"{bucket}/pred", f"{bucket}/clean")
    masks = [f.uri for f in storage.list_files(f"{bucket}/pred/masks")]
    assert len(masks) == reference.summary["images"] == 16
    for uri in masks:
        assert storage.read_bytes(uri) == storage.read_bytes(uri.replace("/pred/", "/clean/")), uri
    objects = assert_no_partial_objects(s3, bucket)
    print(f"\npredict through lost answers: {proxy.summary()}; {objects} objects, all whole; rows lost: {lost}")
    tally.add("predict lost answers", proxy, lost)
    assert lost == 0
    for kind in LOST_KINDS:
        assert proxy.counts[kind] > 0, proxy.summary()


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
    from segray.runs import read_history, run_state

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


LOCAL_PREDICT = """
import json, sys
import ray
import segray
from segray.config import PredictConfig
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
segray.predict(PredictConfig.from_dict(json.loads(sys.argv[1])))
print("DONE predict", flush=True)
"""


def session_groups(sid: int) -> set[int]:
    """The process groups of every live process in session ``sid`` (Ray gives each worker its own group)."""
    groups = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    groups.add(os.getpgid(int(name)))
            except (ProcessLookupError, PermissionError):
                pass
    return groups


def test_predict_killed_by_process_group_then_rerun_equals_an_uninterrupted_one(ray_cluster, tmp_path, tally):
    """A driver with its own Ray: driver, GCS, raylet and every worker SIGKILLed at once; the rerun finishes the job."""
    raw, out, ref = str(tmp_path / "raw"), str(tmp_path / "out"), str(tmp_path / "ref")
    n = 48  # enough that the kill lands part-way even when a busy machine hands the writer several batches at once
    write_raw(raw, {f"img_{i:02d}": (32, 24 + 8 * (i % 3)) for i in range(n)}, seed=6)
    cfg = PredictConfig(model=write_run(str(tmp_path / "run"), [32, 32]), input=raw, output=out, batch_size=2, overlays=2)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", LOCAL_PREDICT, json.dumps(cfg.to_dict())], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    masks = os.path.join(out, "masks")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (os.path.isdir(masks) and len(os.listdir(masks)) >= 4):
        time.sleep(0.02)
    groups = session_groups(proc.pid)
    assert proc.poll() is None, f"the driver ended before it could be killed:\n{open(tmp_path / 'driver.log').read()[-3000:]}"
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    proc.wait()
    gone = time.time() + 30
    while session_groups(proc.pid) and time.time() < gone:
        time.sleep(0.1)
    assert session_groups(proc.pid) == set(), "processes of the killed driver's session are still alive"
    assert len(groups) >= 3, groups  # the driver's group (driver, GCS, raylet) and the workers' own
    at_kill = len([n for n in os.listdir(masks) if n.endswith(".png")])
    # Killed before the job ended: its tables and summary are not written, whatever number of masks got out.
    assert 4 <= at_kill <= n and not os.path.exists(os.path.join(out, "summary.json")), at_kill

    result = predict(cfg)
    reference = predict(PredictConfig.from_dict({**cfg.to_dict(), "output": ref}))
    assert result.summary["images_this_run"] <= n - at_kill + 2 and reference.summary["images"] == n
    lost = assert_tables_equal(out, ref)
    assert sorted(os.listdir(masks)) == sorted(os.listdir(os.path.join(ref, "masks")))
    for name in os.listdir(masks):
        assert open(os.path.join(masks, name), "rb").read() == open(os.path.join(ref, "masks", name), "rb").read(), name
    assert [f.uri for f in storage.list_files(out) if ".tmp-" in f.uri] == []
    print(f"\npredict killed by process group: {len(groups)} process groups killed at {at_kill} masks of {n}; rows lost: {lost}")
    tally.add("predict killed by process group", rows_lost=lost)
    assert lost == 0


@contextlib.contextmanager
def small_disk(path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (root only): a disk that fills up; unmounted on exit."""
    os.makedirs(path, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path} (needs root): {made.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def assert_every_file_whole(folder: str) -> list[str]:
    """Every file under ``folder`` reads back whole (PNG, Parquet, JSON); no temporary name is left."""
    files = [f.uri for f in storage.list_files(folder)]
    assert [f for f in files if ".tmp-" in f] == []
    for uri in files:
        if uri.endswith(".png"):
            assert cv2.imread(uri, cv2.IMREAD_UNCHANGED) is not None, uri
        elif uri.endswith(".parquet"):
            pq.read_table(uri)
        elif uri.endswith(".json"):
            json.loads(open(uri).read())
    return files


def test_predict_on_a_full_disk_fails_with_one_line_and_the_rerun_completes(ray_cluster, tmp_path, tally):
    """OUT on a 96 KiB tmpfs: predict stops with one line naming the file; after the disk grows, the same command finishes."""
    raw, ref, disk = str(tmp_path / "raw"), str(tmp_path / "ref"), tmp_path / "disk"
    write_raw(raw, {f"img_{i:02d}": (32, 32) for i in range(24)}, seed=7)
    run = write_run(str(tmp_path / "run"), [32, 32])
    out = str(disk / "out")
    argv = [sys.executable, "-m", "segray.cli", "predict", "--model", run, "--input", raw, "--output", out, "--batch-size", "4", "--overlays", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    with small_disk(disk, "96k"):
        full = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        errors = [line for line in full.stderr.splitlines() if line.startswith("segray predict: error:")]
        assert full.returncode == 1, full.stderr[-3000:]
        assert len(errors) == 1 and "No space left on device writing " + out in errors[0], full.stderr[-3000:]
        assert "Traceback" not in full.stderr, full.stderr[-3000:]
        left = assert_every_file_whole(out)
        assert not os.path.exists(os.path.join(out, "summary.json")), left
        # Space is freed: the same command resumes and completes.
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        predict(PredictConfig(model=run, input=raw, output=ref, batch_size=4, overlays=2))
        lost = assert_tables_equal(out, ref)
        assert sorted(os.listdir(os.path.join(out, "masks"))) == sorted(os.listdir(os.path.join(ref, "masks")))
        assert_every_file_whole(out)
    print(f"\npredict on a full disk: {errors[0]}; {len(left)} whole files left, rerun complete; rows lost: {lost}")
    tally.add("predict on a full disk", rows_lost=lost)
    assert lost == 0
