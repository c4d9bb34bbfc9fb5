"""uint8 end to end: images cross Ray Data as uint8 and are normalised in the model's graph, with unchanged results.

No timing here: speed is measured in benchmarks/. These tests check what the
speed-up must not change.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from segray.config import IngestConfig
from segray.data import ingest, read_split, synthesize
from segray.data.transforms import normalize, normalize_tf
from segray.inference.geometry import Geometry, fitted_content, pad_to, restore, round_up, tiled_argmax
from segray.inference.sources import ROW_COLUMNS, ReadDecode, columns_of, dataset_of, list_source
from tests.inference.helpers import preprocessing, save_keras, tiny_unet

MEAN, STD = preprocessing(None)["mean"], preprocessing(None)["std"]


def _old_normalize(image: np.ndarray) -> np.ndarray:
    """The float path before issue 16: float32 on the CPU workers, then (x - mean) / std."""
    return (image.astype(np.float32) - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory, ray_cluster):
    """An 8-bit dataset and one holding a 16-bit file beside 8-bit ones."""
    root = tmp_path_factory.mktemp("speed")
    synthesize(str(root / "raw8"), n=12, size=(24, 32), num_classes=3, seed=3, show_progress=False)
    # Tiny shards: more shards than the test cluster's 4 CPUs, so read_split decodes in the read tasks.
    eight = ingest(IngestConfig(source=str(root / "raw8"), destination=str(root / "ds8"), val_fraction=0.0, shard_mb=0.001))
    raw16 = root / "raw16"
    (raw16 / "images").mkdir(parents=True)
    (raw16 / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        picture = rng.integers(0, 65536, (24, 32, 3)).astype(np.uint16) if k == 0 else rng.integers(0, 256, (24, 32, 3)).astype(np.uint8)
        cv2.imwrite(str(raw16 / "images" / f"p{k}.png"), picture)
        cv2.imwrite(str(raw16 / "masks" / f"p{k}.png"), (np.arange(24 * 32).reshape(24, 32) % 3).astype(np.uint8))
    sixteen = ingest(IngestConfig(source=str(raw16), destination=str(root / "ds16"), val_fraction=0.0))
    return eight, sixteen, raw16


def test_training_batches_are_uint8_up_to_the_worker(mixed_dataset):
    import ray

    from segray import storage

    eight, sixteen, _ = mixed_dataset
    shards = [f for f in storage.list_files(f"{eight.dst}/train") if f.uri.endswith(".parquet")]
    assert len(shards) > ray.cluster_resources()["CPU"], "the fused read+decode path is not exercised"
    batches = list(read_split(eight.dst, "train", augment=True, seed=1).iter_batches(batch_size=4, batch_format="numpy"))
    assert sum(len(b["image"]) for b in batches) == 12
    for b in batches:
        assert b["image"].dtype == np.uint8 and b["image"].shape[1:] == (24, 32, 3)
        assert b["mask"].dtype == np.uint8 and b["mask"].shape[1:] == (24, 32)
    # A dataset with a 16-bit file (one shard: a separate decode operator) keeps its fractions:
    # float32 on the 0..255 scale, never rounded to uint8.
    rows = read_split(sixteen.dst, "train").take_all()
    images = np.stack([r["image"] for r in rows])
    assert images.dtype == np.float32 and images.max() <= 255.0
    assert np.any(images != np.round(images)), "the 16-bit image was rounded to 8 bits"


def test_predict_reader_gives_uint8_and_16_bit_images_their_own_column(mixed_dataset, ray_cluster):
    _, _, raw16 = mixed_dataset
    source = list_source(str(raw16))
    reader = ReadDecode(source.kind, Geometry("whole"), 3, frozenset(), frozenset())
    rows = {}
    for b in dataset_of(source, set(), 2).map_batches(reader, batch_size=2, batch_format="numpy").iter_batches(batch_size=None, batch_format="numpy"):
        for i, image_id in enumerate(b["image_id"]):
            rows[image_id] = (b["image"][i], b["image_float"][i])
    assert sorted(rows) == ["p0", "p1", "p2", "p3"]
    for image_id, (image, image_float) in rows.items():
        if image_id == "p0":  # 16-bit
            assert image.size == 0 and image_float.dtype == np.float32 and image_float.shape == (24, 32, 3)
        else:
            assert image.dtype == np.uint8 and image.shape == (24, 32, 3) and image_float.size == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_in_graph_normalisation_equals_the_float_path(dtype):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 9, 7, 3)).astype(dtype)
    if dtype == np.float32:
        images += rng.random(images.shape, np.float32)  # 16-bit fractions
    got = normalize_tf(images, MEAN, STD).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _old_normalize(images), rtol=0, atol=1e-6)
    np.testing.assert_allclose(normalize(images, MEAN, STD), _old_normalize(images), rtol=0, atol=1e-6)


def _old_masks(model, images: list[np.ndarray], geometry: Geometry, batch_size: int) -> list[np.ndarray]:
    """Masks as the predictor made them before issue 16: normalised float32 in, zero padding, predict_on_batch."""
    out = []
    for image in images:
        x = _old_normalize(image)
        if geometry.mode == "tile":
            out.append(tiled_argmax(lambda b: model.predict_on_batch(b), x, geometry.tile, geometry.overlap, batch_size))
            continue
        h, w = image.shape[:2]
        if geometry.mode == "whole":
            x = pad_to(x, round_up(h, geometry.multiple), round_up(w, geometry.multiple))
        logits = np.asarray(model.predict_on_batch(x[None]), np.float32)[0]
        content = fitted_content(h, w, geometry.size, geometry.fit) if geometry.mode == "fit" else (h, w)
        out.append(restore(logits, content, h, w).argmax(-1).astype(np.uint8))
    return out


@pytest.mark.parametrize(
    "geometry",
    [Geometry("fit", size=(16, 16), multiple=4), Geometry("whole", multiple=4), Geometry("tile", multiple=4, tile=(16, 16), overlap=(4, 4))],
    ids=["fit", "whole-padded", "tile-padded"],
)
def test_predictor_masks_equal_the_float_path(geometry, tmp_path):
    from segray.inference.predictor import Predictor
    from segray.runs import load_keras

    path = str(tmp_path / "model.keras")
    save_keras(tiny_unet(), path)
    rng = np.random.default_rng(2)
    # fit: images at the model's size (a resize would now run on uint8, as training's does);
    # whole and tile: sizes that need padding.
    shapes = [(16, 16)] * 3 if geometry.mode == "fit" else [(14, 10), (13, 18), (30, 21)]
    images = [rng.integers(0, 256, s + (3,)).astype(np.uint8) for s in shapes]
    rows = [
        {
            "image_id": f"i{k}", "uri": f"i{k}.png", "error": "", "height": im.shape[0], "width": im.shape[1],
            "image": im, "image_float": np.zeros((0, 0, 3), np.float32), "truth": np.zeros((0, 0), np.uint8),
            "original": np.zeros((0, 0, 3), np.uint8),
        }
        for k, im in enumerate(images)
    ]
    predictor = Predictor(path, geometry, 2, mean=MEAN, std=STD)
    got = predictor(columns_of(rows, ROW_COLUMNS))
    want = _old_masks(load_keras(path), images, geometry, 2)
    assert len({m.tobytes() for m in want}) > 1 or len(np.unique(want[0])) > 1, "an untrained-looking constant mask proves little"
    for k, (g, w) in enumerate(zip(got["pred"], want)):
        assert g.shape == w.shape == images[k].shape[:2]
        np.testing.assert_array_equal(g, w, err_msg=f"image {k}")
