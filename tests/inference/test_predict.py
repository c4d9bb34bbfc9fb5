"""predict and evaluate end to end on a local Ray: local folders, S3, bad inputs, crash and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from segray import storage
from segray.config import EvaluateConfig, PredictConfig
from segray.data.imageio import decode_mask, encode_png
from segray.data.ingest import SHARD_SCHEMA
from segray.inference import evaluate, predict, read_confusion
from tests.inference.helpers import (
    CLASS_NAMES,
    assert_frames_match,
    oracle_tables,
    random_pair,
    save_keras,
    tiny_unet,
    write_raw,
    write_run,
)

pytestmark = pytest.mark.usefixtures("ray_cluster")

SIZES = [(32, 32), (24, 40), (40, 24), (17, 23), (48, 36), (32, 20)]
GOOD = {f"img_{i:03d}": SIZES[i % len(SIZES)] for i in range(30)}
TABLES = ("per_image.parquet", "per_class.parquet", "confusion.parquet", "_errors.parquet")


def read_mask(uri: str) -> np.ndarray:
    return decode_mask(storage.read_bytes(uri))


def write_bad_inputs(raw: str) -> dict[str, str]:
    """Inputs that cannot be used; returns {name: text its reason must hold}."""
    rng = np.random.default_rng(9)
    image, mask = random_pair(rng, 16, 16)
    good_png = encode_png(image)
    storage.write_bytes(f"{raw}/images/zz_corrupt.png", good_png[: len(good_png) // 2])
    storage.write_bytes(f"{raw}/masks/zz_corrupt.png", encode_png(mask))
    storage.write_bytes(f"{raw}/images/zz_nomask.png", good_png)
    storage.write_bytes(f"{raw}/images/zz_badsize.png", good_png)
    storage.write_bytes(f"{raw}/masks/zz_badsize.png", encode_png(mask[:10, :12]))
    storage.write_bytes(f"{raw}/images/zz_badvalue.png", good_png)
    storage.write_bytes(f"{raw}/masks/zz_badvalue.png", encode_png(np.full((16, 16), 7, np.uint8)))
    storage.write_bytes(f"{raw}/masks/zz_orphan.png", encode_png(mask))
    storage.write_text(f"{raw}/images/zz_notes.txt", "not an image")
    return {
        "zz_corrupt": "images/zz_corrupt.png: truncated PNG",
        "zz_nomask": "images/zz_nomask.png: image has no mask",
        "zz_badsize": "masks/zz_badsize.png is 12x10, image",
        "zz_badvalue": "masks/zz_badvalue.png: mask values [7] outside the declared classes 0..2",
        "zz_orphan": "masks/zz_orphan.png: mask has no image",
        "zz_notes": "images/zz_notes.txt: not an image",
    }


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """One predict on a local raw folder: images of six sizes, six bad inputs, a run trained at 32x32."""
    root = tmp_path_factory.mktemp("local")
    raw, out = str(root / "raw"), str(root / "out")
    pairs = write_raw(raw, GOOD, seed=1)
    bad = write_bad_inputs(raw)
    run = write_run(str(root / "run"), [32, 32])
    cfg = PredictConfig(model=run, input=raw, output=out, batch_size=4, overlays=3)
    result = predict(cfg)
    return SimpleNamespace(cfg=cfg, result=result, pairs=pairs, bad=bad, raw=raw, out=out, root=root)


def test_every_mask_has_its_images_size(local_run):
    out = local_run.out
    written = sorted(os.listdir(os.path.join(out, "masks")))
    assert written == [f"{k}.png" for k in sorted(GOOD)]
    for image_id, (image, _) in local_run.pairs.items():
        pred = cv2.imread(os.path.join(out, "masks", f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        assert pred.dtype == np.uint8 and pred.shape == image.shape[:2], image_id
        assert pred.max() < len(CLASS_NAMES)
    overlays = sorted(os.listdir(os.path.join(out, "overlays")))
    assert overlays == ["img_000.png", "img_001.png", "img_002.png"]
    h, w = GOOD["img_001"]
    assert cv2.imread(os.path.join(out, "overlays", "img_001.png")).shape == (h, 2 * w + 4, 3)  # truth | prediction


def test_tables_equal_an_independent_computation(local_run):
    out = local_run.out
    scored = {k: (local_run.pairs[k][1], read_mask(f"{out}/masks/{k}.png")) for k in GOOD}
    want_image, want_class, want_cm = oracle_tables(scored, CLASS_NAMES)
    summary = json.loads(open(f"{out}/summary.json").read())
    # Lineage: every row names the weights (pinned by hash) that made it.
    want_image["model_id"] = want_class["model_id"] = summary["model_id"]
    assert_frames_match(pd.read_parquet(f"{out}/per_image.parquet"), want_image)
    assert_frames_match(pd.read_parquet(f"{out}/per_class.parquet"), want_class)
    assert_frames_match(local_run.result.per_class, want_class)
    np.testing.assert_array_equal(read_confusion(f"{out}/confusion.parquet"), want_cm)
    assert summary["images"] == summary["images_scored"] == len(GOOD)
    assert summary["pixels"] == int(want_cm.sum())
    assert summary["pixel_accuracy"] == pytest.approx(np.trace(want_cm) / want_cm.sum())
    assert summary["miou"] == pytest.approx(want_class["iou"].mean(skipna=True))
    per_image = want_image.assign(valid=want_image["iou"].notna())
    assert summary["miou_mean_of_images"] == pytest.approx(per_image[per_image.valid].groupby("image_id")["iou"].mean().mean())
    assert summary["model_id"] and summary["source"] == local_run.raw and summary["errors"] == len(local_run.bad)
    assert summary["config"]["resolved"]["geometry"]["mode"] == "fit" and summary["images_per_s"] > 0
    assert json.loads(open(f"{out}/classes.json").read())[1]["name"] == "circle"


def test_bad_inputs_are_listed_and_the_rest_done(local_run):
    errors = pd.read_parquet(f"{local_run.out}/_errors.parquet")
    assert list(errors.columns) == ["uri", "reason"]
    assert len(errors) == len(local_run.bad)
    for name, text in local_run.bad.items():
        hits = errors[errors["reason"].str.contains(text, regex=False)]
        assert len(hits) == 1, (name, errors["reason"].tolist())
        assert name in hits["uri"].iloc[0]
    assert local_run.result.errors and len(local_run.result.errors) == len(local_run.bad)


def test_evaluate_gives_the_tables_of_predict(local_run, tmp_path):
    out = str(tmp_path / "eval")
    result = evaluate(EvaluateConfig(pred=f"{local_run.out}/masks", truth=f"{local_run.raw}/masks", output=out, classes=f"{local_run.out}/classes.json"))
    for name in ("per_image.parquet", "per_class.parquet", "confusion.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(f"{out}/{name}"), pd.read_parquet(f"{local_run.out}/{name}"))
    for key in ("miou", "mean_dice", "pixel_accuracy", "miou_mean_of_images", "pixels", "images_scored", "model_id"):
        assert result.summary[key] == local_run.result.summary[key], key
    # The truth folder also holds masks without a prediction (the bad inputs): each listed by name.
    reasons = " ".join(r for _, r in result.errors)
    for name in ("zz_corrupt", "zz_badsize", "zz_badvalue", "zz_orphan"):
        assert f"{name}.png: truth mask has no prediction" in reasons


def test_evaluate_infers_classes_and_flags_bad_pairs(tmp_path):
    pred, truth = str(tmp_path / "pred"), str(tmp_path / "truth")
    rng = np.random.default_rng(3)
    for k in range(3):
        t = rng.integers(0, 4, (8, 8)).astype(np.uint8)
        storage.write_bytes(f"{truth}/m{k}.png", encode_png(t))
        storage.write_bytes(f"{pred}/m{k}.png", encode_png(t if k else np.zeros_like(t)))
    storage.write_bytes(f"{truth}/wrong.png", encode_png(np.zeros((8, 8), np.uint8)))
    storage.write_bytes(f"{pred}/wrong.png", encode_png(np.zeros((8, 9), np.uint8)))
    result = evaluate(EvaluateConfig(pred=pred, truth=truth, output=str(tmp_path / "out")))
    assert list(result.per_class["class_name"]) == ["class_0", "class_1", "class_2", "class_3"]
    assert result.summary["images_scored"] == result.summary["images"] == 3
    assert [r for _, r in result.errors] == [f"prediction {pred}/wrong.png is 9x8, truth {truth}/wrong.png is 8x8"]


def test_out_of_another_model_or_source_is_refused(local_run, tmp_path):
    other = tiny_unet(seed=7)
    save_keras(other, str(tmp_path / "other.keras"))
    before = sorted(os.listdir(local_run.out))
    with pytest.warns(UserWarning), pytest.raises(FileExistsError, match=r"holds results of another run \(.*model_id"):
        predict(dataclasses.replace(local_run.cfg, model=str(tmp_path / "other.keras")))
    with pytest.raises(FileExistsError, match=r"holds results of another run \(.*source"):
        predict(dataclasses.replace(local_run.cfg, input=_copy_raw(local_run.raw, tmp_path)))
    assert sorted(os.listdir(local_run.out)) == before


def _copy_raw(raw: str, tmp_path) -> str:
    import shutil

    dst = str(tmp_path / "raw-copy")
    shutil.copytree(raw, dst)
    return dst


CRASH_SCRIPT = """
import json, sys
import ray
from segray.config import PredictConfig
from segray.inference import predict
ray.init(address=sys.argv[1], log_to_driver=False)
predict(PredictConfig.from_dict(json.loads(sys.argv[2])))
"""


def test_crash_then_resume_equals_an_uninterrupted_run(local_run, tmp_path, ray_cluster):
    """The driver is killed (SIGKILL) once some masks exist; the same command then finishes the job."""
    out = str(tmp_path / "crashed")
    cfg = dataclasses.replace(local_run.cfg, output=out, batch_size=4)
    address = ray_cluster.get_runtime_context().gcs_address
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, address, json.dumps(cfg.to_dict())], stdout=log, stderr=subprocess.STDOUT)
    masks = os.path.join(out, "masks")
    deadline = time.time() + 240
    count = 0
    while time.time() < deadline and proc.poll() is None:
        count = len([n for n in os.listdir(masks) if n.endswith(".png")]) if os.path.isdir(masks) else 0
        if count >= 6:
            break
        time.sleep(0.01)
    finished = proc.poll() is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert not finished, f"the driver ended before it could be killed:\n{open(tmp_path / 'driver.log').read()[-3000:]}"
    at_kill = len([n for n in os.listdir(masks) if n.endswith(".png")])
    assert 6 <= at_kill < len(GOOD), at_kill
    assert not os.path.exists(os.path.join(out, "summary.json"))

    result = predict(cfg)
    assert 0 < result.summary["images_this_run"] < len(GOOD) + 3  # the rest, and the 3 bad images retried
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(f"{out}/{name}"), pd.read_parquet(f"{local_run.out}/{name}"), obj=name)
    assert sorted(os.listdir(masks)) == sorted(os.listdir(f"{local_run.out}/masks"))
    for name in os.listdir(masks):
        np.testing.assert_array_equal(read_mask(f"{masks}/{name}"), read_mask(f"{local_run.out}/masks/{name}"), err_msg=name)
    per_image = pd.read_parquet(f"{out}/per_image.parquet")
    assert not per_image.duplicated(["image_id", "class_id"]).any()
    leftovers = [f.uri for f in storage.list_files(out) if ".tmp-" in f.uri]
    assert leftovers == []


def write_shards(uri: str, pairs: dict[str, tuple[np.ndarray, np.ndarray]], corrupt: str) -> None:
    rows = []
    for image_id, (image, mask) in sorted(pairs.items()):
        data = encode_png(image)
        rows.append({"image_id": image_id, "image": data, "mask": encode_png(mask), "height": image.shape[0], "width": image.shape[1], "source_image": "", "source_mask": ""})
    rows.append({"image_id": corrupt, "image": b"\x89PNG\r\n\x1a\nbroken", "mask": encode_png(np.zeros((4, 4), np.uint8)), "height": 4, "width": 4, "source_image": "", "source_mask": ""})
    for k, chunk in enumerate((rows[:3], rows[3:])):
        table = pa.Table.from_pylist(chunk, schema=SHARD_SCHEMA)
        storage.write_parquet(table, storage.join(uri, f"part-{k:05d}.parquet"))


def test_s3_shards_tiled_prediction(s3, tmp_path):
    """Model and Parquet shards on the moto S3 endpoint, sliding-window prediction, results back on S3."""
    bucket = s3.bucket()
    model = f"{bucket}/models/net.keras"
    save_keras(tiny_unet(seed=2), model)
    rng = np.random.default_rng(5)
    sizes = {"a": (20, 36), "b": (12, 40), "c": (33, 17), "d": (16, 16), "e": (40, 52)}
    pairs = {k: random_pair(rng, h, w) for k, (h, w) in sizes.items()}
    write_shards(f"{bucket}/data/val", pairs, corrupt="zz_broken")
    out = f"{bucket}/preds"
    cfg = PredictConfig(model=model, input=f"{bucket}/data/val", output=out, batch_size=4, tile=[16, 16], overlap=0.25, overlays=2)
    with pytest.warns(UserWarning, match="no preprocessing.json"):
        result = predict(cfg)
    keys = s3.keys(out)
    assert [k for k in keys if "/masks/" in k] == [f"preds/masks/{k}.png" for k in sorted(sizes)]
    assert len([k for k in keys if "/overlays/" in k]) == 2
    assert not [k for k in keys if ".tmp-" in k]
    scored = {}
    for image_id, (image, mask) in pairs.items():
        pred = read_mask(f"{out}/masks/{image_id}.png")
        assert pred.shape == image.shape[:2], image_id
        scored[image_id] = (mask, pred)
    names = [f"class_{k}" for k in range(3)]
    want_image, want_class, want_cm = oracle_tables(scored, names)
    want_image["model_id"] = want_class["model_id"] = result.summary["model_id"]
    assert_frames_match(storage.read_parquet(f"{out}/per_image.parquet").to_pandas(), want_image)
    assert_frames_match(storage.read_parquet(f"{out}/per_class.parquet").to_pandas(), want_class)
    np.testing.assert_array_equal(read_confusion(f"{out}/confusion.parquet"), want_cm)
    errors = storage.read_parquet(f"{out}/_errors.parquet").to_pylist()
    assert len(errors) == 1 and errors[0]["uri"] == f"{bucket}/data/val/part-00001.parquet#zz_broken"
    assert "zz_broken: truncated PNG" in errors[0]["reason"]
    summary = json.loads(storage.read_text(f"{out}/summary.json"))
    assert summary["config"]["resolved"]["geometry"]["overlap"] == [4, 4] and summary["warnings"]
    assert result.summary["images"] == len(sizes)


def test_segment_only_without_masks(tmp_path):
    """No masks/: images of sizes the model cannot take whole are padded; masks only, no tables."""
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    pairs = write_raw(raw, {"p": (30, 41), "q": (17, 23), "r": (32, 32)}, masks=False)
    save_keras(tiny_unet(seed=3), str(tmp_path / "net.keras"))
    with pytest.warns(UserWarning):
        result = predict(PredictConfig(model=str(tmp_path / "net.keras"), input=raw, output=out, batch_size=2, overlays=1))
    for image_id, (image, _) in pairs.items():
        assert read_mask(f"{out}/masks/{image_id}.png").shape == image.shape[:2]
    assert not os.path.exists(f"{out}/per_image.parquet")
    assert os.listdir(f"{out}/overlays") == ["p.png"]
    assert cv2.imread(f"{out}/overlays/p.png").shape == (30, 41, 3)
    assert result.summary["images"] == 3 and result.summary["has_truth"] is False and result.per_class.empty
    assert result.summary["config"]["resolved"]["geometry"]["mode"] == "whole"


def test_predictor_refuses_weights_other_than_the_pinned_ones(tmp_path):
    from segray.inference.geometry import Geometry
    from segray.inference.predictor import Predictor
    from segray.runs import weights_id

    path = str(tmp_path / "m.keras")
    save_keras(tiny_unet(seed=1), path)
    pinned = weights_id(tiny_unet(seed=1))
    Predictor(path, Geometry("whole", multiple=4), 2, model_id=pinned)  # the pinned weights: fine
    save_keras(tiny_unet(seed=2), path)  # the checkpoint replaced mid-run
    with pytest.raises(RuntimeError, match=f"changed after predict started .*pinned {pinned}"):
        Predictor(path, Geometry("whole", multiple=4), 2, model_id=pinned)


def test_changed_inputs_are_not_mistaken_for_a_resume(tmp_path):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    write_raw(raw, {"a": (16, 16), "b": (16, 24)}, seed=3)
    run = write_run(str(tmp_path / "run"), [16, 16])
    cfg = PredictConfig(model=run, input=raw, output=out, overlays=0)
    first = predict(cfg)
    assert predict(cfg).summary["images_this_run"] == 0  # unchanged: a resume with nothing left to do
    # The same path with other pixels (a re-export, a re-ingest): stale scores must not be reused.
    image, _ = random_pair(np.random.default_rng(9), 16, 20)
    storage.write_bytes(f"{raw}/images/a.png", cv2.imencode(".png", image)[1].tobytes())
    with pytest.raises(FileExistsError, match=r"holds results of another run \(source_fingerprint"):
        predict(cfg)
    assert first.summary["images"] == 2


def test_patch_trained_model_slides_its_window_and_records_it(tmp_path):
    """preprocessing.json's window is used without --tile (an image smaller than it too), with flip TTA and component removal."""
    from segray.inference.components import remove_small_components
    from segray.inference.geometry import tiled_argmax
    from segray.runs import load_keras
    from tests.inference.helpers import preprocessing

    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    pairs = write_raw(raw, {"big": (40, 52), "small": (12, 10), "odd": (33, 17)}, seed=4)
    run = write_run(str(tmp_path / "run"), None, window=[16, 16])
    cfg = PredictConfig(model=run, input=raw, output=out, batch_size=4, overlays=0, tta="flip", min_component=3)
    result = predict(cfg)
    assert result.summary["images"] == 3 and result.summary["errors"] == 0
    recorded = {"mode": "tile", "window": [16, 16], "overlap": [8, 8], "weighting": "gaussian", "tta": "flip", "tta_views": 4, "min_component": 3}
    assert result.summary["inference"] == recorded
    assert json.loads(storage.read_text(f"{out}/summary.json"))["config"]["resolved"]["model"]["window"] == [16, 16]
    identity = json.loads(storage.read_text(f"{out}/_run.json"))["geometry"]
    assert (identity["tile"], identity["weighting"], identity["tta"], identity["min_component"]) == ([16, 16], "gaussian", "flip", 3)

    # An oracle from the Keras model: normalised by hand, views flipped by hand, 16x16 windows.
    model = load_keras(f"{run}/model/model.keras")
    pre = preprocessing(None)
    mean, std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)
    run_model = lambda x: np.asarray(model.predict_on_batch(x))  # noqa: E731

    def flipped(x):
        return (run_model(x) + run_model(x[:, :, ::-1])[:, :, ::-1] + run_model(x[:, ::-1])[:, ::-1] + run_model(x[:, ::-1, ::-1])[:, ::-1, ::-1]) / 4

    wrong = total = 0
    for image_id, (image, _) in pairs.items():
        x = (image.astype(np.float32) - mean) / std
        want = remove_small_components(tiled_argmax(flipped, x, (16, 16), (8, 8), 4), 3)
        got = read_mask(f"{out}/masks/{image_id}.png")
        assert got.shape == image.shape[:2], image_id
        wrong, total = wrong + int((got != want).sum()), total + got.size
        if image_id == "big":  # 40x52 fits the model whole: the windows give other masks, so the check can fail
            assert (tiled_argmax(flipped, x, (16, 16), (8, 8), 4) != run_model(x[None])[0].argmax(-1)).any()
    assert wrong <= total // 1000, (wrong, total)

    before = sorted(os.listdir(f"{out}/masks"))
    with pytest.raises(FileExistsError, match=r"holds results of another run \(geometry"):
        predict(dataclasses.replace(cfg, tta="none"))
    assert sorted(os.listdir(f"{out}/masks")) == before
