"""Training curves as a PNG a person can look at."""

from __future__ import annotations

import io

import pandas as pd


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
