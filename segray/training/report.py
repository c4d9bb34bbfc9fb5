"""How a run shows its progress: one line per epoch in the job log, curves as a PNG."""

from __future__ import annotations

import io
from typing import Any

import pandas as pd


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """One line per epoch for the job's log: where the run is and how it is doing."""
    m = metrics
    return (
        f"epoch {m['epoch'] + 1}/{epochs}: train loss {m['train_loss']:.4f} mIoU {m['train_miou']:.3f} | "
        f"val loss {m['val_loss']:.4f} mIoU {m['val_miou']:.3f} Dice {m['val_mean_dice']:.3f} | "
        f"{m['seconds']:.1f} s, {m['train_images_per_s']:.1f} images/s"
    )


def plot_curves(history: pd.DataFrame) -> bytes:
    """Loss and mIoU per epoch, train and val, side by side; returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history["epoch"] + 1
    for split, style in (("train", "-o"), ("val", "--s")):
        ax_loss.plot(epochs, history[f"{split}_loss"], style, label=split, markersize=4)
        ax_miou.plot(epochs, history[f"{split}_miou"], style, label=split, markersize=4)
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
