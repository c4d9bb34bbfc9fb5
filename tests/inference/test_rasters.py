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

    # Killed mid-run: two chunks' records gone (their zarr chunks may be half written); the rerun does only those.
    parts = sorted(f.uri for f in storage.list_files(os.path.join(out, "_chunks")))
    for p in parts[:2]:
        os.remove(p)
    again = segray.predict(cfg)
    assert again.summary["chunks_this_run"] == 2
    np.testing.assert_array_equal(_pred_from_zarr(mask_uri), pred)
    np.testing.assert_array_equal(again.per_class["iou"].to_numpy(), before["iou"].to_numpy())
