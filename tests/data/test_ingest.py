"""Ingest: layouts, bad inputs, local vs S3, reproducible split."""

from __future__ import annotations

import json
import os
import warnings
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from segray import storage
from segray.cli import main as cli_main
from segray.config import IngestConfig
from segray.data import IngestError, choose_val, decode_image, decode_mask, ingest, load_dataset_info, synthesize
from segray.data.imageio import encode_png
from tests.conftest import EPFL_MINI

pytestmark = pytest.mark.usefixtures("ray_cluster")


def read_split_table(dst: str, split: str):
    files = [f.uri for f in storage.list_files(storage.join(dst, split))]
    tables = [storage.read_parquet(f) for f in files]
    import pyarrow as pa

    return pa.concat_tables(tables).sort_by("image_id") if tables else None


def errors_of(dst: str) -> list[dict]:
    return storage.read_parquet(storage.join(dst, "_errors.parquet")).to_pylist()


def test_ids_layout_roundtrip(tmp_path):
    raw, dst = str(tmp_path / "raw"), str(tmp_path / "ds")
    synthesize(raw, n=24, size=(32, 40), num_classes=4, seed=3, show_progress=False)
    result = ingest(IngestConfig(source=raw, destination=dst, val_fraction=0.25))
    info = load_dataset_info(dst)
    assert info == result.info
    assert info.num_classes == 4 and info.size == [32, 40]
    assert info.splits == {"train": 18, "val": 6}  # exactly 0.25 x 24
    val_ids = choose_val([f"img_{i:06d}" for i in range(24)], 0.25)
    assert info.val_ids == sorted(val_ids)
    assert errors_of(dst) == []
    assert abs(sum(info.pixel_frequency.values()) - 1.0) < 1e-9
    # Every row: the image bytes are the source file's, the mask decodes to the source mask.
    for split in ("train", "val"):
        table = read_split_table(dst, split)
        assert table.num_rows == info.splits[split]
        for row in table.to_pylist():
            assert (row["image_id"] in val_ids) == (split == "val")
            assert row["image"] == open(row["source_image"], "rb").read()
            src_mask = cv2.imread(row["source_mask"], cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(decode_mask(row["mask"]), src_mask)
            assert (row["height"], row["width"]) == (32, 40)
    # Mean and std are those of the train images.
    train = read_split_table(dst, "train")
    pixels = np.concatenate([decode_image(b).reshape(-1, 3).astype(np.float64) for b in train["image"].to_pylist()])
    np.testing.assert_allclose(info.mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(info.std, pixels.std(0), rtol=1e-5)


def test_local_and_s3_give_equal_tables(tmp_path, s3):
    bucket = s3.bucket()
    local_raw, local_dst = str(tmp_path / "raw"), str(tmp_path / "ds")
    s3_raw, s3_dst = f"{bucket}/raw", f"{bucket}/datasets/shapes"
    synthesize(local_raw, n=16, size=(32, 32), seed=1, show_progress=False)
    synthesize(s3_raw, n=16, size=(32, 32), seed=1, show_progress=False)
    a = ingest(IngestConfig(source=local_raw, destination=local_dst, val_fraction=0.3))
    b = ingest(IngestConfig(source=s3_raw, destination=s3_dst, val_fraction=0.3))
    assert any(k.endswith("dataset.json") for k in s3.keys(s3_dst))
    assert a.info.splits == b.info.splits and a.info.pixel_counts == b.info.pixel_counts
    np.testing.assert_allclose(a.info.mean, b.info.mean)
    for split in ("train", "val"):
        ta, tb = read_split_table(local_dst, split), read_split_table(s3_dst, split)
        cols = ["image_id", "image", "mask", "height", "width"]
        assert ta.select(cols).equals(tb.select(cols))
        assert all(u.startswith(s3_raw) for u in tb["source_image"].to_pylist())


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, array)


def test_every_bad_input_is_reported_and_good_pairs_arrive(tmp_path):
    raw, dst = tmp_path / "raw", str(tmp_path / "ds")
    synthesize(str(raw), n=6, size=(24, 24), num_classes=3, seed=0, show_progress=False)
    good_ids = {f"img_{i:06d}" for i in range(6)}
    img, msk = raw / "images", raw / "masks"
    rng = np.random.default_rng(0)
    ok_image = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    # corrupt: random bytes with a .png name
    (img / "corrupt.png").write_bytes(b"GIF89a" + bytes(rng.integers(0, 255, 300, dtype=np.uint8)))
    _png(str(msk / "corrupt.png"), np.zeros((24, 24), np.uint8))
    # truncated PNG and JPEG
    data = encode_png(ok_image)
    (img / "truncated.png").write_bytes(data[: len(data) // 2])
    _png(str(msk / "truncated.png"), np.zeros((24, 24), np.uint8))
    jpg = cv2.imencode(".jpg", ok_image)[1].tobytes()
    (img / "trunc_jpeg.jpg").write_bytes(jpg[: len(jpg) - 40])
    _png(str(msk / "trunc_jpeg.png"), np.zeros((24, 24), np.uint8))
    # empty file
    (img / "empty.png").write_bytes(b"")
    _png(str(msk / "empty.png"), np.zeros((24, 24), np.uint8))
    # image without mask, mask without image
    _png(str(img / "lonely_image.png"), ok_image)
    _png(str(msk / "lonely_mask.png"), np.zeros((24, 24), np.uint8))
    # mask of another size
    _png(str(img / "wrong_size.png"), ok_image)
    _png(str(msk / "wrong_size.png"), np.zeros((20, 24), np.uint8))
    # class ids beyond the 3 declared (255 alone would be fine)
    bad_values = np.zeros((24, 24), np.uint8)
    bad_values[0, :3] = [7, 255, 9]
    _png(str(img / "bad_values.png"), ok_image)
    _png(str(msk / "bad_values.png"), bad_values)
    # a file in images/ that is not an image
    (img / "notes.txt").write_text("not an image")

    ingest(IngestConfig(source=str(raw), destination=dst, val_fraction=0.2))
    errors = {os.path.basename(e["uri"]): e["reason"] for e in errors_of(dst)}
    expected = {
        "corrupt.png": "not a decodable image",
        "truncated.png": "truncated PNG",
        "trunc_jpeg.jpg": "truncated JPEG",
        "empty.png": "empty file",
        "lonely_image.png": "image has no mask",
        "lonely_mask.png": "mask has no image",
        "wrong_size.png": "is 24x20, image",
        "bad_values.png": "mask values [7, 9] outside the declared classes 0..2",
        "notes.txt": "not an image",
    }
    assert set(errors) == set(expected)
    for name, fault in expected.items():
        assert fault in errors[name], (name, errors[name])
        assert name in errors[name] or name.replace(".jpg", ".png") in errors[name], errors[name]
    arrived = set()
    for split in ("train", "val"):
        table = read_split_table(dst, split)
        if table is not None:
            arrived |= set(table["image_id"].to_pylist())
    assert arrived == good_ids
    assert load_dataset_info(dst).errors == len(expected)


def test_no_valid_pair_fails_with_message(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    (raw / "images" / "a.png").write_bytes(b"")
    _png(str(raw / "masks" / "a.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(IngestError, match="no valid pair"):
        ingest(IngestConfig(source=str(raw), destination=str(tmp_path / "ds")))
    code = cli_main(["ingest", str(raw), str(tmp_path / "ds2")])
    assert code != 0
    assert "no valid pair" in capsys.readouterr().err
    assert cli_main(["ingest", str(tmp_path / "missing"), str(tmp_path / "ds3")]) != 0


def test_rerun_refuses_or_replaces_whole(tmp_path, capsys):
    raw, dst = str(tmp_path / "raw"), str(tmp_path / "ds")
    synthesize(raw, n=8, size=(16, 16), seed=0, show_progress=False)
    ingest(IngestConfig(source=raw, destination=dst))
    before = {f.uri for f in storage.list_files(dst)}
    with pytest.raises(IngestError, match="set `overwrite` to replace it"):
        ingest(IngestConfig(source=raw, destination=dst))
    assert cli_main(["ingest", raw, dst]) == 2
    assert f"DESTINATION {dst} already holds files; set --overwrite to replace it" in capsys.readouterr().err
    assert {f.uri for f in storage.list_files(dst)} == before
    ingest(IngestConfig(source=raw, destination=dst, overwrite=True))
    after = {f.uri for f in storage.list_files(dst)}
    shards = [u for u in after if u.endswith(".parquet") and "_errors" not in u]
    # Shard names carry a run id: none of the first run's shards survive.
    assert not (set(shards) & before)
    assert sum(pq.read_metadata(u).num_rows for u in shards) == 8


def test_palette_layout(tmp_path):
    raw, dst = tmp_path / "raw", str(tmp_path / "ds")
    classes = [
        {"id": 0, "name": "background", "color": [0, 0, 0]},
        {"id": 1, "name": "road", "color": [128, 64, 128]},
        {"id": 2, "name": "car", "color": [0, 0, 142]},
        {"id": 255, "name": "void", "color": [224, 224, 192]},
    ]
    os.makedirs(raw)
    (raw / "classes.json").write_text(json.dumps(classes))
    rng = np.random.default_rng(0)
    truth = {}
    for i in range(4):
        ids = rng.choice([0, 1, 2, 255], size=(12, 16)).astype(np.uint8)
        rgb = np.zeros((12, 16, 3), np.uint8)
        for c in classes:
            rgb[ids == c["id"]] = c["color"]
        _png(str(raw / "images" / f"p{i}.png"), rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        _png(str(raw / "masks" / f"p{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        truth[f"p{i}"] = ids
    odd = np.zeros((12, 16, 3), np.uint8)
    odd[0, 0] = (1, 2, 3)
    _png(str(raw / "images" / "odd.png"), rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    _png(str(raw / "masks" / "odd.png"), cv2.cvtColor(odd, cv2.COLOR_RGB2BGR))

    info = ingest(IngestConfig(source=str(raw), destination=dst, layout="palette", val_fraction=0.0)).info
    assert info.class_names == ["background", "road", "car"]
    table = read_split_table(dst, "train")
    assert table["image_id"].to_pylist() == ["p0", "p1", "p2", "p3"]
    for row in table.to_pylist():
        np.testing.assert_array_equal(decode_mask(row["mask"]), truth[row["image_id"]])
    (error,) = errors_of(dst)
    assert "odd.png" in error["reason"] and "(1, 2, 3)" in error["reason"] and "not in classes.json" in error["reason"]


def test_per_class_layout_real_pixels(tmp_path):
    dst = str(tmp_path / "ds")
    priority = ["mitochondrial boundaries", "PSD", "vesicles", "mitochondrion", "membranes", "axon"]
    order = ["membranes", "mitochondrion", "mitochondrial boundaries", "PSD", "vesicles", "axon"]
    info = ingest(IngestConfig(source=EPFL_MINI, destination=dst, layout="per-class", images_dir="slices", class_order=order, priority=priority, val_fraction=0.0)).info
    assert info.class_names == ["background"] + order
    assert info.priority == priority
    assert info.splits["train"] == 3 and info.size == [96, 128]
    table = read_split_table(dst, "train")
    for row in table.to_pylist():
        mask = decode_mask(row["mask"])
        # Independent reading of the layers: the first class in priority order that sets a pixel.
        expected = np.zeros_like(mask)
        taken = np.zeros(mask.shape, bool)
        for name in priority:
            layer = cv2.imread(os.path.join(EPFL_MINI, name, row["image_id"] + ".png"), cv2.IMREAD_UNCHANGED)
            on = (layer[..., :3].max(axis=2) > 127) & ~taken
            expected[on] = order.index(name) + 1
            taken |= on
        np.testing.assert_array_equal(mask, expected)
        assert len(np.unique(mask)) >= 3  # real slices hold several structures
    overlap_layers = [
        cv2.imread(os.path.join(EPFL_MINI, n, "training0000.png"), cv2.IMREAD_UNCHANGED)[..., :3].max(2) > 127
        for n in ("membranes", "mitochondrial boundaries")
    ]
    assert (overlap_layers[0] & overlap_layers[1]).any(), "fixture should contain an overlap to settle"


def test_synth_is_reproducible(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    synthesize(a, n=5, size=(32, 32), seed=7, show_progress=False)
    synthesize(b, n=5, size=(32, 32), seed=7, show_progress=False)
    synthesize(c, n=5, size=(32, 32), seed=8, show_progress=False)
    files = sorted(os.path.relpath(f.uri, a) for f in storage.list_files(a))
    assert len(files) == 11
    for f in files:
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read()
    assert open(os.path.join(a, "images", "img_000000.png"), "rb").read() != open(os.path.join(c, "images", "img_000000.png"), "rb").read()
    # Some image lacks some class, and classes overlap within images.
    masks = [cv2.imread(os.path.join(a, "masks", f"img_{i:06d}.png"), cv2.IMREAD_UNCHANGED) for i in range(5)]
    assert any(len(np.unique(m)) < 4 for m in masks)


def test_grown_dataset_keeps_split_assignments_with_the_earlier_val_ids(tmp_path):
    small, grown = str(tmp_path / "small"), str(tmp_path / "grown")
    synthesize(small, n=20, size=(16, 16), seed=2, show_progress=False)
    synthesize(grown, n=40, size=(16, 16), seed=2, show_progress=False)
    first_info = ingest(IngestConfig(source=small, destination=str(tmp_path / "ds1"), val_fraction=0.3)).info
    pinned = tmp_path / "val.txt"
    pinned.write_text("# the first ingest's val split\n" + "\n".join(first_info.val_ids) + "\n")
    ingest(IngestConfig(source=grown, destination=str(tmp_path / "ds2"), val_ids=str(pinned)))

    def assignment(dst):
        return {i: s for s in ("train", "val") for i in read_split_table(dst, s)["image_id"].to_pylist()}

    first, second = assignment(str(tmp_path / "ds1")), assignment(str(tmp_path / "ds2"))
    assert sum(s == "val" for s in first.values()) == 6  # exactly 0.3 x 20
    assert len(second) == 40 and all(second[i] == s for i, s in first.items())
    assert sum(s == "val" for s in second.values()) == 6  # the 20 new ids went to train


def test_classes_are_inferred_from_every_split(tmp_path):
    # A class that only a val image holds: inferred from train alone, training crashed after an epoch.
    raw = tmp_path / "raw"
    val_id, train_ids = "img_3", ["img_0", "img_1", "img_2"]
    (tmp_path / "val.txt").write_text(val_id + "\n")
    for image_id in [*train_ids, val_id]:
        mask = np.zeros((8, 8), np.uint8)
        mask[:4] = 3 if image_id == val_id else 1
        _png(str(raw / "images" / f"{image_id}.png"), np.full((8, 8, 3), 100, np.uint8))
        _png(str(raw / "masks" / f"{image_id}.png"), mask)
    info = ingest(IngestConfig(source=str(raw), destination=str(tmp_path / "ds"), val_ids=str(tmp_path / "val.txt"))).info
    assert info.splits == {"train": 3, "val": 1} and info.val_ids == [val_id]
    assert info.num_classes == 4, info.class_names
    assert info.pixel_frequency["class_3"] == 0.0  # frequencies stay those of the train split


def test_duplicate_ids_and_lossy_masks_are_set_aside(tmp_path):
    raw = tmp_path / "raw"
    image, mask = np.full((8, 8, 3), 90, np.uint8), np.zeros((8, 8), np.uint8)
    for name in ("a.png", "a.jpg", "b.png", "c.png"):
        if name.endswith(".png"):
            _png(str(raw / "images" / name), image)
        else:
            (raw / "images" / name).write_bytes(cv2.imencode(".jpg", image)[1].tobytes())
    for name in ("a.png", "b.png"):
        _png(str(raw / "masks" / name), mask)
    (raw / "masks" / "c.jpg").write_bytes(cv2.imencode(".jpg", mask)[1].tobytes())
    result = ingest(IngestConfig(source=str(raw), destination=str(tmp_path / "ds"), val_fraction=0.0))
    reasons = {os.path.relpath(u, raw): r for u, r in result.errors}
    assert "shared by 2 files in images/ (a.jpg, a.png); every copy is set aside" in reasons["images/a.png"]
    assert "shared by 2 files" in reasons["images/a.jpg"]
    assert "mask has no image" in reasons["masks/a.png"]  # its image was set aside
    assert "must be lossless" in reasons["masks/c.jpg"]
    assert result.info.splits["train"] == 1  # b alone


def test_symlinks_do_not_lead_out_of_the_source_nor_loop(tmp_path):
    raw, outside = tmp_path / "raw", tmp_path / "outside"
    image, mask = np.full((8, 8, 3), 90, np.uint8), np.zeros((8, 8), np.uint8)
    _png(str(raw / "images" / "a.png"), image)
    _png(str(raw / "masks" / "a.png"), mask)
    _png(str(outside / "secret.png"), image)
    os.symlink(outside / "secret.png", raw / "images" / "leak.png")
    os.symlink(raw, raw / "images" / "loop")  # a loop: listing it followed would never end
    os.symlink(raw / "images" / "a.png", raw / "images" / "b.png")  # inside the source: fine
    _png(str(raw / "masks" / "b.png"), mask)
    result = ingest(IngestConfig(source=str(raw), destination=str(tmp_path / "ds"), val_fraction=0.0))
    assert result.info.splits["train"] == 2
    reasons = " ".join(r for _, r in result.errors)
    assert "leak.png: a symbolic link to" in reasons and "outside" in reasons
    assert "loop: a symbolic link to a folder" in reasons


def _huge_png_header(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims ``width`` x ``height``: decoding it would allocate that much."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_images_over_max_pixels_are_set_aside_before_decoding(tmp_path):
    raw = tmp_path / "raw"
    for image_id, side in (("small", 16), ("big", 32)):
        _png(str(raw / "images" / f"{image_id}.png"), np.full((side, side, 3), 90, np.uint8))
        _png(str(raw / "masks" / f"{image_id}.png"), np.zeros((side, side), np.uint8))
    (raw / "images" / "bomb.png").write_bytes(_huge_png_header(60_000, 60_000))  # 3.6 Gpixel: ~190 GB to decode
    _png(str(raw / "masks" / "bomb.png"), np.zeros((16, 16), np.uint8))
    result = ingest(IngestConfig(source=str(raw), destination=str(tmp_path / "ds"), val_fraction=0.0, max_pixels=300))
    reasons = {os.path.relpath(u, raw): r for u, r in result.errors}
    assert "too large: 60000x60000 = 3,600,000,000 pixels, over the limit of 300" in reasons["images/bomb.png"]
    assert "too large: 32x32 = 1,024 pixels" in reasons["images/big.png"]
    assert result.info.splits["train"] == 1  # small
    # The limit is recorded with the dataset.
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["config"]["max_pixels"] == 300


def test_images_of_every_dtype_share_one_scale(tmp_path):
    """8-bit, 16-bit and float files of one picture give the same values, statistics and dtype record."""
    raw = tmp_path / "raw"
    picture = np.random.default_rng(4).integers(0, 256, (12, 10, 3)).astype(np.uint8)
    mask = np.zeros((12, 10), np.uint8)
    mask[3:7] = 1
    bgr = picture[..., ::-1]
    (raw / "images").mkdir(parents=True)
    cv2.imwrite(str(raw / "images" / "p8.png"), bgr)
    cv2.imwrite(str(raw / "images" / "p16.png"), bgr.astype(np.uint16) * 257)
    cv2.imwrite(str(raw / "images" / "pf.tiff"), bgr.astype(np.float32) / 255.0)
    for name in ("p8", "p16", "pf"):
        _png(str(raw / "masks" / f"{name}.png"), mask)
    for name in ("p8.png", "p16.png", "pf.tiff"):
        decoded = decode_image((raw / "images" / name).read_bytes())
        np.testing.assert_allclose(decoded, picture, atol=1e-4, err_msg=name)
    # The file's own dtype is kept when asked for.
    assert decode_image((raw / "images" / "p16.png").read_bytes(), keep_dtype=True).dtype == np.uint16
    result = ingest(IngestConfig(source=str(raw), destination=str(tmp_path / "ds"), val_fraction=0.0))
    assert result.errors == [] and result.info.splits["train"] == 3
    # Three copies of one picture: the statistics are the picture's own (16-bit ones were 257x off before).
    np.testing.assert_allclose(result.info.mean, picture.reshape(-1, 3).mean(0), rtol=1e-5)
    np.testing.assert_allclose(result.info.std, picture.reshape(-1, 3).std(0), rtol=1e-4)
    recorded = json.loads((tmp_path / "ds" / "dataset.json").read_text())["extra"]
    assert recorded["dtypes"] == {"float32": 1, "uint16": 1, "uint8": 1}
    assert recorded["value_range"] == "0..255" and "uint16 /257" in recorded["value_rule"]


def test_chunk_tasks_send_sums_not_a_row_per_image(tmp_path):
    """The driver's memory must not grow with the images: a chunk returns its rejects and one row of sums."""
    from segray.data.ingest import _ChunkWriter, _Stats, chunk_items, plan_chunks
    from segray.data.layouts import list_pairs

    raw = str(tmp_path / "raw")
    synthesize(raw, n=30, size=(16, 16), num_classes=3, seed=1, show_progress=False)
    os.remove(os.path.join(raw, "images", sorted(os.listdir(os.path.join(raw, "images")))[0]))
    with open(os.path.join(raw, "images", "zz_bad.png"), "wb") as f:
        f.write(b"not a png")
    _png(os.path.join(raw, "masks", "zz_bad.png"), np.zeros((16, 16), np.uint8))
    plan = list_pairs(raw, "ids", None, 3)
    bounds = plan_chunks(plan, 128, min_chunks=2)
    assert len(bounds) == 2 and bounds[0][0] == 0 and bounds[-1][1] == len(plan.pairs) == 30
    items = chunk_items(plan, raw, bounds, val={p.image_id for p in plan.pairs[:5]})
    writer = _ChunkWriter(str(tmp_path / "ds"), "ids", None, "r1", 10**6)
    rows = [row for item in items for row in writer(item)]
    sums = [r for r in rows if r["stats"]]
    rejects = [r for r in rows if not r["stats"]]
    assert len(sums) == 2  # one per chunk, whatever the number of images in it
    assert len(rejects) == 1 and rejects[0]["uri"].endswith("zz_bad.png")
    total = _Stats()
    for r in sums:
        total.merge(r["stats"])
    assert sum(total.images.values()) == 29 and total.dtypes == {"uint8": 29}
    assert total.images["val"] == 5 and sorted(total.val_ids) == sorted(p.image_id for p in plan.pairs[:5])
    assert sum(int(v.sum()) for v in total.class_pixels.values()) == 29 * 16 * 16


def test_folder_index_gives_back_every_uri_and_size(tmp_path):
    from segray.data.layouts import index_folder

    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    names = ["a.png", "B.PNG", "sub/c.tif", "sub/deeper/d.jpeg", "png.png"]
    for k, name in enumerate(names):
        (root / name).write_bytes(b"x" * (k + 1))
    errors: list = []
    index = index_folder(str(root), "images", errors)
    assert errors == []
    got = {k: (index[k].uri, index[k].size) for k in index}
    assert got == {os.path.splitext(n)[0]: (str(root / n), k + 1) for k, n in enumerate(names)}


def test_val_count_is_the_rounded_fraction_and_leaves_both_splits_something():
    from segray.data.ingest import val_count

    assert [val_count(27, 0.1), val_count(24, 0.25), val_count(10, 0.25), val_count(20, 0.3)] == [3, 6, 3, 6]
    assert val_count(2, 0.1) == 1 and val_count(30, 0.01) == 1  # at least one when asked for any
    assert val_count(1, 0.5) == 0 and val_count(5, 0.0) == 0 and val_count(2, 0.9) == 1  # never every image


def test_val_split_is_exact_on_a_small_set_and_stable(tmp_path, capsys):
    # The EPFL train set's size: --val-fraction 0.1 gave 7 of 27 images (26%) by comparing each hash with the fraction.
    raw = str(tmp_path / "raw")
    synthesize(raw, n=27, size=(8, 8), num_classes=3, seed=4, show_progress=False)
    assert cli_main(["ingest", raw, str(tmp_path / "a"), "--val-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "splits: train 24, val 3 (11.1% val; asked 0.1: round(0.1 x 27) = 3 by hash rank)" in out, out
    a = load_dataset_info(str(tmp_path / "a"))
    assert a.splits == {"train": 24, "val": 3} and len(a.val_ids) == 3
    assert sorted(read_split_table(str(tmp_path / "a"), "val")["image_id"].to_pylist()) == a.val_ids
    assert a.extra["split"] == {"rule": "hash-rank", "fraction": 0.1, "seed": 0, "listed": 27, "assigned_val": 3, "val": 3, "train": 24}
    # The same ids give the same split; another seed draws another split of the same size.
    again = ingest(IngestConfig(source=raw, destination=str(tmp_path / "b"), val_fraction=0.1)).info
    other = ingest(IngestConfig(source=raw, destination=str(tmp_path / "c"), val_fraction=0.1, split_seed=7)).info
    assert again.val_ids == a.val_ids
    assert other.splits == a.splits and other.val_ids != a.val_ids and other.config["split_seed"] == 7


def test_val_ids_pin_the_split_and_name_what_they_miss(tmp_path, capsys):
    raw = str(tmp_path / "raw")
    synthesize(raw, n=10, size=(8, 8), num_classes=3, seed=4, show_progress=False)
    pinned = tmp_path / "published-val.txt"
    pinned.write_text("img_000002\n\nimg_000007\nnot_here\n")
    with pytest.warns(UserWarning, match=r"1 of its 3 ids are not in the source .*\(not_here\)"):
        info = ingest(IngestConfig(source=raw, destination=str(tmp_path / "a"), val_ids=str(pinned))).info
    assert info.val_ids == ["img_000002", "img_000007"] and info.splits == {"train": 8, "val": 2}
    assert "pinned by" in info.describe("a") and "1 of its 3 ids not in the source" in info.describe("a")
    pinned.write_text("nothing\nmatches\n")
    assert cli_main(["ingest", raw, str(tmp_path / "b"), "--val-ids", str(pinned)]) == 2
    err = capsys.readouterr().err
    assert f"--val-ids {pinned}: none of its 2 ids is in the source" in err, err
    assert not (tmp_path / "b").exists()  # refused before anything was written


def _layer(name: str, image_id: str) -> np.ndarray:
    return cv2.imread(os.path.join(EPFL_MINI, name, image_id + ".png"), cv2.IMREAD_UNCHANGED)[..., :3].max(2) > 127


def test_per_class_ingest_reports_what_the_priority_leaves_of_each_layer(tmp_path, capsys):
    # The mitochondrial boundaries lie on the mitochondria: listed after them, they keep almost nothing.
    wrong = ["membranes", "mitochondrion", "mitochondrial boundaries", "PSD", "vesicles", "axon"]
    common = dict(source=EPFL_MINI, layout="per-class", images_dir="slices", val_fraction=0.0)
    with pytest.warns(UserWarning, match=r"class 'mitochondrial boundaries' keeps .* 'mitochondrion' lies on") as caught:
        info = ingest(IngestConfig(destination=str(tmp_path / "wrong"), class_order=wrong, **common)).info
    flagged = [str(w.message) for w in caught if "keeps" in str(w.message)]
    assert len(flagged) == 1, flagged
    survival = info.extra["layer_survival"]
    # An independent count from the layer files: boundary pixels outside the higher-priority layers.
    ids = ["training0000", "training0001", "training0002"]
    bound = sum(int(_layer("mitochondrial boundaries", i).sum()) for i in ids)
    kept = sum(int((_layer("mitochondrial boundaries", i) & ~_layer("membranes", i) & ~_layer("mitochondrion", i)).sum()) for i in ids)
    under = sum(int((_layer("mitochondrial boundaries", i) & ~_layer("membranes", i) & _layer("mitochondrion", i)).sum()) for i in ids)
    assert survival["mitochondrial boundaries"]["layer_pixels"] == bound
    assert survival["mitochondrial boundaries"]["kept"] == pytest.approx(kept / bound) and kept / bound < 0.5
    assert survival["mitochondrial boundaries"]["covered_by"]["mitochondrion"] == pytest.approx(under / bound)
    assert survival["membranes"]["kept"] == 1.0  # first in the priority
    assert "<- under half kept" in info.describe("wrong")
    # Boundaries first: every class keeps more than half of its layer, and nothing is flagged.
    right = ["mitochondrial boundaries", "PSD", "vesicles", "mitochondrion", "membranes", "axon"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(["ingest", EPFL_MINI, str(tmp_path / "right"), "--layout", "per-class", "--images-dir", "slices",
                         "--class-order", ",".join(wrong), "--priority", ",".join(right), "--val-fraction", "0"]) == 0
    assert not [w for w in caught if "keeps" in str(w.message)]
    assert "share of each class layer's pixels kept" in capsys.readouterr().out
    kept_right = load_dataset_info(str(tmp_path / "right")).extra["layer_survival"]
    assert kept_right["mitochondrial boundaries"]["kept"] == 1.0
    assert all(s["kept"] > 0.5 for s in kept_right.values()), kept_right


# The `segray` command as a user runs it (sys.argv is the command line recorded and echoed).
SEGRAY = [sys.executable, "-c", "import sys; from segray.cli import main; sys.exit(main(sys.argv[1:]))"]


@pytest.mark.slow  # a real `segray` process started and killed: its imports take most of the time
def test_an_interrupted_ingest_is_named_with_its_source_and_the_command_that_replaces_it(ray_cluster, tmp_path, monkeypatch, capsys):
    raw, other, dst = str(tmp_path / "raw"), str(tmp_path / "other"), str(tmp_path / "ds")
    synthesize(raw, n=60, size=(40, 40), num_classes=3, seed=8, show_progress=False)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    command = ["ingest", raw, dst]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([*SEGRAY, *command], env=env, stdout=log, stderr=subprocess.STDOUT)
        train = os.path.join(dst, "train")
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(train) and any(n.endswith(".parquet") for n in os.listdir(train)):
                break
            time.sleep(0.02)
        finished = proc.poll() is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not finished, open(tmp_path / "killed.log").read()[-3000:]
    assert os.path.exists(os.path.join(dst, "_segray.json")) and not os.path.exists(os.path.join(dst, "dataset.json"))
    left = sorted(os.path.relpath(os.path.join(d, f), dst) for d, _, fs in os.walk(dst) for f in fs)

    # The same command says what is there and what to run.
    monkeypatch.setattr(sys, "argv", ["segray", *command])  # what the shell gives `segray`
    assert cli_main(command) == 2
    err = capsys.readouterr().err
    assert f"DESTINATION {dst} holds an interrupted ingest of the same SOURCE {raw}:" in err, err
    assert f"to replace it, run `segray {' '.join(command)} --overwrite`" in err, err
    # Another source into the same DESTINATION is told whose it is.
    synthesize(other, n=4, size=(16, 16), seed=1, show_progress=False)
    with pytest.raises(IngestError, match=rf"holds an interrupted ingest of another source, {raw} \(not `source` {other}\)"):
        ingest(IngestConfig(source=other, destination=dst))
    assert sorted(os.path.relpath(os.path.join(d, f), dst) for d, _, fs in os.walk(dst) for f in fs) == left, "nothing written"

    # --overwrite replaces it as before.
    assert cli_main([*command, "--overwrite"]) == 0
    info = load_dataset_info(dst)
    assert sum(info.splits.values()) == 60 and info.errors == 0
    killed_shards = {n for n in left if n.endswith(".parquet") and n.startswith(("train/", "val/"))}
    assert killed_shards and not killed_shards & {os.path.relpath(f.uri, dst) for f in storage.list_files(dst)}
