"""Ray Train: learning on 2 CPU workers, S3 storage, resume, a killed worker, summed metrics, bad flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from segray import storage
from segray.cli import main as cli_main
from segray.config import ConfigError, IngestConfig, TrainConfig
from segray.data import ingest, read_split, synthesize
from segray.training import resolve, train

TINY_UNET = {"depth": 2, "width": 8}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("shapes")
    synthesize(str(root / "raw"), n=160, size=(32, 32), num_classes=4, seed=0, show_progress=False)
    return ingest(IngestConfig(source=str(root / "raw"), destination=str(root / "ds"), val_fraction=0.25))


def config(data: str, storage_uri: str, name: str, **overrides) -> TrainConfig:
    base = dict(
        data=data,
        storage=storage_uri,
        name=name,
        model="unet",
        epochs=4,
        batch_size=8,
        workers=2,
        lr=0.01,
        schedule="constant",
        model_options=TINY_UNET,
    )
    return TrainConfig(**{**base, **overrides})


def check_run_artifacts(run_uri: str, epochs: int) -> None:
    import keras

    import segray.models  # noqa: F401  (registers the custom layers)

    history = storage.read_parquet(storage.join(run_uri, "history.parquet")).to_pandas()
    assert list(history["epoch"]) == list(range(epochs))
    for column in ("train_loss", "val_loss", "val_pixel_accuracy", "val_miou", "val_mean_dice", "val_iou_circle", "lr"):
        assert column in history
    assert storage.read_bytes(storage.join(run_uri, "curves.png")).startswith(b"\x89PNG")
    saved = json.loads(storage.read_text(storage.join(run_uri, "config.json")))
    assert saved["model"] == "unet" and saved["size"] == [32, 32] and saved["dataset"]["num_classes"] == 4
    assert any("tfevents" in f.uri for f in storage.list_files(storage.join(run_uri, "tensorboard")))
    check_tensorboard_previews(run_uri, epochs)
    best = json.loads(storage.read_text(storage.join(run_uri, "model", "best.json")))
    assert best["val_miou"] == pytest.approx(history["val_miou"].max())
    local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"model-{os.getpid()}.keras")
    with open(local, "wb") as f:
        f.write(storage.read_bytes(storage.join(run_uri, "model", "model.keras")))
    model = keras.saving.load_model(local, safe_mode=True)
    assert model(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 32, 32, 4)
    # Ray Train V2 keeps checkpoint_manager_snapshot.json beside the checkpoint folders: not a checkpoint.
    checkpoints = {
        f.uri.split("/checkpoint_")[1].split("/")[0]
        for f in storage.list_files(run_uri)
        if "/checkpoint_" in f.uri and not f.uri.endswith("/checkpoint_manager_snapshot.json")
    }
    assert 1 <= len(checkpoints) <= 3  # best 2 by val mIoU, plus the latest


def check_tensorboard_previews(run_uri: str, epochs: int) -> None:
    """Each epoch has an image summary of 3 validation strips: image | truth | prediction, masks in class colours."""
    import tensorflow as tf

    from segray.training.report import IGNORED_COLOUR, PREVIEW_GAP

    events = [f.uri for f in storage.list_files(storage.join(run_uri, "tensorboard")) if "tfevents" in f.uri]
    steps: dict[int, list[np.ndarray]] = {}
    for uri in events:
        local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"events-{os.getpid()}")
        with open(local, "wb") as f:
            f.write(storage.read_bytes(uri))
        for event in tf.compat.v1.train.summary_iterator(local):
            for value in event.summary.value:
                if value.tag == "val_predictions":
                    # tf.summary.image stores [width, height, png, png, ...] as a string tensor.
                    pngs = tf.make_ndarray(value.tensor)[2:]
                    steps[event.step] = [tf.io.decode_png(p).numpy() for p in pngs]
    assert sorted(steps) == list(range(epochs)), sorted(steps)
    config = json.loads(storage.read_text(storage.join(run_uri, "config.json")))
    colours = {tuple(c["color"]) for c in config["dataset"]["classes"]} | {IGNORED_COLOUR}
    for strips in steps.values():
        assert len(strips) == 3
        for strip in strips:
            assert strip.shape == (32, 3 * 32 + 2 * PREVIEW_GAP, 3), strip.shape
            truth, pred = strip[:, 32 + PREVIEW_GAP: 64 + PREVIEW_GAP], strip[:, 64 + 2 * PREVIEW_GAP:]
            for panel in (truth, pred):
                assert {tuple(p) for p in panel.reshape(-1, 3).tolist()} <= colours
            assert len({tuple(p) for p in truth.reshape(-1, 3).tolist()}) >= 2  # a shape on a background
            assert strip[:, :32].std() > 5  # the image, not a blank panel


@pytest.mark.slow
def test_two_workers_learn_from_s3(shapes, s3):
    # Data and run on S3; a run on local storage leaves the same artifacts (checked in the resume test).
    bucket = s3.bucket()
    data, runs = f"{bucket}/datasets/shapes", f"{bucket}/runs"
    ingest(IngestConfig(source=shapes.info.source, destination=data, val_fraction=0.25))
    result = train(config(data, runs, "learn"))
    history = result.history
    # Learning, not only running: the loss falls and val mIoU clears a bar that
    # a constant background prediction (mIoU ~0.2) cannot reach.
    assert history["train_loss"].iloc[-1] < 0.6 * history["train_loss"].iloc[0]
    assert result.best["val_miou"] > 0.45, history[["epoch", "train_loss", "val_loss", "val_miou"]]
    check_run_artifacts(result.run_uri, epochs=4)


@pytest.mark.slow
def test_resume_continues_a_stopped_run(shapes, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    # Deep supervision: its heads and their optimizer slots travel in the checkpoint too.
    deep = {"depth": 3, "width": 8}
    # The first run from a YAML file and flags over it, as `segray train --config run.yaml --epochs 1 --deep-supervision`.
    file_values = {**config(shapes.dst, runs, "r", epochs=5, model_options=deep).to_dict(), "lr": 0.02}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(file_values))
    assert cli_main(["train", "--config", str(tmp_path / "run.yaml"), "--epochs", "1", "--deep-supervision"]) == 0
    assert "trained unet for 1 epoch(s)" in capsys.readouterr().out
    saved = json.loads(storage.read_text(storage.join(runs, "r", "config.json")))
    assert saved["epochs"] == 1 and saved["lr"] == 0.02 and saved["model_options"] == deep and saved["workers"] == 2
    assert saved["deep_supervision"] is True
    first = SimpleNamespace(history=storage.read_parquet(storage.join(runs, "r", "history.parquet")).to_pandas())
    with pytest.raises(FileExistsError, match="set `resume` to continue it"):
        resolve(config(shapes.dst, runs, "r", epochs=2))
    resumed = train(config(shapes.dst, runs, "r", epochs=2, resume=True, lr=0.02, model_options=deep, deep_supervision=True))
    h = resumed.history
    assert list(h["epoch"]) == [0, 1]
    # The first epoch is the stopped run's, carried in the checkpoint, not re-trained.
    np.testing.assert_allclose(h["train_loss"].iloc[:1], first.history["train_loss"])
    # Continuing from trained weights and optimizer state: the loss goes on falling.
    assert h["train_loss"].iloc[1] < h["train_loss"].iloc[0]
    # The two stretches leave one run's artifacts, on local storage: history, curves, previews of both epochs, best model.
    check_run_artifacts(resumed.run_uri, epochs=2)


@pytest.mark.slow
def test_killed_worker_recovers_from_checkpoint(shapes, tmp_path):
    import psutil

    def train_workers() -> list[psutil.Process]:
        # ray.init() started this cluster's raylet from this process, so its
        # workers are our descendants (other Ray instances on the machine are not).
        found = []
        for p in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    runs = str(tmp_path / "runs")
    killed: list[int] = []

    def kill_a_worker_after_first_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if any("/checkpoint_" in f.uri for f in storage.list_files(runs)):
                workers = train_workers()
                if workers:
                    victim = max(workers, key=lambda p: p.pid)
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.append(victim.pid)
                    return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True)
    killer.start()
    result = train(config(shapes.dst, runs, "k", epochs=3, max_failures=2))
    killer.join(timeout=5)
    assert killed, "no worker was killed: the test did not exercise recovery"
    assert list(result.history["epoch"]) == [0, 1, 2]
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE


def _validation_matrix(loop_config):
    import ray.train

    from segray.data.info import DatasetInfo
    from segray.training import loop
    from segray.training.loop import WorkerLoop

    if loop_config.get("val_cache_bytes") is not None:
        loop.VAL_CACHE_BYTES = loop_config["val_cache_bytes"]
    cfg = TrainConfig.from_dict(loop_config["config"])
    info = DatasetInfo.from_json(loop_config["dataset_info"])
    from segray.training.loop import val_dataset_name

    ctx = ray.train.get_context()
    worker = WorkerLoop(cfg, info, ctx.get_world_size())
    shard = ray.train.get_dataset_shard(val_dataset_name(ctx.get_world_rank()))
    loss_sum, weight_sum, cm, images, _ = worker.run_epoch(shard, train=False)
    # The next epoch's pass: from memory when the part fitted, streamed again when not; the same either way.
    again = worker.run_epoch(shard, train=False)
    metrics = {"cm": cm.tolist(), "images": images, "loss_sum": loss_sum, "weight_sum": weight_sum,
               "again": [again[0], again[1], again[2].tolist(), again[3]], "kept": isinstance(worker.val_batches, list)}
    # Train V2 keeps the metrics of reported checkpoints: rank 0 reports one.
    if ray.train.get_context().get_world_rank() == 0:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics, checkpoint=None)


@pytest.mark.slow
def test_worker_matrices_sum_to_single_worker_matrix(shapes, tmp_path):
    import keras
    import ray.train

    from segray import models
    from segray.metrics import confusion_matrix
    from segray.tf_backend import tensorflow_trainer

    cfg = config(shapes.dst, str(tmp_path), "cm", size=[32, 32])
    val = read_split(shapes.dst, "val")
    matrices = {}
    for workers in (1, 2):
        # The same val datasets, DataConfig and trainer as segray.training.train builds.
        parts = {f"val_{k}": read_split(shapes.dst, "val", part=(k, workers)) for k in range(workers)}
        trainer = tensorflow_trainer(
            _validation_matrix,
            # One worker streams every pass (a part too big to keep), two keep theirs in memory.
            train_loop_config={"config": cfg.to_dict(), "dataset_info": shapes.info.to_json(), "val_cache_bytes": 0 if workers == 1 else None},
            scaling_config=ray.train.ScalingConfig(num_workers=workers),
            run_config=ray.train.RunConfig(name=f"cm{workers}", storage_path=str(tmp_path)),
            datasets=parts,
            dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        )
        metrics = trainer.fit().metrics
        assert metrics["images"] == shapes.info.splits["val"]
        assert metrics["kept"] == (workers == 2)
        loss_sum, weight_sum, cm, images = metrics["again"]
        assert cm == metrics["cm"] and images == metrics["images"]
        assert (loss_sum, weight_sum) == pytest.approx((metrics["loss_sum"], metrics["weight_sum"]), rel=1e-5)
        matrices[workers] = np.asarray(metrics["cm"], np.int64)
    np.testing.assert_array_equal(matrices[1], matrices[2])
    # And both equal one pass on the driver with the same seeded model.
    keras.utils.set_random_seed(cfg.seed)
    model = models.build("unet", 4, input_shape=(None, None, 3), **TINY_UNET)
    rows = val.take_all()
    from segray.data.transforms import normalize

    logits = model(normalize(np.stack([r["image"] for r in rows]), shapes.info.mean, shapes.info.std), training=False)
    expected = confusion_matrix(np.stack([r["mask"] for r in rows]), np.argmax(logits, -1), 4)
    np.testing.assert_array_equal(matrices[1], expected)
    assert expected.sum() == shapes.info.splits["val"] * 32 * 32


@pytest.mark.slow
def test_a_model_added_through_the_registry_alone_trains_and_predicts(shapes, tmp_path):
    """The toy model exists only in tests/models/toy_model.py (one ``register`` call): a Ray Train worker trains it, predict runs it.

    One worker is enough: what this proves is that a worker process imports the model by the
    name its config carries; data-parallel training is test_two_workers_learn_from_s3's to prove.
    """
    import cv2

    from segray import models
    from segray.config import PredictConfig
    from segray.inference import predict
    from tests.models import toy_model

    name = toy_model.NAME
    assert name == "tests.models.toy_model:toy" and name in models.available()
    entry = models.spec(name)
    assert entry.default_options() == {"width": 8} and entry.multiple() == 1 and entry.deep_supervision is None
    # What the registry declares is what the run checks: no deep supervision heads, options by the builder's signature.
    with pytest.raises(ConfigError, match="model 'tests.models.toy_model:toy' has no decoder levels"):
        config(shapes.dst, str(tmp_path), "ds", model=name, deep_supervision=True)
    with pytest.raises(ConfigError, match="unknown option.*'depth'.*valid options: width"):
        resolve(config(shapes.dst, str(tmp_path), "opts", model=name, model_options={"depth": 2}))

    runs = str(tmp_path / "runs")
    result = train(config(shapes.dst, runs, "toy", model=name, model_options=dict(entry.tiny_options), epochs=1, workers=1))
    assert list(result.history["epoch"]) == [0] and np.isfinite(result.history["train_loss"]).all()
    saved = json.loads(storage.read_text(storage.join(runs, "toy", "config.json")))
    assert saved["model"] == name and saved["model_options"] == {"width": 4}

    out = str(tmp_path / "out")
    predicted = predict(PredictConfig(model=result.run_uri, input=shapes.dst, split="val", output=out, batch_size=8, overlays=0))
    n_val = shapes.info.splits["val"]
    assert predicted.summary["images"] == n_val and predicted.summary["errors"] == 0
    masks = sorted(os.listdir(os.path.join(out, "masks")))
    assert len(masks) == n_val == predicted.per_image["image_id"].nunique()
    for file in masks:
        mask = cv2.imread(os.path.join(out, "masks", file), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == (32, 32) and mask.max() < 4, file
    assert len(predicted.per_class) == 4


def test_config_round_trip_and_strictness():
    cfg = config("d", "s", "n", class_weights=[1.0, 2.0, 3.0, 4.0], crop=[16, 16])
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown config key.*epoch_count"):
        TrainConfig.from_dict({**cfg.to_dict(), "epoch_count": 3})
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        TrainConfig.from_dict({**cfg.to_dict(), "epochs": "3"})
    with pytest.raises(ConfigError, match="loss: expected one of"):
        TrainConfig.from_dict({**cfg.to_dict(), "loss": "dice"})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "vit"], "--model 'vit' is unknown"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--batch-size", "500"], "larger than the train split"),
        (["--class-weights", "1,2"], "gives 2 weights, the dataset has 4 classes"),
        (["--size", "30"], "--size 30x30 with --model unet"),
        (["--model", "segnet", "--xla", "--workers", "1"], "--xla with --model segnet: its MaxPoolWithArgmax"),
        (["--xla", "--workers", "2"], "--xla with --workers 2 on CPU: TensorFlow does not compile collectives"),
    ],
)
def test_bad_flags_fail_before_any_work(shapes, tmp_path, capsys, flags, message):
    argv = ["train", "--data", shapes.dst, "--storage", str(tmp_path), "--name", "bad", "--model-option", "depth=2", *flags]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad"), "nothing may be written for a refused run"


def test_not_a_dataset_and_existing_run_are_refused(shapes, tmp_path, capsys):
    assert cli_main(["train", "--data", str(tmp_path), "--storage", str(tmp_path), "--name", "x"]) == 2
    assert "is not an ingested dataset" in capsys.readouterr().err
    storage.write_text(str(tmp_path / "runs" / "taken" / "config.json"), "{}")
    assert cli_main(["train", "--data", shapes.dst, "--storage", str(tmp_path / "runs"), "--name", "taken"]) == 2
    assert "already exists; set --resume to continue it" in capsys.readouterr().err
    assert cli_main(["train", "--data", shapes.dst, "--storage", str(tmp_path / "runs"), "--name", "new", "--resume"]) == 2
    assert "there is no run" in capsys.readouterr().err


def test_resume_refuses_fields_that_alter_the_run(shapes, tmp_path, capsys):
    from segray.runs import write_config

    runs = str(tmp_path / "runs")
    first = resolve(config(shapes.dst, runs, "r", epochs=2))
    write_config(first.run_uri, first.config.to_dict(), first.info.to_dict(), exclusive=True)
    # How long and how failures are handled may change.
    assert resolve(config(shapes.dst, runs, "r", epochs=6, patience=2, resume=True)).config.epochs == 6
    with pytest.raises(ConfigError, match=r"`lr` 0.01 there, 0.1 now; `loss` 'ce' there, 'ce\+dice' now"):
        resolve(config(shapes.dst, runs, "r", lr=0.1, loss="ce+dice", resume=True))
    argv = ["train", "--data", shapes.dst, "--storage", runs, "--name", "r", "--resume", "--model", "segnet",
            "--model-option", "depth=2", "--model-option", "width=8", "--epochs", "2", "--batch-size", "8", "--lr", "0.01",
            "--schedule", "constant"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume: the run" in err and "--model 'unet' there, 'segnet' now" in err and "--epochs, --max-failures, --mlflow, --mlflow-experiment, --patience, --time-budget may change" in err, err


@pytest.mark.slow
def test_a_run_that_fails_says_so_and_export_refuses_it(shapes, tmp_path):
    """A worker that raises (an option the builder rejects, past the driver's checks) with no failures
    allowed: the run records that it failed, with the error, and is not exported as if it had ended."""
    from dataclasses import replace

    from segray import export_model
    from segray.config import ExportConfig
    from segray.runs import run_state

    checked = resolve(config(shapes.dst, str(tmp_path / "runs"), "f", workers=1, max_failures=0))
    broken = replace(checked, config=replace(checked.config, model_options={**TINY_UNET, "no_such_option": 1}))
    with pytest.raises(Exception, match="no_such_option"):
        train(broken)
    state = run_state(checked.run_uri)
    assert state.stopped == "failed" and not state.finished and state.epochs_done == 0 and state.epochs == 4
    assert "no_such_option" in state.detail, state.detail
    with pytest.raises(ValueError, match=r"is unfinished: 0 of 4 epochs done; failed \(.*no_such_option"):
        export_model(ExportConfig(run=checked.run_uri, output=str(tmp_path / "exported")))


def test_a_run_that_can_never_fit_is_refused_at_once(shapes, tmp_path):
    import segray

    # The module's Ray has 4 CPUs: 4 workers of 1 CPU leave none for the data pipeline.
    started = time.time()
    with pytest.raises(ConfigError, match=r"workers: training with 4 worker\(s\) of 1 CPU\(s\) needs 5 CPUs \(1 of them for the data pipeline\), this Ray has 4"):
        segray.train(config(shapes.dst, str(tmp_path / "runs"), "big", workers=4, batch_size=2))
    assert time.time() - started < 60
    with pytest.raises(ConfigError, match="needs 1 GPUs, this Ray has 0"):
        segray.train(config(shapes.dst, str(tmp_path / "runs"), "gpu", workers=1, gpu=True))


def test_a_joined_cluster_refuses_only_what_its_autoscaler_can_never_give(shapes, ray_cluster, monkeypatch):
    """On a cluster joined through RAY_ADDRESS: no published limits, nothing refused; past the limits, refused.

    The limits are what autoscaler v2 (KubeRay's) publishes in the GCS and
    Ray Train reads; they are put there as it would (neither the v1
    autoscaler nor the fake multi-node provider of tests/cluster publish them).
    """
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from segray.runtime import check_fits, cluster_limits

    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.get_runtime_context().gcs_address)
    assert cluster_limits() is None
    check_fits(400, 8, "workers", "a job bigger than this Ray")  # unknown limits: a busy cluster frees up
    published = autoscaler_pb2.ClusterConfig()
    for name, resources, most in (("cpu.small", {"CPU": 8}, 3), ("gpu", {"CPU": 4, "GPU": 1}, 2)):
        group = published.node_group_configs.add(name=name, max_count=most)
        for key, value in resources.items():
            group.resources[key] = value
    key, namespace = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    internal_kv._internal_kv_put(key, published.SerializeToString(), overwrite=True, namespace=namespace)
    try:
        assert cluster_limits() == {"CPU": 32.0, "GPU": 2.0}
        check_fits(20, 2, "workers", "more than the cluster has now")  # the autoscaler can add it
        with pytest.raises(ConfigError, match=r"needs 33 CPUs \(1 of them for the data pipeline\), this cluster's autoscaler can give at most 32"):
            check_fits(33, 0, "workers", "training with 32 worker(s) of 1 CPU(s)")
        with pytest.raises(ConfigError, match="needs 3 GPUs, this cluster's autoscaler can give at most 2"):
            check_fits(3, 3, "workers", "3 GPU workers")
    finally:
        internal_kv._internal_kv_del(key, namespace=namespace)


@pytest.mark.slow
def test_cli_defaults_run_at_the_machines_real_core_count(shapes, tmp_path):
    # A Ray of its own, started by the CLI with the machine's real CPU count (2 here): the
    # default 2 workers take 2 CPUs, and Ray Data still gets one (no "resources are not enough" hang).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [sys.executable, "-m", "segray.cli", "train", "--data", shapes.dst, "--storage", str(tmp_path / "runs"),
            "--name", "defaults", "--epochs", "1", "--model-option", "depth=2", "--model-option", "width=8"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trained unet for 1 epoch(s)" in done.stdout
