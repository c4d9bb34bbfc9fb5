"""What rank 0 writes into STORAGE/RUN as a run trains: history, curves, TensorBoard, the best model.

The run folder's layout and its readers are ``segray.runs``'s.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from segray import storage
from segray.runs import CURVES_FILE, TENSORBOARD_DIR, Preprocessing, write_history, write_model

PREVIEW_TAG = "val_predictions"  # TensorBoard images: validation image | truth | prediction


class RunArtifacts:
    """What rank 0 leaves in STORAGE/RUN besides Ray's checkpoints."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self.tb_dir = tempfile.mkdtemp(prefix="segray-tb-")
        self._writer = None

    def write_epoch(self, history: list[dict[str, Any]], preview: np.ndarray | None = None) -> None:
        """Writes the history, the curves and TensorBoard's scalars; ``preview``: (N, H, W, 3) uint8 strips shown as images."""
        import pandas as pd
        import pyarrow as pa
        import tensorflow as tf

        from segray.training.report import plot_curves

        frame = pd.DataFrame(history)
        write_history(self.run_uri, pa.Table.from_pandas(frame, preserve_index=False))
        storage.write_bytes(storage.join(self.run_uri, CURVES_FILE), plot_curves(frame))
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.tb_dir)
        last = history[-1]
        with self._writer.as_default():
            for key, value in last.items():
                if key not in ("epoch", "ended_at") and isinstance(value, (int, float)) and np.isfinite(value):
                    tf.summary.scalar(key, value, step=int(last["epoch"]))
            if preview is not None and len(preview):
                tf.summary.image(PREVIEW_TAG, preview, step=int(last["epoch"]), max_outputs=len(preview))
        self._writer.flush()
        for root, _, files in os.walk(self.tb_dir):
            for name in files:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, self.tb_dir)
                with open(path, "rb") as f:
                    storage.write_bytes(storage.join(self.run_uri, TENSORBOARD_DIR, rel), f.read())

    def write_best_model(
        self, export_model, weights: list[np.ndarray], epoch: int, metrics: dict[str, Any], preprocessing: Preprocessing
    ) -> None:
        """Exports the best weights so far as ``RUN/model/`` (see ``segray.runs``)."""
        export_model.set_weights(weights)
        best = {"epoch": epoch, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        write_model(self.run_uri, export_model, preprocessing, best)
