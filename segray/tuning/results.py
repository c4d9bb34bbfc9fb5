"""What a search leaves in STORAGE/NAME when it ends: the trials table, the best trial, the search plot.

- ``trials.parquet``: one row per trial that started: its sampled values
  (one ``param_KEY`` column each), ``best_val_miou``, ``best_val_dice`` and
  ``best_epoch`` (of the trial's saved model: its epoch of best val mIoU;
  on instance data ``best_val_ap50`` and ``best_val_pq``: the objective is
  val mask AP50, ``segray.tuning.objective``),
  ``epochs`` (trained), ``train_seconds`` (its epochs' time), ``seconds``
  (its wall-clock time in Tune, start-up included), ``started`` and ``ended``
  (Unix times: its start, its last epoch; for a trial resumed after the
  driver stopped, these three cover its part since; for a trial whose
  reports Tune lost with a killed driver, its run's first and last epoch), ``stopped_early`` (ASHA
  stopped it before its last epoch), ``stopped_after`` (the epochs it had
  done then, 0 if not stopped; its workers may finish one more before they
  stop, which ``epochs`` counts), ``complete`` (it trained all its epochs or
  ASHA stopped it; not: cut short by the time budget, or failed), ``status``,
  ``error`` and ``run_uri`` (a
  segray run: ``segray predict --model RUN_URI``).
- ``best.json``: the best trial by val mIoU: ``trial_id``, ``run_uri``,
  ``objective`` (the key maximised), ``val_miou``, ``val_mean_dice`` (instance
  data: ``val_ap50``, ``val_pq``), ``epoch``, ``params`` (its sampled values)
  and ``config`` (the run's resolved TrainConfig).
- ``search.png``: val mIoU of each trial against its training time, one
  line per trial.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from segray import storage
from segray.runs import SEARCH_BEST_FILE as BEST_FILE
from segray.runs import TRIALS_FILE
from segray.tuning.objective import SEMANTIC, Objective

PLOT_FILE = "search.png"


@dataclass(frozen=True)
class TuneResult:
    """What ``segray.tune`` returns.

    Attributes:
        uri: ``STORAGE/NAME``, where the search and its outputs are.
        trials: the ``trials.parquet`` DataFrame, one row per trial.
        best: the contents of ``best.json`` (None when no trial finished an epoch).
        seconds: wall-clock seconds of this driver's part of the search.
    """

    uri: str
    trials: pd.DataFrame
    best: dict[str, Any] | None
    seconds: float
    objective: Objective = SEMANTIC

    @property
    def trials_per_hour(self) -> float:
        """Complete trials (all their epochs, or stopped early by ASHA) per hour of this driver's search."""
        done = int(self.trials["complete"].sum()) if len(self.trials) else 0
        return done * 3600.0 / self.seconds if self.seconds > 0 else float("nan")

    def describe(self) -> str:
        t = self.trials
        stopped = int(t["stopped_early"].sum()) if len(t) else 0
        complete = int(t["complete"].sum()) if len(t) else 0
        lines = [
            f"{len(t)} trial(s): {complete} complete, {stopped} of them stopped early by ASHA, {len(t) - complete} cut short "
            f"(time budget or error); {self.seconds:.0f} s ({self.trials_per_hour:.1f} complete trials/hour)"
        ]
        if len(t):
            varied = [c for c in param_columns(t) if t[c].astype(str).nunique() > 1]  # the sampled ones
            o = self.objective
            shown = [c for c in ("trial_id", *varied, o.column, o.second_column, "epochs", "seconds", "stopped_early", "complete", "status") if c in t]
            lines.append(t.sort_values(o.column, ascending=False, na_position="last")[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if self.best:
            o = self.objective
            lines.append(f"best: trial {self.best['trial_id']}, val {o.label} {self.best[o.metric]:.4f} at epoch {self.best['epoch'] + 1}; run {self.best['run_uri']}")
        lines.append(f"search: {self.uri} ({TRIALS_FILE}, {BEST_FILE}, {PLOT_FILE}); `segray predict --model {self.uri}` uses the best trial")
        return "\n".join(lines)


PARAM_PREFIX = "param_"


def param_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith(PARAM_PREFIX)]


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return value.item()
    return value


def trial_rows(grid, runs_uri: str, stopped: dict[str, int], objective: Objective = SEMANTIC) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per trial, one row per epoch of each trial) from Tune's ResultGrid and the trials' runs.

    Scores and epochs come from each trial's run (its saved model and
    ``history.parquet``): Tune keeps only the reports of a trial's last
    stretch, so a trial resumed after the driver stopped shows there only its
    epochs since. ``seconds``, ``started`` and ``ended`` are that stretch's.
    """
    from segray.runs import BEST_FILE as SAVED_BEST_FILE
    from segray.runs import MODEL_DIR, has_history, read_history

    rows, curves = [], []
    for result in grid:
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        if trial_id is None and result.path:
            trial_id = storage.basename(result.path).removeprefix("trial_")
        if trial_id is None:
            continue
        run_uri = storage.join(runs_uri, trial_id)
        history = read_history(run_uri) if has_history(run_uri) else None
        error = None if result.error is None else f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:500]}"
        if history is None and error is None:
            continue  # never started (the time budget ran out first)
        row: dict[str, Any] = {"trial_id": trial_id}
        row.update({f"{PARAM_PREFIX}{k}": _param_value(v) for k, v in (result.config or {}).items()})
        saved_uri = storage.join(run_uri, MODEL_DIR, SAVED_BEST_FILE)
        saved = json.loads(storage.read_text(saved_uri)) if storage.exists(saved_uri) else None
        if saved is not None:
            # The saved model's own scores: what `segray predict` with this run uses. A trial
            # stopped by ASHA may have trained an epoch more, in its history, before its
            # workers stopped, and been stopped before that epoch's model was saved.
            row.update({objective.column: _score(saved.get(objective.metric)), objective.second_column: _score(saved.get(objective.second)),
                        "best_epoch": int(saved["epoch"])})
        else:
            row.update({objective.column: math.nan, objective.second_column: math.nan, "best_epoch": -1})
        row["epochs"] = 0 if history is None else len(history)
        planned = _planned_epochs(run_uri)
        row["complete"] = error is None and (trial_id in stopped or (planned is not None and row["epochs"] >= planned))
        row["train_seconds"] = 0.0 if history is None else float(history["seconds"].sum())
        frame = _reports(result, objective.metric)
        seconds = float(result.metrics.get("time_total_s", math.nan)) if result.metrics else math.nan
        started = ended = math.nan
        if frame is not None and len(frame):
            first = frame.iloc[0]
            started, ended = float(first["timestamp"] - first["time_total_s"]), float(frame["timestamp"].iloc[-1])
        elif history is not None and len(history) and "ended_at" in history:
            # No reports in Tune's state (a driver killed before it saved them): the run's own
            # epoch times, training only (start-up not counted).
            started = float(history["ended_at"].iloc[0] - history["seconds"].iloc[0])
            ended = float(history["ended_at"].iloc[-1])
        row.update(
            seconds=seconds,
            started=started,
            ended=ended,
            stopped_early=trial_id in stopped,
            stopped_after=stopped.get(trial_id, 0),
            status="ERROR" if error else "TERMINATED",
            error=error,
            run_uri=run_uri,
        )
        rows.append(row)
        if history is not None and len(history):
            curves.append(pd.DataFrame({"trial_id": trial_id, "epoch": history["epoch"], objective.metric: history[objective.metric],
                                        "minutes": history["seconds"].cumsum() / 60.0}))
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values("trial_id").reset_index(drop=True)
    curve = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["trial_id", "epoch", objective.metric, "minutes"])
    return table, curve


def _planned_epochs(run_uri: str) -> int | None:
    from segray.runs import read_config, run_exists

    return int(read_config(run_uri)["epochs"]) if run_exists(run_uri) else None


def _param_value(value: Any) -> Any:
    """A sampled value as a table cell: numbers and strings as they are, anything else as JSON."""
    value = _plain(value)
    return value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)


def _score(value: Any) -> float:
    return math.nan if value is None else float(value)


def _reports(result, metric: str = SEMANTIC.metric) -> pd.DataFrame | None:
    """Tune's reports of a trial's last stretch (``timestamp``, ``time_total_s``, ``epochs_done``, the objective ``metric``)."""
    from segray.tuning.trial import EPOCHS_DONE

    frame = result.metrics_dataframe
    if frame is None or not len(frame) or metric not in frame or EPOCHS_DONE not in frame:
        return None
    frame = frame[["timestamp", "time_total_s", EPOCHS_DONE, metric]].dropna(subset=[EPOCHS_DONE])
    return frame.drop_duplicates(subset=[EPOCHS_DONE], keep="last").sort_values(EPOCHS_DONE)


def best_trial(table: pd.DataFrame, objective: Objective = SEMANTIC) -> dict[str, Any] | None:
    """``best.json``'s contents: the trial of highest objective (best val mIoU, or mask AP50), with its run's resolved config."""
    from segray.runs import read_config

    column = objective.column
    if not len(table) or column not in table or table[column].isna().all():
        return None
    row = table.loc[int(table[column].fillna(-1).idxmax())]
    params = {c.removeprefix(PARAM_PREFIX): _plain(row[c]) for c in param_columns(table)}
    return {
        "trial_id": row["trial_id"],
        "run_uri": row["run_uri"],
        "objective": objective.metric,
        objective.metric: float(row[column]),
        objective.second: float(row[objective.second_column]),
        "epoch": int(row["best_epoch"]),
        "params": params,
        "config": read_config(row["run_uri"]),
    }


def plot_search(curve: pd.DataFrame, table: pd.DataFrame, objective: Objective = SEMANTIC) -> bytes:
    """The objective (val mIoU, or mask AP50) against the trial's own training minutes (its epochs, summed), one line per trial; PNG bytes.

    A trial stopped early ends in a cross; the best trial's line is thicker.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    column, metric = objective.column, objective.metric
    best = table.loc[int(table[column].fillna(-1).idxmax()), "trial_id"] if len(table) and column in table and table[column].notna().any() else None
    stopped = set(table.loc[table["stopped_early"], "trial_id"]) if len(table) else set()
    for trial_id, rows in curve.groupby("trial_id", sort=True):
        minutes = rows["minutes"]
        (line,) = ax.plot(minutes, rows[metric], "-o", markersize=3, linewidth=2.5 if trial_id == best else 1.0, label=trial_id)
        if trial_id in stopped:
            ax.plot(minutes.iloc[-1:], rows[metric].iloc[-1:], "x", color=line.get_color(), markersize=9, markeredgewidth=2)
    ax.set(title=f"validation {objective.label} of each trial (x: stopped early by ASHA)", xlabel="minutes of training (the trial's epochs)",
           ylabel=f"val {objective.label}", ylim=(0, 1))
    ax.grid(alpha=0.3)
    if curve["trial_id"].nunique() <= 20:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(uri: str, table: pd.DataFrame, curve: pd.DataFrame, objective: Objective = SEMANTIC) -> dict[str, Any] | None:
    """Writes ``trials.parquet``, ``best.json`` (when a trial finished an epoch) and ``search.png``; returns the best."""
    import pyarrow as pa

    storage.write_parquet(pa.Table.from_pandas(table, preserve_index=False), storage.join(uri, TRIALS_FILE))
    best = best_trial(table, objective)
    if best is not None:
        storage.write_text(storage.join(uri, BEST_FILE), json.dumps(best, indent=2))
    storage.write_bytes(storage.join(uri, PLOT_FILE), plot_search(curve, table, objective))
    return best


def trial_end(uri: str, run_uri: str) -> tuple[str, str] | None:
    """How the search at ``uri`` ended the trial whose run is ``run_uri``: (a key of
    ``segray.runs.STOP_REASONS``, a detail), or None when its trials table does not list it.
    """
    trials_uri = storage.join(uri, TRIALS_FILE)
    if not storage.exists(trials_uri):
        return None
    table = storage.read_parquet(trials_uri).to_pandas()
    rows = table[table["run_uri"].astype(str).str.rstrip("/") == run_uri.rstrip("/")] if "run_uri" in table else table.iloc[:0]
    if not len(rows):
        return None
    row = rows.iloc[0]
    detail = f"{trials_uri}, trial {row['trial_id']}"
    if isinstance(row.get("error"), str) and row["error"]:
        return "failed", f"{detail}: {row['error']}"
    if bool(row.get("stopped_early", False)):
        return "asha", detail
    if bool(row.get("complete", False)):
        return "epochs", detail
    return "search_time_budget", detail


def read_best(uri: str) -> dict[str, Any]:
    """``URI/best.json`` of a finished search.

    Raises:
        FileNotFoundError: ``uri`` holds no best.json.
    """
    return json.loads(storage.read_text(storage.join(uri, BEST_FILE)))
