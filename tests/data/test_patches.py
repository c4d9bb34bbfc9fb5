"""Patch sampling of the plan's recipe: exact crops, image and mask kept aligned, foreground oversampling."""

from __future__ import annotations

import numpy as np

from segray.config import AUGMENTATIONS
from segray.data.transforms import augment_intensity, class_pixels, sample_patch
from segray.training.losses import class_weights_from_frequency

SPATIAL = ("flip", "rot90", "scale", "rotate", "elastic")


def labelled(h: int = 96, w: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Blocky labels 0..3 and an image whose every pixel is 40 x its label (so alignment can be read off)."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 4, (h // 16, w // 16)), np.ones((16, 16), np.int64)).astype(np.uint8)
    image = np.repeat((mask * 40)[..., None], 3, axis=2).astype(np.uint8)
    return image, mask


def test_without_augmentation_a_patch_is_an_exact_crop_around_its_centre():
    image, mask = labelled()
    image = np.random.default_rng(1).integers(0, 255, image.shape, dtype=np.uint8)
    for seed in range(20):
        patch, labels = sample_patch(image, mask, (32, 48), np.random.default_rng(seed))
        # Find where it came from: the centre lies inside, so a fully inside crop matches a window.
        hits = [(y, x) for y in range(0, 96 - 31) for x in range(0, 128 - 47)
                if np.array_equal(image[y:y + 32, x:x + 48], patch) and np.array_equal(mask[y:y + 32, x:x + 48], labels)]
        inside = patch.shape == (32, 48, 3) and labels.shape == (32, 48)
        assert inside and patch.dtype == np.uint8 and labels.dtype == np.uint8
        if hits:
            return
    raise AssertionError("no patch of 20 was an exact crop of the image")


def test_spatial_augmentation_moves_image_and_mask_together_and_invents_no_label():
    image, mask = labelled()
    agree = []
    for seed in range(30):
        patch, labels = sample_patch(image, mask, (64, 64), np.random.default_rng(seed), SPATIAL, strength=1.0)
        assert set(np.unique(labels)) <= set(np.unique(mask))  # nearest: no blended label
        # Away from label edges the linear image equals 40 x the label there.
        agree.append(np.mean(np.abs(patch[..., 0].astype(int) - labels.astype(int) * 40) <= 2))
    assert np.mean(agree) > 0.9, agree


def test_oversampling_centres_patches_on_a_rare_class():
    mask = np.zeros((256, 256), np.uint8)
    mask[200:204, 30:34] = 2  # 16 pixels of 65536
    image = np.zeros((256, 256, 3), np.uint8)
    fg = class_pixels(mask)
    seen = {share: np.mean([2 in sample_patch(image, mask, (32, 32), np.random.default_rng(s), (), 1.0, share, fg)[1] for s in range(200)])
            for share in (0.0, 0.5, 1.0)}
    assert seen[1.0] == 1.0 and 0.3 < seen[0.5] < 0.75 and seen[0.0] < 0.1, seen


def test_rare_class_draw_centres_more_patches_on_the_rarer_present_class():
    mask = np.zeros((256, 256), np.uint8)
    mask[:, :128] = 1  # common: half the image
    mask[200:204, 200:204] = 2  # rare: 16 pixels
    image = np.zeros((256, 256, 3), np.uint8)
    fg = class_pixels(mask)
    assert sorted(fg) == [1, 2] and len(fg[2]) == 16
    draw = tuple(class_weights_from_frequency([0.5, 0.45, 0.05]))  # as `rare` draws: class 2 is 9x rarer, drawn 3x as often
    assert abs(draw[2] / draw[1] - 3.0) < 1e-9

    def centred_on_rare(class_draw) -> float:
        hits = []
        for s in range(300):
            _, labels = sample_patch(image, mask, (16, 16), np.random.default_rng(s), (), 1.0, 1.0, fg, class_draw)
            hits.append(labels[8, 8] == 2)
        return float(np.mean(hits))

    uniform, rare = centred_on_rare(()), centred_on_rare(draw)
    assert 0.4 < uniform < 0.6 and 0.65 < rare < 0.85, (uniform, rare)  # 1/2 and 3/4 expected


def test_intensity_augmentation_keeps_shape_dtype_and_changes_values():
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    changed = 0
    for seed in range(10):
        out = augment_intensity(image, np.random.default_rng(seed), AUGMENTATIONS, 1.0)
        assert out.shape == image.shape and out.dtype == np.uint8
        changed += not np.array_equal(out, image)
    assert changed >= 8
    assert np.array_equal(augment_intensity(image, np.random.default_rng(0), AUGMENTATIONS, 0.0), image)
