"""segray export: standard-layer rebuilds, the three formats loaded where segray cannot be imported, parity with predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from segray import storage
from segray.config import ExportConfig, PredictConfig
from segray.data.imageio import decode_mask, encode_png
from segray.export import ONNX_OPSET, export
from tests.inference.helpers import CLASS_NAMES, random_pair, write_run

# Loads every export in a fresh interpreter (-I: no PYTHONPATH, no user site, no
# cwd on the path; a fresh cwd) with segray blocked on sys.meta_path, runs each on
# the images and saves the outputs.
LOADER = r'''
import json, sys
class NoSegray:
    def find_spec(self, name, path=None, target=None):
        if name == "segray" or name.startswith("segray."):
            raise ImportError("segray is blocked in this process")
sys.meta_path.insert(0, NoSegray())
try:
    import segray  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
import numpy as np
root = sys.argv[1]
images = np.load(f"{root}/images.npy")
out = {}
import onnxruntime as ort
session = ort.InferenceSession(f"{root}/onnx/model.onnx", providers=["CPUExecutionProvider"])
names = [o.name for o in session.get_outputs()]
for name, value in zip(names, session.run(names, {"images": images})):
    out[f"onnx_{name}"] = value
import tensorflow as tf
signature = tf.saved_model.load(f"{root}/savedmodel").signatures["serving_default"]
for name, value in signature(images=tf.constant(images)).items():
    out[f"savedmodel_{name}"] = value.numpy()
import keras
model = keras.models.load_model(f"{root}/keras/model.keras", safe_mode=True)
for name, value in model.predict_on_batch(images).items():
    out[f"keras_{name}"] = np.asarray(value)
np.savez(f"{root}/outputs.npz", **out)
json.dump({"blocked": blocked, "segray_modules": sorted(m for m in sys.modules if m.startswith("segray"))}, open(f"{root}/loader.json", "w"))
'''


def test_every_registered_model_rebuilds_from_standard_layers_with_equal_logits():
    import keras

    from segray import models
    from segray.export.portable import export_multiple, portable_core
    from segray.models.registry import TINY_OPTIONS

    for name in models.available():
        keras.utils.set_random_seed(0)
        model = models.build(name, 3, **TINY_OPTIONS[name])
        core = portable_core(model)
        multiple = export_multiple(model)
        assert not [type(layer).__module__ for layer in core._flatten_layers() if type(layer).__module__.startswith("segray")], name
        x = np.random.default_rng(1).normal(size=(2, 2 * multiple, 3 * multiple, 3)).astype(np.float32)
        x[:, : multiple // 2 + 1] = -5.0  # flat rows: ReLU zeros, tied maxima in every pool window
        np.testing.assert_allclose(np.asarray(core(x)), np.asarray(model(x)), atol=1e-5, rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run (tiny U-Net trained at 32x32 sizes) exported in every format; probe images beside them."""
    root = tmp_path_factory.mktemp("export")
    run = write_run(str(root / "run"), [32, 32])
    results = {fmt: export(ExportConfig(run=run, format=fmt, output=str(root / fmt))) for fmt in ("onnx", "savedmodel", "keras")}
    rng = np.random.default_rng(4)
    pairs = [random_pair(rng, 32, 32) for _ in range(6)]
    images = np.stack([image for image, _ in pairs])
    np.save(root / "images.npy", images)
    fresh = tmp_path_factory.mktemp("fresh-cwd")
    script = fresh / "load.py"
    script.write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", str(script), str(root)], cwd=fresh, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, run, results, images


def test_model_card_says_how_to_feed_the_model(exported):
    root, run, results, _ = exported
    card = json.loads((root / "onnx" / "model_card.json").read_text())
    assert card == results["onnx"].card
    assert card["format"] == "onnx" and card["opset"] == ONNX_OPSET and card["converter"] == "tf2onnx"
    assert [c["name"] for c in card["classes"]] == CLASS_NAMES
    assert card["normalisation"]["mean"] == [110.0, 100.0, 90.0] and card["normalisation"]["std"] == [40.0, 45.0, 50.0]
    assert card["input_size"]["multiple"] == 4 and card["input_size"]["trained_size"] == [32, 32]
    assert card["input"]["dtype"] == "uint8" and card["input"]["channels"] == "RGB"
    assert card["parity"]["max_abs_logit_diff"] <= 1e-4
    keras_card = json.loads((root / "keras" / "model_card.json").read_text())
    assert keras_card["opset"] is None and "divisible by 4" in keras_card["input_size"]["rule"]
    assert sorted(results["savedmodel"].files) == sorted(["fingerprint.pb", "model_card.json", "saved_model.pb", "variables/variables.data-00000-of-00001", "variables/variables.index"])


def test_exports_load_without_segray_and_match_predict(exported, ray_cluster):
    """Logits within 1e-4 of the predictor's; masks equal to segray predict's on >= 99.99% of pixels."""
    from segray.inference import predict
    from segray.inference.geometry import Geometry
    from segray.inference.predictor import Predictor
    from segray.runs import locate

    root, run, _, images = exported
    loader = json.loads((root / "loader.json").read_text())
    assert loader == {"blocked": True, "segray_modules": []}
    outputs = np.load(root / "outputs.npz")

    normalised = (images.astype(np.float32) - np.float32([110.0, 100.0, 90.0])) / np.float32([40.0, 45.0, 50.0])
    reference = Predictor(locate(run)[0], Geometry("fit", size=(32, 32), multiple=4), batch_size=8).logits(normalised)
    raw = root / "raw"
    for k, image in enumerate(images):
        storage.write_bytes(str(raw / "images" / f"img_{k}.png"), encode_png(image))
    predict(PredictConfig(model=run, input=str(raw), output=str(root / "pred"), batch_size=4, overlays=0))
    masks = np.stack([decode_mask(storage.read_bytes(str(root / "pred" / "masks" / f"img_{k}.png"))) for k in range(len(images))])

    for fmt in ("onnx", "savedmodel", "keras"):
        logits = outputs[f"{fmt}_logits"]
        assert logits.shape == reference.shape, fmt
        assert np.abs(logits - reference).max() <= 1e-4, (fmt, np.abs(logits - reference).max())
        class_ids = outputs[f"{fmt}_class_ids"]
        assert class_ids.dtype == np.uint8 and class_ids.shape == masks.shape, fmt
        assert (class_ids == masks).mean() >= 0.9999, (fmt, (class_ids == masks).mean())
        probabilities = outputs[f"{fmt}_probabilities"]
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5, err_msg=fmt)


def test_onnx_and_savedmodel_take_any_size(exported):
    """Sides not divisible by 4: padded inside the graph and cropped back, as predict pads a whole image."""
    import onnxruntime as ort

    from segray.inference.geometry import Geometry, pad_to
    from segray.inference.predictor import Predictor
    from segray.runs import locate

    root, run, _, _ = exported
    image, _ = random_pair(np.random.default_rng(7), 30, 21)
    session = ort.InferenceSession(str(root / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": image[None]})[0][0]
    normalised = (image.astype(np.float32) - np.float32([110.0, 100.0, 90.0])) / np.float32([40.0, 45.0, 50.0])
    padded = pad_to(normalised, 32, 24)
    expected = Predictor(locate(run)[0], Geometry("whole", multiple=4), batch_size=1).logits(padded[None])[0][:30, :21]
    assert logits.shape == (30, 21, 3)
    assert np.abs(logits - expected).max() <= 1e-4


def test_export_refuses_an_output_that_holds_files(tmp_path, capsys):
    from segray.cli import main

    run = write_run(str(tmp_path / "run"), [32, 32])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert main(["export", run, "--format", "onnx", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and str(tmp_path / "out") in err and "holds files" in err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", run, "--format", "tflite", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    from segray.config import ConfigError

    with pytest.raises(ConfigError) as error:
        ExportConfig(run=run, output=str(tmp_path / "x"), format="tflite")
    assert error.value.field == "format" and "tflite" in str(error.value)


def test_predict_with_onnxruntime_gives_the_masks_and_tables_of_tensorflow(exported, ray_cluster):
    from segray.inference import predict
    from tests.inference.helpers import write_raw

    root, run, _, _ = exported
    sizes = {f"img_{k}": s for k, s in enumerate([(32, 32), (24, 40), (17, 23), (48, 36), (40, 40), (32, 20)])}
    raw = str(root / "mixed")
    write_raw(raw, sizes, seed=3)
    results = {
        backend: predict(PredictConfig(model=run, input=raw, output=str(root / f"pred-{backend}"), batch_size=4, overlays=0, backend=backend))
        for backend in ("tensorflow", "onnxruntime")
    }
    assert results["onnxruntime"].summary["backend"] == "onnxruntime" and results["onnxruntime"].summary["images"] == len(sizes)
    same = total = 0
    for image_id in sizes:
        a, b = (decode_mask(storage.read_bytes(str(root / f"pred-{backend}" / "masks" / f"{image_id}.png"))) for backend in ("tensorflow", "onnxruntime"))
        assert a.shape == b.shape == sizes[image_id]
        same, total = same + int((a == b).sum()), total + a.size
    assert same / total >= 0.9999, same / total
    # An OUT written by one backend is not resumed by the other.
    with pytest.raises(FileExistsError):
        predict(PredictConfig(model=run, input=raw, output=str(root / "pred-tensorflow"), batch_size=4, overlays=0, backend="onnxruntime"))


def test_export_refuses_an_unfinished_run_unless_allowed_and_the_card_says_so(tmp_path, capsys):
    """A run in its 5th epoch of 8 (config, history and best model as the loop leaves them) is refused; allowed, the card says so."""
    import pandas as pd
    import pyarrow as pa

    from segray.cli import main
    from segray.config import TrainConfig
    from segray.runs import HISTORY_FILE, run_state, write_config, write_end

    run = write_run(str(tmp_path / "runs" / "r"), [32, 32])
    cfg = TrainConfig(data=str(tmp_path / "ds"), storage=str(tmp_path / "runs"), name="r", epochs=8, time_budget=600.0)
    write_config(run, cfg.to_dict(), {"num_classes": 3}, exclusive=True)
    scores = [0.2, 0.5, 0.6, 0.55]  # the best is epoch 2 (from 0), as the saved model's best.json says
    history = pd.DataFrame({"epoch": range(4), "val_miou": scores, "seconds": [5.0] * 4, "ended_at": [1.8e9 + 5 * i for i in range(4)]})
    storage.write_parquet(pa.Table.from_pandas(history, preserve_index=False), storage.join(run, HISTORY_FILE))
    storage.write_text(storage.join(run, "model", "best.json"), json.dumps({"epoch": 2, "val_miou": 0.6}))
    assert run_state(run).stopped is None and not run_state(run).finished

    out = tmp_path / "out"
    assert main(["export", run, "--format", "keras", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: RUN {run} is unfinished: 4 of 8 epochs done; no record of its end: still training, or killed" in err, err
    assert "--allow-unfinished" in err and not out.exists()

    allowed = export(ExportConfig(run=run, format="keras", output=str(out), allow_unfinished=True))
    card = json.loads((out / "model_card.json").read_text())
    assert card == allowed.card
    training = card["training"]
    assert training["finished"] is False and training["epochs_done"] == 4 and training["epochs_planned"] == 8 and training["epoch"] == 2
    assert training["stopped"] is None and "still training, or killed" in training["stopped_because"]
    assert any("unfinished run" in w and "4 of 8 epochs done" in w for w in card["warnings"]), card["warnings"]

    # Failed (the driver's record when Ray Train gives up): refused, saying why.
    write_end(run, 4, 8, "failed", "RuntimeError: worker died")
    assert main(["export", run, "--format", "keras", "--output", str(tmp_path / "failed")]) == 2
    assert "4 of 8 epochs done; failed (RuntimeError: worker died)" in capsys.readouterr().err
    # Stopped by its time budget: a normal end, exported with no warning.
    write_end(run, 4, 8, "time_budget")
    done = export(ExportConfig(run=run, format="keras", output=str(tmp_path / "budget")))
    assert done.card["training"]["finished"] is True and done.card["training"]["stopped"] == "time_budget"
    assert done.card["training"]["stopped_because"] == "4 of 8 epochs done; stopped by its `time_budget`"
    assert not [w for w in done.card["warnings"] if "unfinished" in w]
    # A run of old, without ended.json, whose last `patience` epochs brought nothing better ended by early stopping.
    storage.delete_file(storage.join(run, "ended.json"))
    write_config(run, {**cfg.to_dict(), "patience": 1}, {"num_classes": 3}, exclusive=False)
    assert run_state(run).stopped == "patience" and run_state(run).finished
