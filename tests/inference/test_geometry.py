"""Fitting, padding and tiling: logits mapped back to each image's size."""

from __future__ import annotations

import numpy as np
import pytest

from segray.inference.geometry import (
    fit_image,
    fitted_content,
    restore,
    tiled_argmax,
    tiled_logits,
    window_starts,
    window_weights,
)


def box_logits(batch: np.ndarray, radius: int = 1) -> np.ndarray:
    """A 'model' whose receptive field reaches ``radius`` pixels: a box mean with zero padding, 2 classes."""
    r = radius
    padded = np.pad(batch, ((0, 0), (r, r), (r, r), (0, 0)))
    h, w = batch.shape[1:3]
    k = 2 * r + 1
    mean = sum(padded[:, dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k)) / (k * k)
    return np.stack([mean[..., 0] - mean[..., 1], mean[..., 2]], axis=-1).astype(np.float32)


def assemble(image, predict, tile, overlap, batch, weighting="linear"):
    strips = list(tiled_logits(predict, image, tile, overlap, batch, weighting=weighting))
    rows = [r for r, _ in strips]
    assert rows == sorted(rows) and rows[0] == 0
    return np.concatenate([s for _, s in strips])


@pytest.mark.parametrize("length,tile,overlap", [(10, 4, 1), (64, 16, 4), (17, 16, 8), (16, 16, 4), (100, 32, 28)])
def test_windows_cover_and_weights_sum_to_one(length, tile, overlap):
    starts = window_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    total = np.zeros(length)
    for s, w in zip(starts, window_weights(starts, tile, "linear")):
        total[s : s + tile] += w
    assert (total > 0).all()
    if overlap * 2 <= tile:  # at most two windows share a pixel
        np.testing.assert_allclose(total, 1.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 56), (33, 70), (16, 16), (10, 50)])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_tiled_equals_whole_for_a_receptive_field_inside_the_overlap(shape, batch):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape + (3,)).astype(np.float32)
    whole = box_logits(image[None])[0]
    tiled = assemble(image, box_logits, (16, 16), (4, 4), batch)  # RF radius 1 = overlap / 4
    assert tiled.shape == whole.shape
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    np.testing.assert_array_equal(tiled_argmax(box_logits, image, (16, 16), (4, 4), batch, weighting="linear"), whole.argmax(-1))


def test_tiled_keras_model_matches_whole_image():
    """A small-receptive-field Keras model: one 3x3 conv then 1x1 convs."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((None, None, 3)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(8, 1, activation="relu"),
            keras.layers.Conv2D(4, 1),
        ]
    )
    image = np.random.default_rng(1).normal(size=(45, 77, 3)).astype(np.float32)
    whole = np.asarray(model.predict_on_batch(image[None]))[0]
    predict = lambda x: np.asarray(model.predict_on_batch(x))  # noqa: E731
    tiled = assemble(image, predict, (16, 24), (4, 8), 4)
    np.testing.assert_allclose(tiled, whole, atol=1e-4)
    agree = (tiled.argmax(-1) == whole.argmax(-1)).mean()
    assert agree > 0.999


def test_fit_then_restore_returns_the_original_size():
    image = np.random.default_rng(3).random((30, 50, 3)).astype(np.float32)
    for mode in ("resize", "pad"):
        fitted = fit_image(image, (32, 32), mode)
        assert fitted.shape == (32, 32, 3)
        content = fitted_content(30, 50, (32, 32), mode)
        logits = np.repeat(fitted[..., :1], 5, axis=-1)
        back = restore(logits, content, 30, 50)
        assert back.shape == (30, 50, 5)
    # pad: a smaller image sits in the top-left corner and comes back unchanged.
    small = image[:20, :25]
    content = fitted_content(20, 25, (32, 32), "pad")
    assert content == (20, 25)
    np.testing.assert_array_equal(restore(fit_image(small, (32, 32), "pad"), content, 20, 25), small)
