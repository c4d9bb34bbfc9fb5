"""Rasters larger than memory (issue 28): windows read from TIFF/Zarr, chunked predict equal to the in-memory sliding window."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from segray import storage
from segray.data.rasters import open_raster, synthetic_tile, write_synthetic_raster
from segray.inference.geometry import Geometry, tiled_full
from segray.inference.rasters import ChunkPlan, RasterEntry, border_overhead, chunk_logits, raster_inputs
from tests.inference.helpers import write_run


def test_synthetic_raster_reads_back_by_windows_as_generated(tmp_path):
    image_uri, truth_uri = write_synthetic_raster(str(tmp_path), 300, 520, num_classes=3, tile=128, show_progress=False)
    image, truth = synthetic_tile(0, 0, 300, 520, 3)
    raster = open_raster(image_uri)
    assert raster.shape == (300, 520) and raster.channels == 3
    # A window across tile borders decodes to the generated pixels.
    assert np.array_equal(raster.read(100, 290, 60, 400), image[100:290, 60:400])
    assert np.array_equal(open_raster(truth_uri).read(0, 300, 0, 520)[..., 0], truth)
    # Shapes of every class are there for a model to learn.
    assert set(np.unique(truth)) == {0, 1, 2}
    assert raster_inputs(str(tmp_path / "images")) == [image_uri]
    assert raster_inputs(image_uri) == [image_uri]
    assert raster_inputs(f"{image_uri}, {truth_uri}") == [image_uri, truth_uri]
    # Today's inputs keep their meaning: a raw layout (images/ + masks/) is not a raster folder, even with TIFFs in it.
    assert raster_inputs(str(tmp_path)) is None


def test_pyramidal_tiff_and_zarr_levels_are_read(tmp_path):
    import tifffile
    import zarr

    data = np.arange(256 * 192, dtype=np.uint16).reshape(256, 192)
    path = str(tmp_path / "pyr.ome.tif")
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(data, tile=(64, 64), subifds=1, metadata={"axes": "YX"})
        tif.write(data[::2, ::2], tile=(64, 64), subfiletype=1)
    raster = open_raster(path)
    assert len(raster.levels) == 2 and raster.level_shape(1) == (128, 96)
    assert np.array_equal(raster.read(10, 70, 20, 90, level=1)[..., 0], data[::2, ::2][10:70, 20:90])
    z = zarr.open_array(str(tmp_path / "planar.zarr"), mode="w", shape=(3, 100, 80), chunks=(3, 32, 32), dtype="uint8")
    planar = np.random.default_rng(0).integers(0, 255, (3, 100, 80), dtype=np.uint8)
    z[:] = planar
    assert np.array_equal(open_raster(str(tmp_path / "planar.zarr")).read(5, 50, 7, 77), np.moveaxis(planar, 0, -1)[5:50, 7:77])


def test_bad_raster_is_named(tmp_path):
    bad = tmp_path / "broken.ome.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match="broken.ome.tif"):
        open_raster(str(bad))


@pytest.mark.parametrize("weighting", ["gaussian", "linear"])
def test_chunk_logits_equal_the_whole_image_sliding_window(weighting):
    # A deterministic "model" whose logits depend on the window's pixels and on the position inside the window,
    # so a wrong window grid, weight or blend order shows.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (150, 230, 3), dtype=np.uint8)

    def predict(batch):
        b = batch.astype(np.float32)
        ramp = np.linspace(0, 1, b.shape[2], dtype=np.float32)[None, None, :, None]
        return np.concatenate([b[..., :2] * ramp, b[..., 2:] * (1 - ramp), b.mean(axis=(1, 2), keepdims=True) + 0 * b[..., :1]], -1)

    g = Geometry("tile", tile=(48, 64), overlap=(20, 31), weighting=weighting)
    whole = tiled_full(predict, image, g.tile, g.overlap, 5, None, weighting)
    plan = ChunkPlan((RasterEntry("x", "x", 150, 230),), 64)
    read = lambda y0, y1, x0, x1: image[y0:y1, x0:x1]  # noqa: E731
    out = np.zeros_like(whole)
    for index in range(plan.total):
        raster, row, col = plan.locate(index)
        y0, y1, x0, x1 = plan.box(raster, row, col)
        out[y0:y1, x0:x1] = chunk_logits(predict, read, 150, 230, (y0, y1, x0, x1), g, 3)
    assert plan.total == 3 * 4
    np.testing.assert_array_equal(out, whole)


def test_border_overhead_of_the_defaults_is_small():
    # 2048 chunks, 256 windows at half overlap: windows straddling a border are computed twice.
    overhead = border_overhead(2048, (256, 256), (128, 128), 10_000, 10_000)
    assert 0.05 < overhead < 0.25
    assert border_overhead(10_000, (256, 256), (128, 128), 10_000, 10_000) == 0.0


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    return write_run(str(tmp_path_factory.mktemp("run")), None, window=[64, 64])


def _pred_from_zarr(uri: str) -> np.ndarray:
    return open_raster(uri).read(0, 10**9, 0, 10**9)[..., 0]


@pytest.mark.slow
def test_chunked_predict_equals_in_memory_and_resumes(ray_cluster, model_run, tmp_path):
    import segray
    from segray.config import PredictConfig
    from segray.inference.predictor import Predictor
    from segray.inference.tables import read_confusion
    from segray.metrics import confusion_matrix
    from segray.runs import resolve_model

    image_uri, truth_uri = write_synthetic_raster(str(tmp_path / "syn"), 200, 330, num_classes=3, tile=64, show_progress=False)
    out = str(tmp_path / "out")
    cfg = PredictConfig(model=model_run, input=str(tmp_path / "syn" / "images"), output=out, chunk=128, tile=[64, 64], overlap=0.5,
                        batch_size=4, workers=1, truth=str(tmp_path / "syn" / "truth"))
    result = segray.predict(cfg)
    assert result.summary["chunks"] == 2 * 3 and result.summary["chunks_this_run"] == 6
    mask_uri = result.summary["rasters"][0]["mask"]
    pred = _pred_from_zarr(mask_uri)
    # The in-memory sliding window of today's predictor on the whole image.
    spec = resolve_model(model_run)
    geometry = segray.inference.geometry_of(spec, [64, 64], 0.5)
    predictor = Predictor(spec.uri, geometry, 4, spec.model_id, mean=spec.mean, std=spec.std)
    image = open_raster(image_uri).read(0, 200, 0, 330)
    from segray.inference.geometry import tiled_argmax

    whole = tiled_argmax(predictor.logits, image, geometry.tile, geometry.overlap, 4, predictor.mean, geometry.weighting)
    assert pred.shape == whole.shape == (200, 330)
    assert np.mean(pred == whole) >= 0.9999
    # NGFF metadata and a nearest-neighbour pyramid.
    attrs = json.loads(storage.read_text(storage.join(mask_uri, ".zattrs")))
    datasets = attrs["multiscales"][0]["datasets"]
    assert len(datasets) == 2 and attrs["image-label"]["colors"][0]["label-value"] == 0
    assert np.array_equal(open_raster(mask_uri).read(0, 100, 0, 165, level=1)[..., 0], pred[::2, ::2])
    # Summed confusion of the chunks = the whole image's.
    truth = open_raster(truth_uri).read(0, 200, 0, 330)[..., 0]
    expected = confusion_matrix(truth, pred, 3, 255)
    np.testing.assert_array_equal(read_confusion(os.path.join(out, "confusion.parquet")), expected)
    per_chunk = storage.read_parquet(os.path.join(out, "raster_chunks.parquet")).to_pandas()
    assert per_chunk["pixels"].sum() == 200 * 330 and len(per_chunk) == 6 * 3
    before = result.per_class.copy()
    # The report shows an overview of the raster from the pyramid, and the worst chunks.
    from segray.config import ReportConfig
    from segray.reporting import write_report

    page = str(tmp_path / "report.html")
    write_report(ReportConfig(out=out, output=page))
    text = open(page).read()
    assert 'data-image-id="synth_200x330"' in text and "overview with mask" in text and "mean IoU" in text

    # Killed mid-run: two chunks' records gone (their zarr chunks may be half written); the rerun does only those.
    parts = sorted(f.uri for f in storage.list_files(os.path.join(out, "_chunks")))
    for p in parts[:2]:
        os.remove(p)
    again = segray.predict(cfg)
    assert again.summary["chunks_this_run"] == 2
    np.testing.assert_array_equal(_pred_from_zarr(mask_uri), pred)
    np.testing.assert_array_equal(again.per_class["iou"].to_numpy(), before["iou"].to_numpy())


def _label_image(uri: str, pred: np.ndarray, chunk: int) -> int:
    from segray.inference.rasters import create_label_image, write_chunk_levels

    levels = create_label_image(uri, *pred.shape, chunk, [(0, 0, 0), (255, 0, 0), (0, 255, 0)], "x")
    for y in range(0, pred.shape[0], chunk):
        for x in range(0, pred.shape[1], chunk):
            write_chunk_levels(uri, levels, y, x, pred[y : y + chunk, x : x + chunk])
    return levels


def test_label_pyramid_written_chunk_by_chunk_and_as_tiff(tmp_path):
    from segray.inference.rasters import write_tiff_mask

    pred = np.random.default_rng(0).integers(0, 3, (300, 520), dtype=np.uint8)
    uri = str(tmp_path / "m.ome.zarr")
    levels = _label_image(uri, pred, 128)
    assert levels == 2
    for k in range(levels):
        s = 1 << k
        assert np.array_equal(open_raster(uri).read(0, 300, 0, 520, level=k)[..., 0], pred[::s, ::s])
    tiff = str(tmp_path / "masks" / "m.ome.tif")
    write_tiff_mask(uri, tiff, tile=64)
    back = open_raster(tiff)
    assert len(back.levels) == levels
    assert np.array_equal(back.read(0, 300, 0, 520)[..., 0], pred)
    assert np.array_equal(back.read(0, 150, 0, 260, level=1)[..., 0], pred[::2, ::2])


def test_rasters_read_and_masks_written_in_object_storage(s3, tmp_path):
    import pyarrow.fs as pafs

    image_uri, _ = write_synthetic_raster(str(tmp_path), 200, 260, num_classes=3, tile=64, show_progress=False)
    bucket = s3.bucket("rasters")
    remote = storage.join(bucket, "in", "scan.ome.tif")
    fs, path = storage.filesystem(remote)
    pafs.copy_files(image_uri, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    assert raster_inputs(storage.join(bucket, "in")) == [remote]
    expected, _ = synthetic_tile(0, 0, 200, 260, 3)
    assert np.array_equal(open_raster(remote).read(30, 190, 70, 250), expected[30:190, 70:250])
    pred = np.random.default_rng(1).integers(0, 3, (200, 260), dtype=np.uint8)
    mask = storage.join(bucket, "out", "masks", "scan.ome.zarr")
    _label_image(mask, pred, 128)
    assert any(k.endswith(".zattrs") for k in s3.keys(mask))
    assert np.array_equal(open_raster(mask).read(0, 200, 0, 260)[..., 0], pred)
