"""Gaussian sliding windows, flip TTA and small-component removal (no Ray: the predictor class directly)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from segray.inference.components import remove_small_components
from segray.inference.geometry import GAUSSIAN_SIGMA, Geometry, fit_image, gaussian_profile, tiled_argmax, tiled_logits
from segray.inference.pipeline import geometry_of
from segray.inference.predictor import Predictor
from segray.runs import ModelSpec
from tests.inference.helpers import save_keras


def pixelwise(batch: np.ndarray) -> np.ndarray:
    """A translation- and flip-equivariant 'model': each pixel's 3 logits from its own RGB only."""
    r, g, b = batch[..., 0], batch[..., 1], batch[..., 2]
    return np.stack([r - g, np.sin(b) + 0.5 * r, g * b], axis=-1).astype(np.float32)


@pytest.mark.parametrize("shape", [(45, 77), (16, 16), (10, 13), (33, 17)])
def test_gaussian_windows_reproduce_the_whole_image_of_a_per_pixel_model(shape):
    image = np.random.default_rng(0).normal(size=shape + (3,)).astype(np.float32)
    whole = pixelwise(image[None])[0]
    strips = list(tiled_logits(pixelwise, image, (16, 16), (8, 8), 3))  # (10, 13): smaller than a window
    tiled = np.concatenate([s for _, s in strips])
    assert tiled.shape == whole.shape
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    np.testing.assert_array_equal(tiled_argmax(pixelwise, image, (16, 16), (8, 8), 3), whole.argmax(-1))


def test_gaussian_profile_is_nnunets():
    w = gaussian_profile(64)
    assert w.shape == (64,) and np.allclose(w, w[::-1]) and w.max() <= 1.0
    # Pixel 40's centre lies 8.5 px (sigma = 64 / 8 = 8, plus half a pixel) right of the window's middle.
    np.testing.assert_allclose(w[40], np.exp(-0.5 * (8.5 / (64 * GAUSSIAN_SIGMA)) ** 2), rtol=1e-6)
    assert 0 < w[0] < 1e-3


def test_gaussian_weights_the_window_centre_over_its_border():
    """Two windows that disagree: each pixel of the overlap takes more from the window whose centre is nearer."""
    image = np.zeros((16, 24, 3), np.float32)
    calls = []

    def left_zero_right_one(batch):
        calls.append(len(batch))
        out = np.zeros(batch.shape[:3] + (1,), np.float32)
        return out + np.arange(len(batch), dtype=np.float32)[:, None, None, None]  # window k predicts k

    blended = np.concatenate([s for _, s in tiled_logits(left_zero_right_one, image, (16, 16), (8, 8), 2)])[0, :, 0]
    assert calls == [2]
    np.testing.assert_array_equal(blended[:8], 0.0)  # only the left window
    np.testing.assert_array_equal(blended[16:], 1.0)  # only the right one
    overlap = blended[8:16]
    assert (np.diff(overlap) > 0).all() and overlap[3] < 0.5 < overlap[4]  # symmetric about the overlap's middle
    np.testing.assert_allclose(overlap + overlap[::-1], 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 1x1-conv model (flip-equivariant) and a 3x3-conv one (not), saved as .keras files."""
    import keras

    root = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    paths = {}
    for name, k in (("pointwise", 1), ("skewed", 3)):
        model = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(6, k, padding="same", activation="tanh"), keras.layers.Conv2D(3, 1)])
        paths[name] = str(root / f"{name}.keras")
        save_keras(model, paths[name])
        paths[name + "_model"] = model
    return paths


def predictor(models, name: str, geometry: Geometry, batch_size: int = 4) -> Predictor:
    return Predictor(models[name], geometry, batch_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def masks_of(pred: Predictor, images: list[np.ndarray], sizes: list[tuple[int, int]] | None = None) -> list[np.ndarray]:
    """The masks ``Predictor`` returns for images as ``ReadDecode`` hands them over."""
    n = len(images)
    sizes = sizes or [im.shape[:2] for im in images]
    batch = {
        "image_id": np.asarray([str(k) for k in range(n)], dtype=object),
        "uri": np.asarray([f"image {k}" for k in range(n)], dtype=object),
        "error": np.asarray([""] * n, dtype=object),
        "height": np.asarray([h for h, _ in sizes], np.int64),
        "width": np.asarray([w for _, w in sizes], np.int64),
        "image": images,
        "truth": [np.zeros((0, 0), np.uint8)] * n,
        "original": [np.zeros((0, 0, 3), np.uint8)] * n,
    }
    out = pred(batch)
    assert list(out["error"]) == [""] * n, list(out["error"])
    return list(out["pred"])


def test_flip_tta_of_a_flip_equivariant_model_equals_one_view(models):
    images = np.random.default_rng(1).integers(0, 256, (3, 20, 20, 3)).astype(np.uint8)
    one = predictor(models, "pointwise", Geometry("whole")).logits(images)
    for tta in ("flip", "flip8"):
        np.testing.assert_allclose(predictor(models, "pointwise", Geometry("whole", tta=tta)).logits(images), one, atol=1e-5)


def test_flip_tta_is_the_mean_of_the_views_flipped_back(models):
    """A 3x3 conv is not flip-equivariant: TTA is the mean of its four views, each flipped by hand."""
    model = models["skewed_model"]
    images = np.random.default_rng(2).integers(0, 256, (2, 12, 20, 3)).astype(np.uint8)
    x = images.astype(np.float32)
    run = lambda v: np.asarray(model.predict_on_batch(v))  # noqa: E731
    views = [run(x), run(x[:, :, ::-1])[:, :, ::-1], run(x[:, ::-1])[:, ::-1], run(x[:, ::-1, ::-1])[:, ::-1, ::-1]]
    want = np.mean(views, axis=0)
    got = predictor(models, "skewed", Geometry("whole", tta="flip")).logits(images)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - views[0]).max() > 1e-3  # the views differ: the test could fail
    square = images[:, :12, :12]
    xs = square.astype(np.float32)
    t = lambda v: v.transpose(0, 2, 1, 3)  # noqa: E731
    eight = [run(xs), run(xs[:, :, ::-1])[:, :, ::-1], run(xs[:, ::-1])[:, ::-1], run(xs[:, ::-1, ::-1])[:, ::-1, ::-1]]
    eight += [t(run(t(v))) for v in (xs,)] + [t(run(t(xs[:, :, ::-1])))[:, :, ::-1], t(run(t(xs[:, ::-1])))[:, ::-1]]
    eight += [t(run(t(xs[:, ::-1, ::-1])))[:, ::-1, ::-1]]
    np.testing.assert_allclose(predictor(models, "skewed", Geometry("whole", tta="flip8")).logits(square), np.mean(eight, axis=0), atol=1e-5)


def test_windows_with_tta_equal_the_whole_image_for_a_per_pixel_model(models):
    """Through the predictor: tile mode (an image smaller than the window too) and fit mode with a window."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, s + (3,)).astype(np.uint8) for s in ((40, 52), (9, 14))]
    whole = masks_of(predictor(models, "pointwise", Geometry("whole")), images[:1]) + masks_of(predictor(models, "pointwise", Geometry("whole")), images[1:])
    tiled = masks_of(predictor(models, "pointwise", Geometry("tile", tile=(16, 16), overlap=(8, 8), tta="flip")), images[:1])
    tiled += masks_of(predictor(models, "pointwise", Geometry("tile", tile=(16, 16), overlap=(8, 8), tta="flip")), images[1:])
    for w, t in zip(whole, tiled):
        np.testing.assert_array_equal(t, w)
    # fit: the image fitted to 32x32 is what the windows slide over; the mask is mapped back to 40x52.
    fitted = [fit_image(images[0], (32, 32), "resize")]
    plain = masks_of(predictor(models, "pointwise", Geometry("fit", size=(32, 32))), fitted, [(40, 52)])
    slid = masks_of(predictor(models, "pointwise", Geometry("fit", size=(32, 32), tile=(16, 16), overlap=(8, 8))), fitted, [(40, 52)])
    assert slid[0].shape == (40, 52)
    np.testing.assert_array_equal(slid[0], plain[0])


def test_small_components_become_background():
    mask = np.zeros((20, 20), np.uint8)
    mask[1:3, 1:3] = 1  # 4 px of class 1: removed
    mask[10:16, 10:16] = 1  # 36 px of class 1: kept
    mask[5, 15:18] = 2  # 3 px of class 2 ...
    mask[6, 18] = 2  # ... and one touching diagonally: 4 px (8-connected), removed
    mask[17:20, 0:5] = 2  # 15 px of class 2: kept
    mask[0, 10:19] = 2  # 9 px of class 2 beside ...
    mask[1, 10:19] = 1  # ... 9 px of class 1: components are per class, both removed at 10
    out = remove_small_components(mask, 10)
    want = np.zeros_like(mask)
    want[10:16, 10:16] = 1
    want[17:20, 0:5] = 2
    np.testing.assert_array_equal(out, want)
    assert remove_small_components(mask, 9)[0, 10:19].tolist() == [2] * 9  # 9 px is not below 9
    assert remove_small_components(mask, 0) is mask
    background = np.zeros((4, 4), np.uint8)
    np.testing.assert_array_equal(remove_small_components(background, 100), background)  # class 0 is never removed


def test_predictor_removes_small_components(models):
    images = [np.random.default_rng(4).integers(0, 256, (24, 24, 3)).astype(np.uint8)]
    kept = masks_of(predictor(models, "pointwise", Geometry("whole")), images)[0]
    cleaned = masks_of(predictor(models, "pointwise", Geometry("whole", min_component=6)), images)[0]
    np.testing.assert_array_equal(cleaned, remove_small_components(kept, 6))
    assert (cleaned != kept).any()  # random pixels make small components: the test could fail


def spec(**kw) -> ModelSpec:
    base = dict(uri="m.keras", preprocessing_uri=None, model_id="x", name="unet", classes=(), size=None, fit="resize",
                mean=(0.0,) * 3, std=(1.0,) * 3, ignore_index=255, multiple=4, static_size=None)
    return ModelSpec(**{**base, **kw})


def test_the_models_window_is_the_default_and_flags_win():
    g = geometry_of(spec(window=(64, 48)))
    assert (g.mode, g.tile, g.overlap, g.weighting) == ("tile", (64, 48), (32, 24), "gaussian")
    g = geometry_of(spec(window=(64, 64), size=(128, 96)))
    assert (g.mode, g.size, g.tile, g.overlap) == ("fit", (128, 96), (64, 64), (32, 32))
    assert geometry_of(spec(window=(64, 64), size=(64, 64))) == Geometry("fit", size=(64, 64), multiple=4)
    g = geometry_of(spec(window=(64, 64)), tile=[32, 32], overlap=0.25, tta="flip")
    assert (g.mode, g.tile, g.overlap, g.tta) == ("tile", (32, 32), (8, 8), "flip")
    with pytest.raises(ValueError, match="^tta flip8: .*the tile 64x48 is not"):
        geometry_of(spec(window=(64, 48)), tta="flip8")
    with pytest.raises(ValueError, match="^tta flip8: .*the size 32x16 is not"):
        geometry_of(spec(size=(32, 16)), tta="flip8")
    assert geometry_of(spec(), tta="flip8").tta == "flip8"  # whole images: any size


def test_lineage_names_new_settings_only_when_they_matter():
    plain = Geometry("fit", size=(32, 32), multiple=4)
    # What OUT/_run.json held before windows, TTA and components existed: such OUTs still resume.
    assert plain.lineage() == {"mode": "fit", "size": [32, 32], "fit": "resize", "multiple": 4, "tile": None, "overlap": [0, 0]}
    assert dataclasses.replace(plain, tta="flip", min_component=5).lineage() == {**plain.lineage(), "tta": "flip", "min_component": 5}
    tiled = Geometry("tile", multiple=4, tile=(16, 16), overlap=(8, 8))
    assert tiled.lineage()["weighting"] == "gaussian"
    assert tiled.lineage() != dataclasses.replace(tiled, weighting="linear").lineage()
