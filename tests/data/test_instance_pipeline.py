"""The instance input pipeline: the batch contract, and augmentation that keeps every object on its own pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

import segray
from segray.data import read_instances, renumber, sample_instances
from segray.data.imageio import encode_png

SPATIAL = ("flip", "rot90", "scale", "rotate", "elastic")


def coded_pair(rng: np.random.Generator, h: int = 64, w: int = 80, objects: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image whose colour says the class of the object under it (touching rectangles), its id map and classes."""
    ids = np.zeros((h, w), np.uint16)
    classes = []
    for k in range(1, objects + 1):
        y, x = int(rng.integers(0, h - 12)), int(rng.integers(0, w - 12))
        ids[y: y + int(rng.integers(8, 20)), x: x + int(rng.integers(8, 20))] = k
        classes.append(int(rng.integers(1, 4)))
    ids, classes = renumber(ids, np.asarray(classes, np.int32), 1)  # objects hidden by later ones are gone
    image = (np.concatenate([[0], classes])[ids] * 60)[..., None].repeat(3, axis=2).astype(np.uint8)
    return image, ids.astype(np.uint16), classes


def assert_aligned(image: np.ndarray, ids: np.ndarray, classes: np.ndarray) -> None:
    """Each object's interior pixels carry its class's colour (the image's edge pixels blend by linear interpolation)."""
    import cv2

    assert ids.max(initial=0) == len(classes)
    for k in range(1, len(classes) + 1):
        inside = cv2.erode((ids == k).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if inside.sum() < 4:
            continue
        values = image[inside][:, 0].astype(int)
        assert np.median(values) == 60 * classes[k - 1], (k, classes[k - 1], np.unique(values))


def test_sample_instances_moves_the_ids_with_the_image_and_renumbers():
    for seed in range(40):
        rng = np.random.default_rng(seed)
        image, ids, classes = coded_pair(rng)
        patch, labels = sample_instances(image, ids, (48, 48), rng, SPATIAL, 1.0)
        assert patch.shape == (48, 48, 3) and labels.shape == (48, 48) and patch.dtype == np.uint8
        labels, kept = renumber(labels, classes, min_area=4)
        assert labels.dtype == np.int32
        assert sorted(np.unique(labels).tolist()) == list(range(len(kept) + 1))
        assert all(np.sum(labels == k) >= 4 for k in range(1, len(kept) + 1))
        assert_aligned(patch, labels, kept)


def test_no_augmentation_and_no_crop_leaves_the_pair_as_it_is():
    image, ids, classes = coded_pair(np.random.default_rng(3))
    patch, labels = sample_instances(image, ids, ids.shape, None, ())
    np.testing.assert_array_equal(patch, image)
    np.testing.assert_array_equal(labels, ids)


def test_renumber_drops_cut_away_objects_and_small_remnants():
    ids = np.zeros((10, 10), np.int32)
    ids[0:5, 0:5] = 2  # object 1 was cut away entirely
    ids[8:10, 9] = 3  # a 2-pixel remnant
    ids[6:9, 0:3] = 4
    labels, kept = renumber(ids, np.array([7, 8, 9, 10], np.int32), min_area=3)
    assert kept.tolist() == [8, 10]
    assert (labels[0:5, 0:5] == 1).all() and (labels[6:9, 0:3] == 2).all() and labels[8:10, 9].tolist() == [0, 0]


@pytest.mark.usefixtures("ray_cluster")
def test_read_instances_gives_the_contract_batch_with_aligned_objects(tmp_path):
    src, dst = tmp_path / "src", str(tmp_path / "dst")
    for d in ("images", "instances", "instance_classes"):
        (src / d).mkdir(parents=True)
    (src / "classes.json").write_text(json.dumps([{"id": k, "name": n} for k, n in enumerate(["background", "a", "b", "c"])]))
    rng = np.random.default_rng(0)
    for i in range(8):
        image, ids, classes = coded_pair(rng)
        (src / "images" / f"i{i}.png").write_bytes(encode_png(image))
        (src / "instances" / f"i{i}.png").write_bytes(encode_png(ids))
        (src / "instance_classes" / f"i{i}.json").write_text(json.dumps({str(k + 1): int(c) for k, c in enumerate(classes)}))
    segray.ingest({"source": str(src), "destination": dst, "layout": "instance-ids", "max_instances": 10, "val_fraction": 0.25})
    ds = read_instances(dst, "train", crop=(40, 40), augment=True, augment_set=SPATIAL, seed=1)
    batches = list(ds.iter_batches(batch_size=3, batch_format="numpy"))
    assert sum(len(b["image"]) for b in batches) == 6
    for b in batches:
        n = len(b["image"])
        assert b["image"].shape == (n, 40, 40, 3) and b["image"].dtype == np.uint8
        assert b["instances"].shape == (n, 40, 40) and b["instances"].dtype == np.int32
        assert b["classes"].shape == (n, 10) and b["classes"].dtype == np.int32
        for image, ids, classes in zip(b["image"], b["instances"], b["classes"]):
            k = int(ids.max(initial=0))
            assert (classes[:k] >= 1).all() and (classes[k:] == 0).all()
            assert sorted(np.unique(ids).tolist()) == list(range(k + 1))
            assert_aligned(image, ids, classes[:k])
    # Without augmentation the val split comes back whole, objects as ingested.
    val = next(iter(read_instances(dst, "val").iter_batches(batch_size=8, batch_format="numpy")))
    assert val["image"].shape == (2, 64, 80, 3) and (val["instances"].max(axis=(1, 2)) == (val["classes"] > 0).sum(1)).all()
    # A semantic dataset is refused, naming it.
    from segray.config import IngestConfig
    from segray.data import ingest, synthesize

    synthesize(str(tmp_path / "sem"), 3, (32, 32), show_progress=False)
    ingest(IngestConfig(source=str(tmp_path / "sem"), destination=str(tmp_path / "semds")))
    with pytest.raises(ValueError, match="semds: task 'semantic', not an instance dataset"):
        read_instances(str(tmp_path / "semds"), "train")
