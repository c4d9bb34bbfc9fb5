"""Instance ingest: the coco, instance-ids and per-instance layouts, their quarantine reasons, shards and object statistics."""

from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import pytest

import segray
from segray import storage
from segray.cli import main as cli_main
from segray.data import load_dataset_info
from segray.data.imageio import encode_png
from segray.data.instance_pipeline import decode_instances

pytestmark = pytest.mark.usefixtures("ray_cluster")

LABELME_COCO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "labelme-coco")


def rows_of(dst: str) -> dict[str, dict]:
    rows = {}
    for split in ("train", "val"):
        for f in storage.list_files(storage.join(dst, split)):
            for row in storage.read_parquet(f.uri).to_pylist():
                rows[row["image_id"]] = row
    return rows


def reasons(dst: str) -> list[str]:
    return [r["reason"] for r in storage.read_parquet(storage.join(dst, "_errors.parquet")).to_pylist()]


def image(h: int = 32, w: int = 40, value: int = 90) -> bytes:
    return encode_png(np.full((h, w, 3), value, np.uint8))


def check_row(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """The row's instance map and classes; checks ids are 1..K, and that the mask column is their class map."""
    ids = decode_instances(row["instances"])
    classes = np.asarray(row["classes"], np.int32)
    assert ids.dtype == np.uint16
    assert sorted(set(np.unique(ids).tolist()) - {0}) == list(range(1, len(classes) + 1))
    mask = cv2.imdecode(np.frombuffer(row["mask"], np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(mask, np.concatenate([[0], classes])[ids])
    return ids, classes


def test_instance_ids_layout_renumbers_objects_and_quarantines_with_reasons(tmp_path):
    src, dst = tmp_path / "src", str(tmp_path / "dst")
    for d in ("images", "instances", "instance_classes"):
        (src / d).mkdir(parents=True)
    (src / "classes.json").write_text(json.dumps([{"id": 0, "name": "background"}, {"id": 1, "name": "cell"}, {"id": 2, "name": "debris"}]))
    # a: 16-bit values 5, 300, 9 -> objects 1 (5), 2 (9), 3 (300) in order of value.
    ids = np.zeros((32, 40), np.uint16)
    ids[2:10, 2:12], ids[12:20, 5:25], ids[22:30, 30:38] = 5, 300, 9
    (src / "images" / "a.png").write_bytes(image())
    ok, tif = cv2.imencode(".tif", ids)  # a 16-bit TIFF label image
    assert ok
    (src / "instances" / "a.tif").write_bytes(tif.tobytes())
    (src / "instance_classes" / "a.json").write_text(json.dumps({"5": 1, "9": 2, "300": 1}))
    # b: an object of class 7, which classes.json does not declare.
    (src / "images" / "b.png").write_bytes(image())
    (src / "instances" / "b.png").write_bytes(encode_png((ids > 0).astype(np.uint8)))
    (src / "instance_classes" / "b.json").write_text(json.dumps({"1": 7}))
    # c: 5 objects, over max_instances 4.
    many = np.zeros((32, 40), np.uint8)
    for k in range(5):
        many[k * 6: k * 6 + 4, 0:8] = k + 1
    (src / "images" / "c.png").write_bytes(image())
    (src / "instances" / "c.png").write_bytes(encode_png(many))
    (src / "instance_classes" / "c.json").write_text(json.dumps({str(k): 1 for k in range(1, 6)}))
    # d: two object classes declared, no class file: which class is each object?
    (src / "images" / "d.png").write_bytes(image())
    (src / "instances" / "d.png").write_bytes(encode_png((ids > 0).astype(np.uint8)))

    result = segray.ingest({"source": str(src), "destination": dst, "layout": "instance-ids", "max_instances": 4, "val_fraction": 0.0})
    rows = rows_of(dst)
    assert sorted(rows) == ["a"]
    got, classes = check_row(rows["a"])
    assert classes.tolist() == [1, 2, 1]
    assert (got[2:10, 2:12] == 1).all() and (got[22:30, 30:38] == 2).all() and (got[12:20, 5:25] == 3).all()
    text = "\n".join(reasons(dst))
    assert "b.json: unknown class id(s) (object 1: 7); the object classes are [1, 2]" in text
    assert "instances/c.png: 5 objects, more than max_instances 4" in text
    assert "object 1 of" in text and "has no class in instance_classes/" in text
    info = load_dataset_info(dst)
    assert info.task == "instance" and info.layout == "instance-ids" and result.info.errors == 3
    assert info.objects["count"] == 3 and info.objects["per_image"]["max"] == 3
    assert info.objects["classes"]["cell"]["count"] == 2 and info.objects["classes"]["debris"]["count"] == 1
    # debris: 8x8 px, side 8; aspect 1
    assert info.objects["classes"]["debris"]["side"]["p50"] == pytest.approx(8.0)
    assert info.objects["classes"]["debris"]["aspect"]["p50"] == pytest.approx(2 ** (1 / 8), rel=1e-6)


def test_per_instance_layout_drops_empty_masks_and_sets_aside_overlaps(tmp_path):
    src, dst = tmp_path / "src", str(tmp_path / "dst")

    def write(image_id: str, masks: list[np.ndarray]) -> None:
        (src / image_id / "images").mkdir(parents=True)
        (src / image_id / "masks").mkdir()
        (src / image_id / "images" / f"{image_id}.png").write_bytes(image(24, 24))
        for k, m in enumerate(masks):
            (src / image_id / "masks" / f"m{k}.png").write_bytes(encode_png(m.astype(np.uint8) * 255))

    a, b, empty = np.zeros((24, 24), bool), np.zeros((24, 24), bool), np.zeros((24, 24), bool)
    a[2:8, 2:8] = True
    b[10:20, 10:14] = True
    write("good", [a, empty, b])
    c = np.zeros((24, 24), bool)
    c[6:12, 6:12] = True  # overlaps a in 4 pixels
    write("clash", [a, c])
    segray.ingest({"source": str(src), "destination": dst, "layout": "per-instance", "val_fraction": 0.0})
    rows = rows_of(dst)
    assert sorted(rows) == ["good"]
    ids, classes = check_row(rows["good"])
    assert classes.tolist() == [1, 1]
    assert (ids[a] == 1).all() and (ids[b] == 2).all() and ids.astype(bool).sum() == a.sum() + b.sum()
    text = "\n".join(reasons(dst))
    assert "m1.png: empty mask (no pixel set): the object is left out" in text
    assert "clash/masks/m1.png overlaps an earlier mask in 4 pixels (m0.png the most); the per-instance layout allows one object per pixel" in text
    info = load_dataset_info(dst)
    assert info.class_names == ["background", "object"] and info.objects["dropped"] == 1
    assert info.objects["classes"]["object"]["aspect"]["p95"] > 2  # b is 10 high, 4 wide


def test_coco_polygons_rle_overlaps_crowd_and_bad_objects(tmp_path):
    from pycocotools import mask as coco_mask

    src, dst = tmp_path / "src", str(tmp_path / "dst")
    (src / "pics").mkdir(parents=True)
    for name in ("one", "two"):
        (src / "pics" / f"{name}.png").write_bytes(image(40, 50))
    small = np.zeros((40, 50), np.uint8, order="F")
    small[10:16, 10:20] = 1
    rle = coco_mask.encode(small)
    rle["counts"] = rle["counts"].decode()
    big = [[2, 2, 40, 2, 40, 30, 2, 30]]  # a 39x29 box around the small one
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": big, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 5, "segmentation": rle, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 3, "segmentation": [[60, 60, 70, 60, 70, 70]], "iscrowd": 0},  # outside the image
        {"id": 4, "image_id": 1, "category_id": 3, "segmentation": big, "iscrowd": 1},
        {"id": 5, "image_id": 2, "category_id": 9, "segmentation": big, "iscrowd": 0},  # unknown category
        {"id": 6, "image_id": 7, "category_id": 3, "segmentation": big, "iscrowd": 0},  # unknown image
    ]
    coco = {"images": [{"id": 1, "file_name": "pics/one.png", "height": 40, "width": 50}, {"id": 2, "file_name": "pics/two.png", "height": 40, "width": 50}],
            "annotations": anns, "categories": [{"id": 3, "name": "car"}, {"id": 5, "name": "wheel"}]}
    (src / "annotations.json").write_text(json.dumps(coco))
    result = segray.ingest({"source": str(src), "destination": dst, "val_fraction": 0.0, "layout": "coco"})
    rows = rows_of(dst)
    assert sorted(rows) == ["pics/one"]
    ids, classes = check_row(rows["pics/one"])
    # The larger car is painted first, the smaller wheel stays on top of it.
    assert classes.tolist() == [1, 2]
    np.testing.assert_array_equal(ids == 2, small.astype(bool))
    truth_big = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(big, 40, 50))).astype(bool)
    np.testing.assert_array_equal(ids == 1, truth_big & ~small.astype(bool))
    text = "\n".join(reasons(dst))
    assert "annotation=3: the object lies outside the 50x40 image: it is left out" in text
    assert "category_id 9 is not among the categories of" in text and "two.png" in text
    assert "annotation=6: image_id 7 is not an image of" in text
    info = result.info
    assert info.class_names == ["background", "car", "wheel"] and info.extra["coco_category_ids"] == {"car": 3, "wheel": 5}
    assert info.objects["overlap_pixels"] == int(small.sum()) and info.objects["crowd_skipped"] == 1 and info.objects["dropped"] == 1


def test_coco_file_written_by_labelme(tmp_path):
    """Debian's labelme-examples: the COCO export of labelme's instance example (3 photos, 12 objects)."""
    from pycocotools import mask as coco_mask

    dst = str(tmp_path / "dst")
    result = segray.ingest({"source": LABELME_COCO, "destination": dst, "layout": "coco", "val_fraction": 0.0})
    assert result.errors == []
    coco = json.load(open(os.path.join(LABELME_COCO, "annotations.json")))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    rows = rows_of(dst)
    assert sorted(rows) == ["JPEGImages/2011_000003", "JPEGImages/2011_000006", "JPEGImages/2011_000025"]
    info = result.info
    assert info.class_names[0] == "background" and "_background_" not in info.class_names and len(info.class_names) == 21
    for image in coco["images"]:
        row = rows[image["file_name"][:-4]]
        ids, classes = check_row(row)
        assert ids.shape == (image["height"], image["width"])
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(classes) == len(anns)
        assert sorted(info.class_names[c] for c in classes) == sorted(names[a["category_id"]] for a in anns)
        # Every object keeps the pixels of its own polygon that no smaller object covers.
        for a in anns:
            on = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(a["segmentation"], image["height"], image["width"]))).astype(bool)
            values, counts = np.unique(ids[on], return_counts=True)
            k = int(values[np.argmax(counts)])
            assert k > 0 and info.class_names[classes[k - 1]] == names[a["category_id"]]
    assert info.objects["count"] == 12 and info.objects["per_image"]["max"] == 6


def test_cli_task_instance_reads_the_ids_layout_as_instance_ids(tmp_path, capsys):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    cli_main(["synth", src, "--task", "instance", "--n", "6", "--size", "48", "--classes", "3"])
    assert sorted(os.listdir(src)) == ["classes.json", "images", "instance_classes", "instances"]
    cli_main(["ingest", src, dst, "--task", "instance"])
    out = capsys.readouterr().out
    assert "layout instance-ids" in out and "objects:" in out
    info = load_dataset_info(dst)
    assert info.task == "instance" and sum(info.splits.values()) == 6 and info.objects["count"] > 6
    # A semantic task does not go with an instance layout.
    # The plan reads the object statistics: Mask R-CNN's entries, each with its reason.
    assert cli_main(["plan", dst, "--time-budget", "10m"]) == 0
    plan = json.loads(open(os.path.join(dst, "plan.json")).read())
    assert plan["choices"]["model"]["value"] == "maskrcnn" and plan["fingerprint"]["objects"]["count"] == info.objects["count"]
    for entry in ("anchor_sizes", "anchor_ratios", "roi_size", "mask_size", "max_detections"):
        assert plan["choices"][entry]["reason"], entry
    capsys.readouterr()
    assert cli_main(["ingest", src, str(tmp_path / "x"), "--layout", "coco", "--task", "semantic"]) == 2
    assert "--task semantic does not go with layout coco (an instance layout)" in capsys.readouterr().err
    shutil.rmtree(dst)
