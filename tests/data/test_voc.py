"""PASCAL VOC masks: colour-mapped PNGs whose palette indices are the class ids (labelme's VOC export)."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from segray import storage
from segray.cli import main as cli_main
from segray.config import EvaluateConfig, IngestConfig
from segray.data import decode_mask, encode_png, ingest, load_dataset_info
from segray.inference.evaluation import evaluate

pytestmark = pytest.mark.usefixtures("ray_cluster")

# labelme's `examples/semantic_segmentation/data_dataset_voc` (see tests/data/README.md).
LABELME_VOC = os.path.join(os.path.dirname(__file__), "labelme-voc")
IDS = ("2011_000003", "2011_000006", "2011_000025")
NAMES = open(os.path.join(LABELME_VOC, "class_names.txt")).read().splitlines()


def indices(path: str) -> np.ndarray:
    """The palette indices Pillow reads: every VOC loader's class ids."""
    with Image.open(path) as image:
        assert image.mode == "P"
        return np.asarray(image)


def voc_palette(k: int) -> tuple[int, int, int]:
    """Colour k of the PASCAL VOC colour map (bit-interleaved), as labelme writes it."""
    r = g = b = 0
    for shift in range(8):
        r |= ((k >> 0) & 1) << (7 - shift)
        g |= ((k >> 1) & 1) << (7 - shift)
        b |= ((k >> 2) & 1) << (7 - shift)
        k >>= 3
    return r, g, b


def shard_masks(dst: str) -> dict[str, np.ndarray]:
    masks = {}
    for split in ("train", "val"):
        for f in storage.list_files(storage.join(dst, split)):
            for row in storage.read_parquet(f.uri).to_pylist():
                masks[row["image_id"]] = decode_mask(row["mask"])
    return masks


def test_labelme_voc_export_ingests_with_its_class_names_and_palette(tmp_path, capsys):
    src, dst = str(tmp_path / "data_dataset_voc"), str(tmp_path / "ds")
    shutil.copytree(LABELME_VOC, src)
    # As in the export: SegmentationClass/ holds labelme's .npy arrays, SegmentationClassPNG/ the PNGs.
    os.makedirs(os.path.join(src, "SegmentationClass"))
    for i in IDS:
        open(os.path.join(src, "SegmentationClass", f"{i}.npy"), "wb").write(b"\x93NUMPY")
    # VOC's JPEGImages also holds images annotated for detection only: left out, not errors.
    shutil.copy(os.path.join(src, "JPEGImages", f"{IDS[0]}.jpg"), os.path.join(src, "JPEGImages", "2011_999999.jpg"))

    assert cli_main(["ingest", src, dst, "--layout", "voc", "--val-fraction", "0"]) == 0, capsys.readouterr().err
    info = load_dataset_info(dst)
    assert info.errors == 0 and info.layout == "voc"
    assert info.extra["images_without_mask"] == 1
    # 21 classes named by class_names.txt, coloured by the masks' palette (VOC's colour map).
    assert info.class_names == NAMES and len(NAMES) == 21
    assert [tuple(c.color) for c in info.classes] == [voc_palette(k) for k in range(21)]
    assert info.classes[15].name == "person" and tuple(info.classes[15].color) == (192, 128, 128)
    # Every mask holds the palette indices, the border 255 kept as ignore.
    masks = shard_masks(dst)
    assert sorted(masks) == list(IDS)
    for i in IDS:
        np.testing.assert_array_equal(masks[i], indices(os.path.join(src, "SegmentationClassPNG", f"{i}.png")))
    ignored = sum(int((m == 255).sum()) for m in masks.values())
    assert ignored > 0 and info.extra["ignored_pixels"] == ignored
    assert info.pixel_frequency["person"] > 0 and info.pixel_frequency["aeroplane"] == 0


def test_ids_layout_reads_palette_indices_and_colours_inferred_classes(tmp_path):
    """The same masks in the ``ids`` layout, without class_names.txt: ids inferred, colours from the palette."""
    src, dst = tmp_path / "raw", str(tmp_path / "ds")
    shutil.copytree(os.path.join(LABELME_VOC, "JPEGImages"), src / "images")
    shutil.copytree(os.path.join(LABELME_VOC, "SegmentationClassPNG"), src / "masks")
    result = ingest(IngestConfig(source=str(src), destination=dst, val_fraction=0.0))
    assert result.errors == []
    labelled = [indices(str(src / "masks" / f"{i}.png")) for i in IDS]
    highest = max(int(m[m != 255].max()) for m in labelled)
    assert highest == 18 and result.info.num_classes == highest + 1
    assert [tuple(c.color) for c in result.info.classes] == [voc_palette(k) for k in range(highest + 1)]
    masks = shard_masks(dst)
    for i in IDS:
        np.testing.assert_array_equal(masks[i], indices(str(src / "masks" / f"{i}.png")))


def test_decode_mask_keeps_the_indices_of_every_bit_depth():
    from segray.data.imageio import png_palette

    ids = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    # Colours chosen so that no colour channel equals the index.
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90)]
    for bits in (2, 4, 8):
        image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
        image.putpalette([v for c in colours for v in c] + [7] * 3 * (256 - len(colours)))  # Pillow writes 2**bits entries
        buf = io.BytesIO()
        image.save(buf, format="PNG", bits=bits)
        data = buf.getvalue()
        assert data[24] == bits and data[25] == 3, "an indexed PNG of this bit depth"
        np.testing.assert_array_equal(decode_mask(data), ids)
        assert png_palette(data)[:4] == colours
    assert png_palette(encode_png(ids)) is None  # a grey PNG has no palette


def test_evaluate_reads_a_colour_mapped_truth_mask_as_class_ids(tmp_path):
    """Truth masks straight from VOC (colour-mapped), predictions as segray writes them (one channel)."""
    pred, out = str(tmp_path / "pred"), str(tmp_path / "out")
    truth = os.path.join(LABELME_VOC, "SegmentationClassPNG")
    for i in IDS:
        ids = indices(os.path.join(truth, f"{i}.png"))
        # A perfect prediction, except that it predicts background where the truth says ignore.
        storage.write_bytes(f"{pred}/{i}.png", encode_png(np.where(ids == 255, 0, ids).astype(np.uint8)))
    result = evaluate(EvaluateConfig(pred=pred, truth=truth, output=out))
    assert result.errors == []
    assert result.summary["images_scored"] == 3
    assert result.summary["pixel_accuracy"] == 1.0 and result.summary["miou"] == 1.0
    present = set(result.per_class.loc[result.per_class["iou"].notna(), "class_name"])
    assert present == {f"class_{k}" for k in (0, 5, 6, 7, 9, 15, 18)}
