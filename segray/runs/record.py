"""A run's record: its ``config.json``, ``plan.json``, ``history.parquet`` and ``ended.json``, and the state read from them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from segray import storage
from segray.runs.layout import CONFIG_FILE, END_FILE, HISTORY_FILE, PLAN_FILE

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
    record = storage.read_json_or_none(storage.join(run_uri, END_FILE))
    if record is not None:
        return RunState(done, int(record.get("epochs", epochs)), record.get("stopped"), record.get("detail"), ended)
    if done and done >= epochs:
        return RunState(done, epochs, "epochs", "worked out from history.parquet", ended)
    patience = int(config.get("patience") or 0)
    column = "val_miou" if history is not None and "val_miou" in history else "val_ap50"  # an instance run: val mask AP50
    if patience and history is not None and done > patience and column in history:
        scores = history[column].fillna(0.0).tolist()
        if max(scores[-patience:]) <= max(scores[:-patience]):
            return RunState(done, epochs, "patience", "worked out from history.parquet", ended)
    return RunState(done, epochs, None, None, ended)


def write_plan(run_uri: str, plan: dict[str, Any]) -> None:
    """Writes ``RUN/plan.json``: the plan the run follows (``TrainConfig.plan``)."""
    storage.write_text(storage.join(run_uri, PLAN_FILE), json.dumps(plan, indent=2) + "\n")


def has_history(run_uri: str) -> bool:
    return storage.exists(storage.join(run_uri, HISTORY_FILE))


def write_history(run_uri: str, table) -> None:
    """Writes ``RUN/history.parquet`` from a pyarrow Table, one row per epoch."""
    storage.write_parquet(table, storage.join(run_uri, HISTORY_FILE))
