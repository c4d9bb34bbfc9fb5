"""What a run leaves in STORAGE/RUN besides Ray's own checkpoint folders.

- ``config.json``: the resolved config and the dataset it trained on;
- ``history.parquet`` (one row per epoch), ``curves.png``, ``tensorboard/``;
- ``model/``: the best model by val mIoU (``segray.models.saved``);
- ``ended.json``: how the run ended (``write_end``), written when its loop
  stops of itself: all its epochs, early stopping, or its time budget (or
  by the driver when Ray Train gives up on it). A run without it is still
  training, or was killed; a resumed run removes it until it ends again;
- inside each Ray Train checkpoint: the weights, the optimizer state and the
  loop's state (``save_state`` / ``load_state``), so a run resumes exactly.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from segray import storage
from segray.models import Preprocessing, write_model

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.parquet"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
PREVIEW_TAG = "val_predictions"  # TensorBoard images: validation image | truth | prediction
STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.npz"
OPTIMIZER_FILE = "optimizer.npz"
END_FILE = "ended.json"

# Why a run stopped (``ended.json``'s ``stopped``; the last two for a search's
# trial, from the search's trials table): all but ``failed`` end a run normally.
STOP_REASONS = {
    "epochs": "trained all its epochs",
    "patience": "stopped early: `patience` epochs without a better val mIoU",
    "time_budget": "stopped by its `time_budget`",
    "failed": "failed",
    "asha": "stopped early by the search's ASHA scheduler",
    "search_time_budget": "stopped by the search's `time_budget`",
}
FINISHED = frozenset(STOP_REASONS) - {"failed"}


def write_config(run_uri: str, config: dict[str, Any], dataset: dict[str, Any], exclusive: bool) -> bool:
    """Writes ``RUN/config.json``: the resolved config the run trains with, and its dataset's description.

    Args:
        exclusive: create it only if no run has it (a new run claiming its
            name: of two started at once, exactly one creates it).

    Returns:
        False when ``exclusive`` and the file was there already.
    """
    uri, text = storage.join(run_uri, CONFIG_FILE), json.dumps({**config, "dataset": dataset}, indent=2)
    if exclusive:
        return storage.create_exclusive(uri, text.encode("utf-8"))
    storage.write_text(uri, text)
    return True


def read_config(run_uri: str) -> dict[str, Any]:
    """``RUN/config.json`` without its dataset description: the config the run trained with."""
    data = json.loads(storage.read_text(storage.join(run_uri, CONFIG_FILE)))
    data.pop("dataset", None)
    return data


def read_history(run_uri: str):
    """``RUN/history.parquet`` as a DataFrame, one row per epoch."""
    return storage.read_parquet(storage.join(run_uri, HISTORY_FILE)).to_pandas()


def run_exists(run_uri: str) -> bool:
    return storage.exists(storage.join(run_uri, CONFIG_FILE))


def write_end(run_uri: str, epochs_done: int, epochs: int, stopped: str, detail: str | None = None) -> None:
    """Writes ``RUN/ended.json``: the epochs done of those planned and why the run stopped (a key of ``STOP_REASONS``)."""
    record = {"epochs_done": int(epochs_done), "epochs": int(epochs), "stopped": stopped, "detail": detail}
    storage.write_text(storage.join(run_uri, END_FILE), json.dumps(record, indent=2))


def clear_end(run_uri: str) -> None:
    """Removes ``RUN/ended.json``: the run trains again (resumed)."""
    storage.delete_file(storage.join(run_uri, END_FILE))


@dataclass(frozen=True)
class RunState:
    """How far a run got, from its own files.

    Attributes:
        epochs_done: epochs in ``history.parquet``.
        epochs: epochs planned (``config.json``).
        stopped: a key of ``STOP_REASONS``, or None when the run has no
            record of an end: still training, or killed.
        detail: what ``failed`` was, or how the end was worked out.
        last_epoch_ended: Unix time of the last epoch's end, or None.
    """

    epochs_done: int
    epochs: int
    stopped: str | None
    detail: str | None = None
    last_epoch_ended: float | None = None

    @property
    def finished(self) -> bool:
        return self.stopped in FINISHED

    def describe(self) -> str:
        """``4 of 8 epochs done; ...`` in words."""
        reached = f"{self.epochs_done} of {self.epochs} epochs done"
        if self.stopped is None:
            when = ""
            if self.last_epoch_ended is not None:
                import datetime

                moment = datetime.datetime.fromtimestamp(self.last_epoch_ended, datetime.timezone.utc)
                when = f"; its last epoch ended at {moment.isoformat(timespec='seconds')}"
            return f"{reached}; no record of its end: still training, or killed{when}"
        reason = STOP_REASONS.get(self.stopped, self.stopped)
        return f"{reached}; {reason}" + (f" ({self.detail})" if self.detail else "")


def run_state(run_uri: str) -> RunState | None:
    """The state of the run at ``run_uri`` from its config, history and ``ended.json``; None when it is no run (no config.json).

    A run written before ``ended.json`` existed counts as ended when its
    history reached its planned epochs, or when its last ``patience`` epochs
    brought no better val mIoU.
    """
    if not run_exists(run_uri):
        return None
    config = read_config(run_uri)
    epochs = int(config.get("epochs", 0))
    history_uri = storage.join(run_uri, HISTORY_FILE)
    history = read_history(run_uri) if storage.exists(history_uri) else None
    done = 0 if history is None else len(history)
    ended = None
    if history is not None and done and "ended_at" in history:
        ended = float(history["ended_at"].iloc[-1])
    end_uri = storage.join(run_uri, END_FILE)
    if storage.exists(end_uri):
        try:
            record = json.loads(storage.read_text(end_uri))
        except json.JSONDecodeError as e:
            raise ValueError(f"{end_uri}: not valid JSON ({e})") from None
        return RunState(done, int(record.get("epochs", epochs)), record.get("stopped"), record.get("detail"), ended)
    if done and done >= epochs:
        return RunState(done, epochs, "epochs", "worked out from history.parquet", ended)
    patience = int(config.get("patience") or 0)
    if patience and history is not None and done > patience:
        scores = history["val_miou"].fillna(0.0).tolist()
        if max(scores[-patience:]) <= max(scores[:-patience]):
            return RunState(done, epochs, "patience", "worked out from history.parquet", ended)
    return RunState(done, epochs, None, None, ended)


def save_state(directory: str, model, optimizer, state: dict[str, Any]) -> None:
    np.savez(os.path.join(directory, WEIGHTS_FILE), *[np.asarray(w) for w in model.get_weights()])
    np.savez(os.path.join(directory, OPTIMIZER_FILE), *[np.asarray(v.numpy()) for v in optimizer.variables])
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f)


def load_state(directory: str, model, optimizer) -> dict[str, Any]:
    with np.load(os.path.join(directory, WEIGHTS_FILE)) as w:
        model.set_weights([w[f"arr_{i}"] for i in range(len(w.files))])
    optimizer.build(model.trainable_variables)
    with np.load(os.path.join(directory, OPTIMIZER_FILE)) as o:
        values = [o[f"arr_{i}"] for i in range(len(o.files))]
    if len(values) != len(optimizer.variables):
        raise RuntimeError(f"checkpoint holds {len(values)} optimizer variables, the optimizer has {len(optimizer.variables)}")
    for var, value in zip(optimizer.variables, values):
        var.assign(value)
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


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
        storage.write_parquet(pa.Table.from_pandas(frame, preserve_index=False), storage.join(self.run_uri, HISTORY_FILE))
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
        """Exports the best weights so far as ``RUN/model/`` (see ``segray.models.saved``)."""
        export_model.set_weights(weights)
        best = {"epoch": epoch, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        write_model(self.run_uri, export_model, preprocessing, best)
