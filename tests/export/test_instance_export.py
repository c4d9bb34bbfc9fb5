"""segray export of a Mask R-CNN run: a SavedModel loaded where segray cannot be imported gives predict's detections; ONNX is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from segray.cli import main as cli_main
from tests.instance_run import instance_run

pytestmark = pytest.mark.usefixtures("ray_cluster")

# A fresh interpreter (-I, segray blocked on sys.meta_path) loads the SavedModel and runs one image.
LOADER = r'''
import json, sys
class NoSegray:
    def find_spec(self, name, path=None, target=None):
        if name == "segray" or name.startswith("segray."):
            raise ImportError("segray is blocked in this process")
sys.meta_path.insert(0, NoSegray())
import numpy as np
import tensorflow as tf
root = sys.argv[1]
image = np.load(f"{root}/image.npy")
signature = tf.saved_model.load(f"{root}/savedmodel").signatures["serving_default"]
out = {k: v.numpy() for k, v in signature(images=tf.constant(image[None])).items()}
np.savez(f"{root}/detections.npz", **out)
json.dump({"segray_modules": sorted(m for m in sys.modules if m.startswith("segray"))}, open(f"{root}/loader.json", "w"))
'''


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    return instance_run(tmp_path_factory.mktemp("instexport"))


def test_savedmodel_gives_predicts_detections_in_a_fresh_process(predicted, tmp_path):
    from segray.data import decode_image
    from segray.inference import display_uint8
    from segray.models import paste_instances

    out = str(tmp_path / "savedmodel")
    assert cli_main(["export", predicted.run, "--output", out, "--format", "savedmodel"]) == 0
    card = json.load(open(os.path.join(out, "model_card.json")))
    assert card["task"] == "instance" and card["format"] == "savedmodel" and card["model"] == "maskrcnn"
    assert set(card["outputs"]) == {"boxes", "scores", "classes", "masks", "count"} and card["opset"] is None
    assert card["classes"][1]["name"] and card["normalisation"]["mean"]
    assert card["parity"]["max_abs_box_diff"] <= 1e-3 and card["parity"]["classes_equal"] == 1

    # The predicted image of most objects, as predict read it (the shard's bytes; 64x64 is the trained size).
    objects = pd.read_parquet(os.path.join(predicted.out, "instances.parquet"))
    image_id = objects.image_id.value_counts().index[0]
    shard = next(os.path.join(predicted.data, "val", f) for f in sorted(os.listdir(os.path.join(predicted.data, "val")))
                 if image_id in pq.read_table(os.path.join(predicted.data, "val", f), columns=["image_id"])["image_id"].to_pylist())
    row = pq.read_table(shard, filters=[("image_id", "=", image_id)]).to_pylist()[0]
    image = display_uint8(decode_image(row["image"]))
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    np.save(tmp_path / "image.npy", image)
    subprocess.run([sys.executable, "-I", "-c", LOADER, str(tmp_path)], check=True, cwd=str(tmp_path), timeout=300)
    assert json.load(open(tmp_path / "loader.json"))["segray_modules"] == []
    got = dict(np.load(tmp_path / "detections.npz"))
    n = int(got["count"][0])
    assert got["boxes"].shape[-1] == 4 and got["masks"].shape[:2] == got["scores"].shape
    instance_map, keep = paste_instances(got["boxes"][0, :n], got["masks"][0, :n], got["scores"][0, :n], 64, 64)

    want_map = cv2.imread(os.path.join(predicted.out, "instances", f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
    rows = objects[objects.image_id == image_id].sort_values("instance_id")
    assert len(keep) == len(rows) > 0
    np.testing.assert_allclose(got["scores"][0, keep], rows.score.to_numpy(), atol=1e-5)
    assert list(got["classes"][0, keep]) == list(rows.class_id)
    # Same objects, same pixels (a mask value within float rounding of 0.5 may flip one pixel).
    assert (instance_map == want_map).mean() >= 0.999
    print({"objects": len(keep), "pixel_agreement": float((instance_map == want_map).mean()), "parity": card["parity"]})


def test_onnx_and_keras_are_refused_with_the_reason(predicted, tmp_path):
    from segray.api import export_model as export

    with pytest.raises(ValueError, match=r"CombinedNonMaxSuppression.*use `format` savedmodel") as caught:
        export({"run": predicted.run, "output": str(tmp_path / "onnx"), "format": "onnx"})
    assert getattr(caught.value, "field", None) == "format"
    with pytest.raises(ValueError, match=r"format keras: .*instance model"):
        export({"run": predicted.run, "output": str(tmp_path / "keras"), "format": "keras"})
    assert not os.path.exists(tmp_path / "onnx") or not os.listdir(tmp_path / "onnx")
