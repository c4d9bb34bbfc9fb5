"""One MLflow run seen from a segray folder: records sent now, or kept for later.

A segray folder (a training run, a predict or evaluate output) that is
tracked holds ``mlflow/run.json`` (the tracking URI, the experiment and the
MLflow run's id) and, while the server could not be reached,
``mlflow/pending.jsonl``: the records not sent yet, one JSON object a line,
in order. ``segray mlflow sync FOLDER`` sends them (``sync``).

A tracking server that is down or slow never fails or stalls the job: each
request has a short timeout (MLflow's own ``MLFLOW_HTTP_REQUEST_*`` variables,
set here only where the user left them unset), the first failure warns once,
and every later record of the process goes to the pending file without
another try (the records keep their order that way). Credentials come from
MLflow's standard variables (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, ...) and are never
written or printed: ``run.json`` holds the URI, which the config refuses to
carry credentials in.

Records (``op`` and its fields):

- ``start``: ``experiment``, ``run_name``, ``tags``: creates the MLflow run;
- ``status``: ``status`` (``RUNNING`` when a resumed run goes on);
- ``params``: ``params`` (name -> text);
- ``metrics``: ``metrics`` (name -> number), ``step``, ``timestamp`` (ms);
- ``tags``: ``tags`` (name -> text);
- ``artifact``: ``file`` (relative to the folder), ``path`` (the artifact folder or None);
- ``json``: ``name``, ``data``: a JSON artifact made from ``data``;
- ``end``: ``status`` (``FINISHED``, ``FAILED``, ``KILLED``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from typing import Any

from segray import storage

TRACKING_ENV = "MLFLOW_TRACKING_URI"
RECORD_DIR = "mlflow"
RUN_FILE = "run.json"
PENDING_FILE = "pending.jsonl"

# Short: a training epoch must not wait minutes for a server that is gone
# (MLflow's defaults are a 120 s timeout and 7 retries with backoff).
SHORT_TIMEOUTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}
# Params longer than this are cut (MLflow refuses values over 6000 characters).
PARAM_CHARS = 6000
WARNING_START = "MLflow tracking server"


class TrackingWarning(UserWarning):
    """The tracking server could not be reached; the job goes on and keeps what it could not send."""


def tracking_uri(value: str | None) -> str | None:
    """The tracking URI: ``value`` (the ``mlflow`` field), else ``$MLFLOW_TRACKING_URI``, else None (no tracking)."""
    return value or os.environ.get(TRACKING_ENV) or None


def run_record_uri(folder: str) -> str:
    return storage.join(folder, RECORD_DIR, RUN_FILE)


def pending_uri(folder: str) -> str:
    return storage.join(folder, RECORD_DIR, PENDING_FILE)


def read_run_record(folder: str) -> dict[str, Any] | None:
    """``FOLDER/mlflow/run.json``, or None when the folder was never tracked."""
    return storage.read_json_or_none(run_record_uri(folder))


def read_pending(folder: str) -> list[dict[str, Any]]:
    """The records of ``FOLDER/mlflow/pending.jsonl`` not sent yet, in order ([] when none)."""
    uri = pending_uri(folder)
    if not storage.exists(uri):
        return []
    records = []
    for n, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{uri}, line {n}: not valid JSON ({e})") from None
    return records


def write_pending(folder: str, records: list[dict[str, Any]]) -> None:
    uri = pending_uri(folder)
    if records:
        storage.write_text(uri, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    elif storage.exists(uri):
        storage.delete_file(uri)


def client_for(uri: str):
    """An ``MlflowClient`` for ``uri`` with short HTTP timeouts (unless the user set MLflow's variables)."""
    for name, value in SHORT_TIMEOUTS.items():
        os.environ.setdefault(name, value)
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ImportError("mlflow: tracking needs the mlflow package; install it with `pip install 'segray[mlflow]'`") from None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created when it does not exist."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        found = client.get_experiment_by_name(name)  # created by another process a moment ago
        if found is None:
            raise
        return found.experiment_id


def flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``: MLflow params are flat text."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:PARAM_CHARS]
    return out


def apply(client, folder: str, run_id: str | None, record: dict[str, Any]) -> str:
    """Sends one record to the MLflow run ``run_id`` (``start`` creates it); returns the run's id."""
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "start":
        exp = experiment_id(client, record["experiment"])
        run = client.create_run(exp, run_name=record.get("run_name"), tags=record.get("tags") or {})
        return run.info.run_id
    if run_id is None:
        raise RuntimeError(f"{pending_uri(folder)}: a {op!r} record comes before the run was started")
    if op == "status":
        client.update_run(run_id, status=record["status"])
    elif op == "params":
        # A param is set once: a resumed run sends only those it has not got (MLflow refuses a change).
        have = client.get_run(run_id).data.params
        params = [Param(k, v) for k, v in record["params"].items() if k not in have]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
    elif op == "metrics":
        metrics = [Metric(k, float(v), int(record["timestamp"]), int(record["step"])) for k, v in record["metrics"].items()]
        for i in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[i:i + 500])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
    elif op == "artifact":
        source = storage.join(folder, record["file"])
        with tempfile.TemporaryDirectory(prefix="segray-mlflow-") as tmp:
            local = os.path.join(tmp, os.path.basename(record["file"]))
            with open(local, "wb") as f:
                f.write(storage.read_bytes(source))
            client.log_artifact(run_id, local, record.get("path"))
    elif op == "json":
        client.log_dict(run_id, record["data"], record["name"])
    elif op == "end":
        client.set_terminated(run_id, status=record["status"])
    else:
        raise ValueError(f"{pending_uri(folder)}: unknown record {op!r}")
    return run_id


class Tracker:
    """Sends a segray folder's records to its MLflow run, or keeps them in the folder when it cannot.

    Args:
        folder: the run or output folder (local or a bucket URI).
        uri: the tracking URI.
        experiment: the experiment's name (for a run still to be started).
        run_id: the MLflow run, when it exists already.
    """

    def __init__(self, folder: str, uri: str, experiment: str = "segray", run_id: str | None = None):
        self.folder, self.uri, self.experiment, self.run_id = folder, uri, experiment, run_id
        self._client = None
        # Records wait already (this run was cut off from the server earlier, or
        # another process of it was): later ones wait behind them, in order, and
        # the warning was given where they started waiting.
        self.down = storage.exists(pending_uri(folder))

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    def start(self, run_name: str, tags: dict[str, str]) -> None:
        """Creates the MLflow run (or keeps the request for later) and writes ``run.json``."""
        self.send({"op": "start", "experiment": self.experiment, "run_name": run_name, "tags": tags})

    def send(self, record: dict[str, Any]) -> None:
        if not self.down:
            try:
                run_id = apply(self.client, self.folder, self.run_id, record)
            except ImportError:
                raise
            except Exception as error:  # noqa: BLE001 - whatever the server or the network did, the job goes on
                self._went_down(error)
            else:
                if run_id != self.run_id:
                    self.run_id = run_id
                    self.write_run_record()
                return
        self._keep(record)

    def write_run_record(self) -> None:
        record = {"tracking_uri": self.uri, "experiment": self.experiment, "run_id": self.run_id}
        storage.write_text(run_record_uri(self.folder), json.dumps(record, indent=2) + "\n")

    def _keep(self, record: dict[str, Any]) -> None:
        if record["op"] == "start":
            self.write_run_record()  # run_id None: sync starts the run
        write_pending(self.folder, [*read_pending(self.folder), record])

    def _went_down(self, error: BaseException) -> None:
        self.down = True
        reason = str(error).strip().splitlines()
        reason = reason[-1][:200] if reason else type(error).__name__
        warnings.warn(
            f"{WARNING_START} {self.uri} could not be reached ({type(error).__name__}: {reason}); the job goes on, "
            f"and what was not sent waits in {pending_uri(self.folder)}: send it with `segray mlflow sync {self.folder}`",
            TrackingWarning,
            stacklevel=3,
        )

    @property
    def pending(self) -> int:
        return len(read_pending(self.folder))


def now_ms() -> int:
    return int(time.time() * 1000)


def send_pending(folder: str, uri: str | None = None, warn: bool = False) -> tuple[int, int]:
    """Sends the records waiting in ``FOLDER/mlflow/pending.jsonl``, in order (``segray mlflow sync``).

    Args:
        folder: a tracked run or output folder.
        uri: another tracking URI to send to (default: the one in ``run.json``).
        warn: on failure, warn (as a job does) instead of raising.

    Returns:
        ``(sent, left)``: records sent, and records still waiting.

    Raises:
        FileNotFoundError: the folder was never tracked (no ``mlflow/run.json``).
        ConnectionError: the server could not be reached or refused a record
            (the records from that one on still wait).
    """
    record = read_run_record(folder)
    if record is None:
        raise FileNotFoundError(f"{run_record_uri(folder)} does not exist: {folder} was not tracked with MLflow (`mlflow`)")
    records = read_pending(folder)
    if not records:
        return 0, 0
    target = uri or record["tracking_uri"]
    run_id = record.get("run_id") if target == record["tracking_uri"] else None
    experiment = record.get("experiment", "segray")
    if run_id is None and records[0]["op"] != "start":
        raise ValueError(f"{pending_uri(folder)}: the MLflow run was never started and the first record is {records[0]['op']!r}")
    sent = 0
    try:
        client = client_for(target)  # MLflow may refuse the URI itself (a file store, since MLflow 3)
        for item in records:
            if item["op"] == "start" and run_id is not None:
                sent += 1  # started since (a resumed session sent it)
                continue
            new_id = apply(client, folder, run_id, item)
            sent += 1
            if new_id != run_id:
                run_id = new_id
                storage.write_text(run_record_uri(folder), json.dumps(
                    {"tracking_uri": target, "experiment": experiment, "run_id": run_id}, indent=2) + "\n")
    except Exception as error:  # noqa: BLE001
        write_pending(folder, records[sent:])
        lines = str(error).strip().splitlines()
        message = (f"{WARNING_START} {target} could not take record {sent + 1} of {len(records)} ({records[sent]['op']}) "
                   f"of {pending_uri(folder)}: {type(error).__name__}: {lines[-1][:200] if lines else ''}")
        if warn:
            warnings.warn(message + "; they wait for `segray mlflow sync`", TrackingWarning, stacklevel=2)
            return sent, len(records) - sent
        raise ConnectionError(message) from None
    write_pending(folder, [])
    if uri and uri != record["tracking_uri"]:
        storage.write_text(run_record_uri(folder), json.dumps(
            {"tracking_uri": target, "experiment": experiment, "run_id": run_id}, indent=2) + "\n")
    return sent, 0
