"""A search's MLflow run: the parent of its trials' runs, with the best trial tagged when it ends."""

from __future__ import annotations

import os
from typing import Any

from segray.tracking.client import Tracker, flat_params, read_run_record, tracking_uri
from segray.tracking.training import TAG, base_tags

PARENT_TAG = "mlflow.parentRunId"  # MLflow's UI nests a run under the run this tag names


def start_search_run(search_uri: str, config: dict[str, Any], uri: str | None, experiment: str) -> dict[str, Any] | None:
    """Starts the parent run of the search at ``search_uri``; returns ``{"uri", "experiment", "run_id"}`` or None without tracking."""
    uri = tracking_uri(uri)
    if uri is None:
        return None
    before = read_run_record(search_uri) if config.get("resume") else None
    if before and before.get("tracking_uri") == uri and before.get("run_id"):
        tracker = Tracker(search_uri, uri, before.get("experiment", experiment), before["run_id"])
        tracker.send({"op": "status", "status": "RUNNING"})
    else:
        tracker = Tracker(search_uri, uri, experiment)
        tracker.start(config.get("name") or os.path.basename(search_uri), base_tags({"kind": "search", "search_uri": search_uri,
                                                                                    "dataset": config.get("data")}))
        tracker.send({"op": "params", "params": flat_params(config)})
    return {"uri": uri, "experiment": tracker.experiment, "run_id": tracker.run_id}


def trial_tags(parent: dict[str, Any] | None) -> dict[str, str]:
    """The tags that nest a trial's run under the search's run (none when the parent's run is not started yet)."""
    return {PARENT_TAG: parent["run_id"]} if parent and parent.get("run_id") else {}


def finish_search_run(search_uri: str, parent: dict[str, Any] | None, best: dict[str, Any] | None, status: str) -> None:
    """Tags the best trial's run (``segray.best_trial``) and names it on the parent run, which then ends.

    Trial runs still RUNNING end first: FINISHED with the search, KILLED when it failed.
    """
    if parent is None:
        return
    tracker = Tracker(search_uri, parent["uri"], parent["experiment"], (read_run_record(search_uri) or {}).get("run_id"))
    best_run = (best or {}).get("run_uri")
    if best_run:
        record = read_run_record(best_run) or {}
        if record.get("run_id"):
            Tracker(best_run, parent["uri"], parent["experiment"], record["run_id"]).send(
                {"op": "tags", "tags": {f"{TAG}best_trial": "true"}})
            tracker.send({"op": "tags", "tags": {f"{TAG}best_trial_run_id": record["run_id"], f"{TAG}best_run_uri": best_run}})
        scores = {k: float(v) for k, v in (best or {}).items() if k.startswith("val_") and isinstance(v, (int, float))}
        if scores:
            from segray.tracking.client import now_ms

            tracker.send({"op": "metrics", "step": 0, "timestamp": now_ms(), "metrics": {f"best_{k}": v for k, v in scores.items()}})
    _end_trial_runs(tracker, parent, "FINISHED" if status == "FINISHED" else "KILLED")
    tracker.send({"op": "end", "status": status})


def _end_trial_runs(tracker: Tracker, parent: dict[str, Any], status: str) -> None:
    """Ends the search's trial runs that are still RUNNING, tagged ``segray.ended_by: search``.

    Tune ends a trial from outside (ASHA's stop, its last epoch, the time
    budget), so the trial's own training run never gets to end its MLflow
    run. Without a server to ask (records waiting for `segray mlflow sync`)
    the trials are left as they are.
    """
    if tracker.down or not tracker.run_id:
        return
    try:
        client = tracker.client
        experiment = client.get_run(tracker.run_id).info.experiment_id
        running, token = [], None
        while True:
            page = client.search_runs([experiment], filter_string=f"tags.`{PARENT_TAG}` = '{tracker.run_id}' and attributes.status = 'RUNNING'",
                                      page_token=token)
            running += page
            token = page.token
            if not token:
                break
    except Exception:  # noqa: BLE001 - the search's own records go on as Tracker.send decides
        return
    for run in running:
        folder = run.data.tags.get(f"{TAG}run_uri")
        if not folder:
            continue  # not a segray trial's run
        trial = Tracker(folder, parent["uri"], parent["experiment"], run.info.run_id)
        trial.send({"op": "tags", "tags": {f"{TAG}ended_by": "search"}})
        trial.send({"op": "end", "status": status})
