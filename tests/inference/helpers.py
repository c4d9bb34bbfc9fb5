"""Inputs and oracles shared by the inference tests: tiny models, raw folders, numpy scores."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pandas as pd

from segray import storage
from segray.data.imageio import encode_png

CLASS_NAMES = ["background", "circle", "rectangle"]


def classes_json(names: list[str] = CLASS_NAMES) -> list[dict]:
    from segray.data.info import default_color

    return [{"id": k, "name": n, "color": default_color(k)} for k, n in enumerate(names)]


def preprocessing(size: list[int] | None, names: list[str] = CLASS_NAMES, window: list[int] | None = None) -> dict:
    return {
        **({"window": window} if window else {}),
        "model": "unet",
        "size": size,
        "fit": "resize",
        "mean": [110.0, 100.0, 90.0],
        "std": [40.0, 45.0, 50.0],
        "num_classes": len(names),
        "classes": classes_json(names),
        "ignore_index": 255,
    }


def save_keras(model, uri: str) -> None:
    """Saves a Keras model to a local path or an s3:// URI."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        with open(path, "rb") as f:
            storage.write_bytes(uri, f.read())


def tiny_unet(num_classes: int = 3, seed: int = 0):
    import keras

    from segray import models

    keras.utils.set_random_seed(seed)
    return models.build("unet", num_classes, width=8, depth=2)


def write_run(root: str, size: list[int] | None, seed: int = 0, window: list[int] | None = None) -> str:
    """A training run's model/ folder (tiny U-Net + preprocessing.json, with ``window`` if given); returns the run URI."""
    save_keras(tiny_unet(seed=seed), storage.join(root, "model", "model.keras"))
    storage.write_text(storage.join(root, "model", "preprocessing.json"), json.dumps(preprocessing(size, window=window)))
    return root


def random_pair(rng: np.random.Generator, height: int, width: int, num_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """An image with blobs whose colour follows the class (so models predict more than one class) and its mask."""
    mask = np.zeros((height, width), np.uint8)
    for k in range(1, num_classes):
        if rng.random() < 0.8:
            y, x = rng.integers(0, height), rng.integers(0, width)
            r = max(2, min(height, width) // 4)
            yy, xx = np.ogrid[:height, :width]
            mask[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = k
    mask[rng.random((height, width)) < 0.03] = 255
    base = np.array([[90, 90, 90], [220, 40, 60], [40, 200, 70], [30, 60, 220]], np.float32)
    image = base[np.minimum(np.where(mask == 255, 0, mask), 3)] + rng.normal(0, 10, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_raw(root: str, sizes: dict[str, tuple[int, int]], seed: int = 0, masks: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ROOT/images/<id>.png (+ ROOT/masks/<id>.png); returns {id: (image, mask)}."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for image_id, (h, w) in sizes.items():
        image, mask = random_pair(rng, h, w)
        storage.write_bytes(storage.join(root, "images", f"{image_id}.png"), encode_png(image))
        if masks:
            storage.write_bytes(storage.join(root, "masks", f"{image_id}.png"), encode_png(mask))
        pairs[image_id] = (image, mask)
    return pairs


def oracle_counts(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """tp / fp / fn / support per class of one image with plain boolean masks (255 ignored)."""
    counted = truth != 255
    out = {k: np.zeros(num_classes, np.int64) for k in ("tp", "fp", "fn", "support")}
    for c in range(num_classes):
        t, p = (truth == c) & counted, (pred == c) & counted
        out["tp"][c] = int((t & p).sum())
        out["fp"][c] = int((~t & p).sum())
        out["fn"][c] = int((t & ~p).sum())
        out["support"][c] = int(t.sum())
    return out


def _score(tp: float, fp: float, fn: float) -> tuple[float, float]:
    if tp + fp + fn == 0:
        return float("nan"), float("nan")
    return tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)


def oracle_tables(pairs: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """(per_image, per_class, confusion) computed independently from {id: (truth, pred)}."""
    c = len(names)
    rows = []
    cm = np.zeros((c, c), np.int64)
    for image_id in sorted(pairs):
        truth, pred = pairs[image_id]
        counts = oracle_counts(truth, pred, c)
        for k in range(c):
            i, d = _score(*(counts[x][k] for x in ("tp", "fp", "fn")))
            rows.append({"image_id": image_id, "class_id": k, "class_name": names[k], **{x: counts[x][k] for x in ("tp", "fp", "fn", "support")}, "iou": i, "dice": d})
        counted = truth != 255
        for t, p in zip(truth[counted].tolist(), pred[counted].tolist()):
            cm[t, p] += 1
    per_image = pd.DataFrame(rows)
    per_class = []
    for k in range(c):
        tp, fp, fn = cm[k, k], cm[:, k].sum() - cm[k, k], cm[k, :].sum() - cm[k, k]
        i, d = _score(tp, fp, fn)
        absent = tp + fp + fn == 0
        prec = float("nan") if absent else (tp / (tp + fp) if tp + fp else 0.0)
        rec = float("nan") if absent else (tp / (tp + fn) if tp + fn else 0.0)
        per_class.append({"class_id": k, "class_name": names[k], "iou": i, "dice": d, "precision": prec, "recall": rec, "support": int(cm[k].sum())})
    return per_image, pd.DataFrame(per_class), cm


def assert_frames_match(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Equal values column by column (ints exact, floats to 1e-12, NaN where NaN)."""
    actual = actual.reset_index(drop=True)
    expected = expected.reset_index(drop=True)
    assert list(actual.columns) == list(expected.columns), (list(actual.columns), list(expected.columns))
    assert len(actual) == len(expected), (len(actual), len(expected))
    for col in expected.columns:
        a, e = actual[col].to_numpy(), expected[col].to_numpy()
        if np.issubdtype(np.asarray(e).dtype, np.floating) or col in ("iou", "dice", "precision", "recall"):
            np.testing.assert_allclose(a.astype(float), e.astype(float), rtol=0, atol=1e-12, err_msg=col)
        else:
            assert a.tolist() == e.tolist(), col
