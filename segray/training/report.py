"""How a run shows its progress: one line per epoch in the job log, curves as a PNG."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd

PREVIEW_IMAGES = 3  # validation images shown in TensorBoard each epoch
PREVIEW_GAP = 2
IGNORED_COLOUR = (200, 200, 200)


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """One line per epoch for the job's log: where the run is and how it is doing."""
    m = metrics
    if "val_ap50" in m:  # an instance run: losses and val mask AP50
        return (
            f"epoch {m['epoch'] + 1}/{epochs}: train loss {m['train_loss']:.4f} | "
            f"val loss {m['val_loss']:.4f} mask AP50 {m['val_ap50']:.3f} AP {m['val_ap']:.3f} | "
            f"{m['seconds']:.1f} s, {m['train_images_per_s']:.1f} images/s"
        )
    return (
        f"epoch {m['epoch'] + 1}/{epochs}: train loss {m['train_loss']:.4f} mIoU {m['train_miou']:.3f} | "
        f"val loss {m['val_loss']:.4f} mIoU {m['val_miou']:.3f} Dice {m['val_mean_dice']:.3f} | "
        f"{m['seconds']:.1f} s, {m['train_images_per_s']:.1f} images/s"
    )


def plot_curves(history: pd.DataFrame) -> bytes:
    """Loss and mIoU per epoch, train and val, side by side; returns PNG bytes.

    An instance run's history (``val_ap50``, no mIoU) shows val mask AP50 and AP instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history["epoch"] + 1
    instance = "val_ap50" in history.columns
    for split, style in (("train", "-o"), ("val", "--s")):
        ax_loss.plot(epochs, history[f"{split}_loss"], style, label=split, markersize=4)
        if instance:
            ax_miou.plot(epochs, history[f"val_{'ap50' if split == 'train' else 'ap'}"], style, label=f"val {'AP50' if split == 'train' else 'AP'}", markersize=4)
        else:
            ax_miou.plot(epochs, history[f"{split}_miou"], style, label=split, markersize=4)
    if instance:
        ax_loss.set(title="loss (Mask R-CNN terms summed)", xlabel="epoch", ylabel="loss")
        ax_miou.set(title="val mask AP", xlabel="epoch", ylabel="AP", ylim=(0, 1))
    else:
        ax_loss.set(title="loss (weighted cross-entropy)", xlabel="epoch", ylabel="loss")
        ax_miou.set(title="mIoU", xlabel="epoch", ylabel="mean IoU", ylim=(0, 1))
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def preview_strips(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, mean, std, colours: list[tuple[int, int, int]]) -> np.ndarray:
    """image | truth | prediction side by side for TensorBoard's image summary.

    Args:
        images: (N, H, W, 3) float32, normalised as the model sees them.
        truth: (N, H, W) class ids (255: ignored, shown light grey).
        pred: (N, H, W) predicted class ids.
        mean, std: the normalisation to undo.
        colours: one RGB colour per class.

    Returns:
        (N, H, 3W + 2 * PREVIEW_GAP, 3) uint8.
    """
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(colours)] = np.asarray(colours, np.uint8).reshape(-1, 3)
    lut[255] = IGNORED_COLOUR
    rgb = np.clip(images * np.asarray(std, np.float32) + np.asarray(mean, np.float32), 0, 255).astype(np.uint8)
    n, h = rgb.shape[:2]
    gap = np.full((n, h, PREVIEW_GAP, 3), 255, np.uint8)
    ids = lambda a: np.clip(np.asarray(a), 0, 255).astype(np.uint8)  # noqa: E731
    return np.concatenate([rgb, gap, lut[ids(truth)], gap, lut[ids(pred)]], axis=2)
